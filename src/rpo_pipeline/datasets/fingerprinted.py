"""Cache entries stored with the fingerprint of the inputs that produced them, and the reader of
that fingerprint (``StoredFingerprintDataset``): a cached stage compares it with the fingerprint
of its current inputs and returns ``CacheHit(fp)`` on a match (see ``fingerprint.reuse``)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset, DatasetError

from rpo_pipeline.datasets._fs import FsPath, read_only
from rpo_pipeline.fingerprint import FINGERPRINT_FILE, CacheHit, Fingerprinted, damaged_file, hash_bytes, hash_frame

PARQUET_FINGERPRINT_KEY = b"rpo_pipeline.fingerprint"
PARQUET_DIGEST_KEY = b"rpo_pipeline.content_digest"  # fingerprint.hash_frame of the stored table
log = logging.getLogger(__name__)


class FingerprintedParquetDataset(AbstractDataset[Any, pd.DataFrame]):
    """A Parquet table stored with the fingerprint of the inputs that produced it.

    ``save`` takes ``Fingerprinted(df, fp)`` (the fingerprint and a digest of the table's content
    go into the file's metadata, so a table changed after it was stored is a cache miss),
    ``CacheHit(fp)`` (the stored file already matches: nothing is written) or a plain DataFrame.
    A local file is written to a temporary sibling and renamed over the old one: an interrupted
    write leaves the old table or none.

    Example (YAML)::

        reference_logprobs:
          type: rpo_pipeline.datasets.FingerprintedParquetDataset
          filepath: data/07_model_output/reference_logprobs.parquet

    Example (Python)::

        >>> from rpo_pipeline.fingerprint import Fingerprinted
        >>> ds = FingerprintedParquetDataset(filepath=str(tmp_path / "t.parquet"))
        >>> ds.save(Fingerprinted(pd.DataFrame({"a": [1, 2]}), "abc"))
        >>> ds.load()["a"].tolist(), read_stored_fingerprint(tmp_path / "t.parquet")
        ([1, 2], 'abc')
    """

    def __init__(self, *, filepath: str, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._file = FsPath(filepath, credentials, fs_args)
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self._file.read_bytes()))

    def save(self, data: Any) -> None:
        if isinstance(data, CacheHit):
            check_cache_hit(self._file, data)
            return
        df = data.value if isinstance(data, Fingerprinted) else data
        table = pa.Table.from_pandas(df, preserve_index=False)
        if isinstance(data, Fingerprinted):
            meta = dict(table.schema.metadata or {})
            meta[PARQUET_FINGERPRINT_KEY] = data.fingerprint.encode()
            meta[PARQUET_DIGEST_KEY] = hash_frame(table.to_pandas()).encode()  # as a load reads it
            table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._file.write_bytes(buf.getvalue())

    def _exists(self) -> bool:
        return self._file.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._file.url()}


class FingerprintedJSONDataset(AbstractDataset[Any, Any]):
    """A JSON value stored with the fingerprint of the inputs that produced it and a digest of the
    value, as ``{"fingerprint": fp, "digest": d, "data": value}``; ``load`` returns the value.

    ``save`` takes ``Fingerprinted(value, fp)``, ``CacheHit(fp)`` (the stored file already matches:
    nothing is written) or a plain value (stored with no fingerprint). Local writes are atomic.

    Example (YAML)::

        reward_model.training_history:
          type: rpo_pipeline.datasets.FingerprintedJSONDataset
          filepath: data/06_models/training_history/reward_model.json

    Example (Python)::

        >>> from rpo_pipeline.fingerprint import CacheHit, Fingerprinted
        >>> ds = FingerprintedJSONDataset(filepath=str(tmp_path / "h.json"))
        >>> ds.save(Fingerprinted({"loss": [{"step": 1, "value": 0.5}]}, "abc"))
        >>> ds.save(CacheHit("abc"))  # checks the stored fingerprint, writes nothing
        >>> ds.load()
        {'loss': [{'step': 1, 'value': 0.5}]}
    """

    def __init__(self, *, filepath: str, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._file = FsPath(filepath, credentials, fs_args)
        self.metadata = metadata

    def load(self) -> Any:
        return json.loads(self._file.read_bytes())["data"]

    def save(self, data: Any) -> None:
        if isinstance(data, CacheHit):
            check_cache_hit(self._file, data)
            return
        fp = data.fingerprint if isinstance(data, Fingerprinted) else None
        value = data.value if isinstance(data, Fingerprinted) else data
        record = {"fingerprint": fp, "digest": _json_digest(value), "data": value}
        self._file.write_bytes(json.dumps(record).encode())

    def _exists(self) -> bool:
        return self._file.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._file.url()}


def _json_digest(value: Any) -> str:
    return hash_bytes(json.dumps(value, sort_keys=True).encode())


def check_cache_hit(file: FsPath, hit: CacheHit) -> None:
    """A stage claims the stored value is current: it must carry that fingerprint."""
    stored = read_stored_fingerprint(file)
    if stored != hit.fingerprint:
        raise DatasetError(f"{file.url()}: cache hit claimed for {hit.fingerprint} but the stored "
                           f"fingerprint is {stored}")


def read_stored_fingerprint(path: str | Path | FsPath) -> str | None:
    """The fingerprint stored with a model directory, a Parquet table or a fingerprinted JSON
    file, or None.

    Nothing stored yet is the normal first run (None, silently). A stored fingerprint that cannot
    be read (a damaged ``fingerprint.json``, an unreadable Parquet footer), or an entry whose
    stored bytes no longer match what was recorded with its fingerprint (a model directory's file
    sizes and digests, a table's or a JSON value's content digest), logs a warning naming the file
    and the reason, and the stage recomputes. Entries stored without a record are not checked.
    """
    f = path if isinstance(path, FsPath) else FsPath(str(path))
    where = f.url()
    try:
        if f.fs.isdir(str(f.path)):
            marker = f.path / FINGERPRINT_FILE
            if not f.exists(marker):
                if f.fs.ls(str(f.path)):
                    log.warning("%s has no %s: recomputing it", where, FINGERPRINT_FILE)
                return None
            stored = json.loads(f.read_bytes(marker))
            value = stored["fingerprint"]
            damage = damaged_file(f.path, stored.get("files", {}))
            if damage is not None:
                log.warning("%s: %s; recomputing it", where, damage)
                return None
        elif not f.exists():
            return None
        elif f.path.suffix == ".json":
            stored = json.loads(f.read_bytes())
            value = stored["fingerprint"]
            if value is None:
                log.warning("%s was stored with no fingerprint: recomputing it", where)
                return None
            if "digest" in stored and _json_digest(stored["data"]) != stored["digest"]:
                log.warning("%s: its content changed after it was stored (digest mismatch); "
                            "recomputing it", where)
                return None
        else:
            with f.fs.open(str(f.path), "rb") as fh:  # the footer only, not the whole table
                meta = pq.read_schema(fh).metadata or {}
            raw = meta.get(PARQUET_FINGERPRINT_KEY)
            if raw is None:
                log.warning("%s has no stored fingerprint in its metadata: recomputing it", where)
                return None
            value = raw.decode()
            digest = meta.get(PARQUET_DIGEST_KEY)
            if digest is not None and hash_frame(pd.read_parquet(io.BytesIO(f.read_bytes()))).encode() != digest:
                log.warning("%s: its content changed after it was stored (digest mismatch); "
                            "recomputing it", where)
                return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"'fingerprint' is {value!r}, expected a non-empty string")
        return value
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, pa.ArrowException) as e:
        log.warning("%s: cannot read the stored fingerprint (%s: %s); recomputing it", where,
                    type(e).__name__, e)
        return None


class StoredFingerprintDataset(AbstractDataset[None, str | None]):
    """Read-only: the fingerprint stored with a cache entry (model directory, Parquet table or
    fingerprinted JSON file).

    Loads None when nothing (valid) is stored, so a stage can compare it with the fingerprint of
    its current inputs and skip work on a match. With ``also``, the other entries the same node
    writes with the same fingerprint: the value is None unless every one of them carries it (one
    missing or stale entry means the stage runs again and rewrites them all).

    Example (YAML)::

        reward_model_stored_fingerprint:
          type: rpo_pipeline.datasets.StoredFingerprintDataset
          filepath: data/06_models/reward_model
          also: [data/06_models/training_history/reward_model.json]

    Example (Python)::

        >>> StoredFingerprintDataset(filepath=str(tmp_path / "nothing_yet")).load() is None
        True
    """

    def __init__(self, *, filepath: str, also: list[str] | None = None,
                 credentials: dict[str, Any] | None = None, fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._files = [FsPath(f, credentials, fs_args) for f in [filepath, *(also or [])]]
        self.metadata = metadata

    def load(self) -> str | None:
        stored = {read_stored_fingerprint(f) for f in self._files}
        if len(stored) > 1:
            log.warning("%s: the entries carry different fingerprints; recomputing them",
                        ", ".join(f.url() for f in self._files))
            return None
        return stored.pop()

    def save(self, data: Any) -> None:
        raise read_only(self)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._files[0].url(), "also": [f.url() for f in self._files[1:]]}
