"""Preference files: read jsonl / json / parquet / csv (compressed or not), write jsonl; the
read-only ``PreferenceFileDataset``."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterable
from typing import Any

import fsspec
import pandas as pd
from kedro.io import AbstractDataset

from rpo_pipeline.datasets._fs import read_only
from rpo_pipeline.preference_formats import READ_ERROR, SOURCE_FILE, SOURCE_ROW, PreferenceDataError

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}


def _decompress(raw: bytes, kind: str, path: str) -> bytes:
    """Decompress ``raw`` (all members); a truncated or corrupt stream fails naming how far it was
    readable."""
    import bz2  # the codecs: only for compressed files
    import lzma
    import zlib

    make = {"gzip": lambda: zlib.decompressobj(wbits=31), "bz2": bz2.BZ2Decompressor,
            "xz": lzma.LZMADecompressor}[kind]
    out, data = bytearray(), raw
    try:
        while data:
            d = make()
            out += d.decompress(data)
            if not d.eof:
                raise EOFError("the stream ends before its end marker")
            data = d.unused_data.lstrip(b"\x00")  # next member (concatenated files), or padding
    except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        lines = out.count(b"\n")
        raise PreferenceDataError(
            f"{path}: the {kind} data is truncated or corrupt ({e}); it broke off after "
            f"{len(out)} decompressed bytes ({lines} complete lines). Re-download or re-compress "
            "the file") from None
    return bytes(out)


def _utf8_reason(data: bytes, e: UnicodeDecodeError, base: int = 0) -> str:
    """A UTF-8 error of ``data`` (which starts at byte ``base`` of the decompressed file)."""
    return (f"not valid UTF-8 at byte offset {base + e.start} ({data[e.start:e.start + 4]!r}); "
            "save the file as UTF-8")


def _read_jsonl(raw: bytes) -> tuple[list[dict], list[int], list[str | None]]:
    """Records, their line numbers, and per line the reason it could not be read (or None).

    A line that is not UTF-8, not JSON, cut off mid-value or not an object is a row-level problem:
    ``ingest`` raises on it or drops and reports it (``on_invalid``), like any invalid row.
    """
    records, rows, errors = [], [], []
    offset = 0
    for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        record, error = {}, None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            error = _utf8_reason(line, e, base=start)
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                if text.rstrip().endswith("}"):
                    error = f"invalid JSON ({e.msg}, column {e.colno})"
                else:  # an object that never closes: the line was cut
                    end = " at the end of the file: truncated?" if not line.endswith(b"\n") else ""
                    error = (f"the line is cut off in the middle of its JSON "
                             f"({e.msg.removesuffix(' starting at')}){end}")
            else:
                if isinstance(value, dict):
                    record = value
                else:
                    error = f"expected a JSON object, got {type(value).__name__}"
        records.append(record)
        rows.append(lineno)
        errors.append(error)
    return records, rows, errors


def read_preference_file(path: str, file_format: str | None = None) -> pd.DataFrame:
    """Read one jsonl / json / parquet / csv file (gzip, bz2 or xz or not; local path or fsspec URL).

    Adds ``_source_file`` and ``_source_row`` (1-based: the line for jsonl, the element for a JSON
    array, the data row for csv and parquet) so that errors can point at the input. jsonl lines
    that cannot be read carry the reason in ``_read_error`` (see ``_read_jsonl``); every other
    problem (empty file, corrupt compression, bad UTF-8 or JSON in a json/csv file, an unreadable
    Parquet file) raises ``PreferenceDataError`` naming the file, the line and the reason.
    """
    stem, ext_c = os.path.splitext(path)
    compression = COMPRESSIONS.get(ext_c.lower())
    if compression is None:
        stem = path
    ext = (file_format or os.path.splitext(stem)[1].lstrip(".")).lower()
    if ext not in ("jsonl", "ndjson", "json", "parquet", "csv", "tsv"):
        raise PreferenceDataError(f"{path}: unsupported file type '{ext}'; use jsonl, json, parquet or "
                                  "csv (optionally .gz, .bz2 or .xz)")
    with fsspec.open(path, "rb") as f:
        raw = f.read()
    if compression is not None:
        raw = _decompress(raw, compression, path)
    if not raw.strip():
        raise PreferenceDataError(f"{path}: the file is empty")
    read_errors = None
    if ext in ("jsonl", "ndjson"):
        records, rows, read_errors = _read_jsonl(raw)
        df = pd.DataFrame(records)  # one row per non-blank line, also when none could be read
    elif ext == "parquet":
        try:
            df = pd.read_parquet(io.BytesIO(raw))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise PreferenceDataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                                      f"{e})") from None
        rows = list(range(1, len(df) + 1))
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise PreferenceDataError(f"{path}: line {line}: {_utf8_reason(raw, e)}") from None
        if ext == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                cut = ("" if text.rstrip().endswith(("]", "}")) else
                       " (the file ends in the middle of a value: truncated?)")
                raise PreferenceDataError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON "
                                          f"({e.msg}){cut}") from None
            if isinstance(data, dict):  # {"data": [...]}: a single list of records inside an object
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list):
                raise PreferenceDataError(f"{path}: expected a JSON array of objects, got "
                                          f"{type(data).__name__}")
            bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
            if bad is not None:
                raise PreferenceDataError(f"{path}: row {bad + 1}: expected a JSON object, got "
                                          f"{type(data[bad]).__name__}")
            df, rows = pd.DataFrame.from_records(data), list(range(1, len(data) + 1))
        else:
            try:
                df = pd.read_csv(io.StringIO(text), sep="\t" if ext == "tsv" else ",",
                                 keep_default_na=False, na_values=[""], dtype=object)
            except pd.errors.ParserError as e:
                raise PreferenceDataError(f"{path}: not valid {ext.upper()} ({e})") from None
            rows = list(range(1, len(df) + 1))
    if not len(df):
        raise PreferenceDataError(f"{path}: the file has no rows")
    df[SOURCE_FILE] = path
    df[SOURCE_ROW] = rows
    if read_errors is not None and any(e is not None for e in read_errors):
        df[READ_ERROR] = read_errors
    return df


def read_preference_files(pattern: str, file_format: str | None = None) -> pd.DataFrame:
    """Read every file matching ``pattern`` (a path, a glob, or an fsspec URL) into one table."""
    if "://" in pattern:
        fs, path = fsspec.core.url_to_fs(pattern)
        paths = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))] if glob.has_magic(path) \
            else [pattern]
        if not paths:
            raise PreferenceDataError(f"{pattern}: no file matches this glob")
    elif glob.has_magic(pattern):
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not paths:
            folder = os.path.dirname(pattern) or "."
            where = (f"the folder {folder} exists" if os.path.isdir(folder)
                     else f"the folder {folder} does not exist")
            raise PreferenceDataError(f"{pattern}: no file matches this glob ({where}; the path is "
                                      f"relative to {os.getcwd()})")
    else:
        if os.path.isdir(pattern):
            raise PreferenceDataError(f"{pattern}: is a folder; give a file or a glob such as "
                                      f"{os.path.join(pattern, '*.jsonl')}")
        if not os.path.exists(pattern):
            raise PreferenceDataError(f"{pattern}: no such file (relative to {os.getcwd()})")
        paths = [pattern]
    frames = [read_preference_file(p, file_format) for p in paths]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]



def write_jsonl(records: Iterable[dict], path: str) -> None:
    """Write records as JSON lines (gzip when the path ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


class PreferenceFileDataset(AbstractDataset[None, pd.DataFrame]):
    """Read-only preference data: jsonl / json / parquet / csv, gzip, bz2 or xz or not; a path, a
    glob or an fsspec URL (``s3://bucket/prefs/*.jsonl.gz``).

    Rows carry ``_source_file`` and ``_source_row`` so that validation errors name the input.
    ``file_format`` overrides the format the file name implies.

    Example (YAML)::

        raw_preferences:
          type: rpo_pipeline.datasets.PreferenceFileDataset
          filepath: ../shared/data/hh_rlhf/*.jsonl.gz

    Example (Python)::

        >>> write_jsonl([{"prompt": "p", "chosen": "a", "rejected": "b"}], str(tmp_path / "d.jsonl"))
        >>> df = PreferenceFileDataset(filepath=str(tmp_path / "*.jsonl")).load()
        >>> df[["prompt", "chosen", "_source_row"]].values.tolist()
        [['p', 'a', 1]]
    """

    def __init__(self, *, filepath: str, file_format: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._filepath = filepath
        self._file_format = file_format
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return read_preference_files(self._filepath, self._file_format)

    def save(self, data: pd.DataFrame) -> None:
        raise read_only(self)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "file_format": self._file_format}
