"""rpo_pipeline.datasets: reading preference files (types, compression, globs; errors that name the
file, the line and the reason), fingerprinted cache entries, and the docstring examples."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import PAIRS, fails, jsonl, load, write_file
from kedro.io import DatasetError

from rpo_pipeline.datasets import (
    FingerprintedParquetDataset,
    PreferenceFileDataset,
    PretrainedDirDataset,
    StoredFingerprintDataset,
    read_preference_files,
    read_stored_fingerprint,
    write_jsonl,
)
from rpo_pipeline.fingerprint import CacheHit, Fingerprinted
from rpo_pipeline.preference_formats import PreferenceDataError
from rpo_pipeline.preference_groups import ingest


# ---- file-level problems: the same error under either policy -------------------------------------
def _truncated(compress, data: bytes) -> bytes:
    packed = compress(data)
    return packed[: len(packed) // 2]

def _bad_crc(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data))
    packed[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    return bytes(packed)

FILE_CASES = [
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty$"),
    ("blank.jsonl", b"\n   \n\n", r"blank.jsonl: the file is empty$"),
    ("empty.jsonl.gz", gzip.compress(b""), r"empty.jsonl.gz: the file is empty$"),
    ("header_only.csv", b"prompt,chosen,rejected\n", r"header_only.csv: the file has no rows"),
    ("empty_array.json", b"[]", r"empty_array.json: the file has no rows"),
    ("latin1.csv", b"prompt,chosen,rejected\np,a,b\ncaf\xe9,a,b\n",
     r"latin1.csv: line 3: not valid UTF-8 at byte offset 32 \(b'\\xe9,a,'\)"),
    ("latin1.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": "caf\xe9"}]',
     r"latin1.json: line 2: not valid UTF-8 at byte offset 66"),
    ("truncated.jsonl.gz", _truncated(gzip.compress, jsonl(PAIRS * 20)),
     r"truncated.jsonl.gz: the gzip data is truncated or corrupt \(the stream ends before its end marker\); "
     r"it broke off after \d+ decompressed bytes \(\d+ complete lines\)"),
    ("bad_crc.jsonl.gz", _bad_crc(jsonl(PAIRS)),
     r"bad_crc.jsonl.gz: the gzip data is truncated or corrupt \(.*incorrect data check\)"),
    ("not_gzip.jsonl.gz", b"this was never gzip",
     r"not_gzip.jsonl.gz: the gzip data is truncated or corrupt"),
    ("truncated.jsonl.bz2", _truncated(bz2.compress, jsonl(PAIRS * 20)),
     r"truncated.jsonl.bz2: the bz2 data is truncated or corrupt"),
    ("truncated.jsonl.xz", _truncated(lzma.compress, jsonl(PAIRS * 20)),
     r"truncated.jsonl.xz: the xz data is truncated or corrupt"),
    ("cut.json", json.dumps(PAIRS).encode()[:-30],
     r"cut.json: line 1, column \d+: invalid JSON \(.*\) \(the file ends in the middle of a value: truncated\?\)"),
    ("not_objects.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, 3]',
     r"not_objects.json: row 2: expected a JSON object, got int"),
    ("broken.parquet", b"PAR1 this is not parquet", r"broken.parquet: not a readable Parquet file \(ArrowInvalid"),
    ("bad_quotes.csv", b'prompt,chosen,rejected\n"p,a,b\n',
     r"bad_quotes.csv: not valid CSV \(.*\)"),
    ("data.txt", b"hello", r"data.txt: unsupported file type 'txt'; use jsonl, json, parquet or csv"),
    ("sharegpt.json", json.dumps([{
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}}]).encode(),
     r"sharegpt.json: looks like ShareGPT / LLaMA-Factory pairs \(`conversations`, `chosen`, `rejected` as "
     r"\{from, value\} messages\)\. Convert .* Supported formats: pairs \(prompt, chosen, rejected.*scored"),
    ("oasst.jsonl", jsonl([{"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "text": "How?", "role": "prompter", "replies": [{"text": "Like so.", "role": "assistant", "rank": 0}]}}]),
     r"oasst.jsonl: looks like OpenAssistant message trees .* Supported formats: pairs"),
    ("chat.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]),
     r"chat.jsonl: looks like chat transcripts \(`messages`\) without preferences"),
    ("imdb.jsonl", jsonl([{"text": "A fine film.", "label": 1}]),  # format text: too short
     r"imdb.jsonl: row 1: text has 3 words; the prompt takes \d"),
    ("unknown_columns.jsonl", jsonl([{"question": "q", "answer": "a"}]),
     r"unknown_columns.jsonl: cannot detect the preference format from the columns \['answer', 'question'\]; "
     r"supported formats: pairs"),
]

ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1", "score_chosen": 2.0, "score_rejected": 1.0},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2", "score_chosen": 5.0, "score_rejected": 0.5},
]


@pytest.mark.parametrize(("name", "data", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("on_invalid", ["raise", "drop"])
def test_bad_file_fails_with_file_and_reason(tmp_path, name, data, expected, on_invalid):
    path = write_file(tmp_path, name, data)
    message = fails(path, on_invalid)
    assert message.startswith(str(path)), message
    assert __import__("re").search(expected, message), message


def test_every_line_unreadable_names_the_first_bad_row(tmp_path):
    path = write_file(tmp_path, "all_bad.jsonl", b"{not json}\n[1, 2]\n")
    assert "all_bad.jsonl: row 1: invalid JSON" in fails(path, "drop")


def test_glob_matching_no_file(tmp_path):
    assert "no file matches this glob (the folder" in fails(tmp_path / "nowhere" / "*.jsonl")
    assert f"{tmp_path}/*.jsonl: no file matches this glob (the folder {tmp_path} exists" in \
        fails(tmp_path / "*.jsonl")
    assert "no such file" in fails(tmp_path / "missing.jsonl")
    assert "is a folder; give a file or a glob such as" in fails(tmp_path)


def test_a_file_cut_off_mid_line_keeps_every_complete_row(tmp_path):
    path = write_file(tmp_path, "cut.jsonl", jsonl(PAIRS) + b'{"prompt": "p", "chos')
    assert "row 41: the line is cut off in the middle of its JSON (Unterminated string) at the end of " \
           "the file: truncated?" in fails(path)
    result = load(path, "drop")
    assert result.counts == {"rows_in": 41, "rows_out": 40, "rows_dropped": 1}


def test_compressed_files_read_like_plain_ones(tmp_path):
    data = jsonl(PAIRS)
    for name, packed in [("a.jsonl.gz", gzip.compress(data)), ("b.jsonl.bz2", bz2.compress(data)),
                         ("c.jsonl.xz", lzma.compress(data)), ("d.jsonl.gz", gzip.compress(data[:500])
                                                                 + gzip.compress(data[500:]))]:
        frame = read_preference_files(str(write_file(tmp_path / name[0], name, packed)))
        assert len(frame) == len(PAIRS) and frame["prompt"].tolist() == [r["prompt"] for r in PAIRS], name


def test_through_the_kedro_dataset_the_message_is_kept(tmp_path):
    """The catalog entry wraps the error in Kedro's DatasetError; file, row and reason survive."""
    path = write_file(tmp_path, "t.jsonl.gz", _truncated(gzip.compress, jsonl(PAIRS * 20)))
    with pytest.raises(DatasetError, match=r"t.jsonl.gz: the gzip data is truncated or corrupt"):
        PreferenceFileDataset(filepath=str(path)).load()
    ok = PreferenceFileDataset(filepath=str(write_file(tmp_path, "ok.jsonl", jsonl(PAIRS)))).load()
    assert isinstance(ok, pd.DataFrame) and len(ok) == len(PAIRS)


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.parquet",
                                  "d.csv", "d.csv.gz"])
def test_file_types_read_the_same(tmp_path, name):
    path = tmp_path / name
    df = pd.DataFrame(ROWS)
    if ".jsonl" in name:
        write_jsonl(ROWS, str(path))
    elif ".json" in name:
        df.to_json(path, orient="records")
    elif ".parquet" in name:
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    raw = read_preference_files(str(path))
    assert raw["_source_row"].tolist() == [1, 2]
    groups = ingest(raw).groups
    assert groups["responses"].tolist() == [["c1", "r1"], ["c2", "r2"]]
    assert groups["scores"].tolist() == [[2.0, 1.0], [5.0, 0.5]]


def test_scored_lists_from_parquet_and_csv(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 0.0, 0.5]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "s.parquet")
    pd.DataFrame([{"prompt": "p", "responses": json.dumps(["a", "b", "c"]),
                   "scores": json.dumps([1.0, 0.0, 0.5])}]).to_csv(tmp_path / "s.csv", index=False)
    for f in ("s.parquet", "s.csv"):
        g = ingest(read_preference_files(str(tmp_path / f))).groups.iloc[0]
        assert list(g["responses"]) == ["a", "b", "c"] and list(g["scores"]) == [1.0, 0.0, 0.5]


def test_glob_reads_every_file_and_keeps_its_name(tmp_path):
    write_jsonl(ROWS[:1], str(tmp_path / "a.jsonl"))
    write_jsonl(ROWS[1:], str(tmp_path / "b.jsonl.gz"))
    raw = read_preference_files(str(tmp_path / "*.jsonl*"))
    assert [p.rsplit("/", 1)[1] for p in raw["_source_file"]] == ["a.jsonl", "b.jsonl.gz"]
    assert len(ingest(raw).groups) == 2


def test_missing_file_and_bad_json_are_named(tmp_path):
    with pytest.raises(PreferenceDataError, match="nope.jsonl: no such file"):
        read_preference_files(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"bad.jsonl: row 2: the line is cut off in the middle "
                                                  r"of its JSON"):
        ingest(read_preference_files(str(bad)))  # a row-level problem: on_invalid decides


def test_parquet_cache_roundtrip_and_hit(tmp_path):
    path = tmp_path / "cache.parquet"
    ds = FingerprintedParquetDataset(filepath=str(path))
    stored = StoredFingerprintDataset(filepath=str(path))
    assert stored.load() is None
    df = pd.DataFrame({"group_id": ["a"], "response_index": [0], "ref_logp": [-3.5]})
    ds.save(Fingerprinted(df, "fp1"))
    assert stored.load() == "fp1"
    pd.testing.assert_frame_equal(ds.load(), df)
    mtime = path.stat().st_mtime_ns
    ds.save(CacheHit("fp1"))  # no write
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="cache hit claimed"):
        ds.save(CacheHit("other"))


def test_parquet_cache_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "cache.parquet"
    ds = FingerprintedParquetDataset(filepath=str(path))
    old = pd.DataFrame({"v": [1.0, 2.0]})
    ds.save(Fingerprinted(old, "old"))
    real_write = pq.write_table

    def crash(table, where, **kw):
        real_write(table.slice(0, 1), where, **kw)  # half the data reaches the disk, then death
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        ds.save(Fingerprinted(pd.DataFrame({"v": [9.0, 9.0, 9.0]}), "new"))
    monkeypatch.undo()
    assert read_stored_fingerprint(path) == "old"
    pd.testing.assert_frame_equal(ds.load(), old)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.parquet"]


def test_model_dir_stores_fingerprint_atomically(tmp_path):
    class Saver:
        def __init__(self, payload, crash=False):
            self.payload, self.crash = payload, crash

        def save_pretrained(self, path, **kw):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(self.payload)
            if self.crash:
                raise KeyboardInterrupt("killed")

    ds = PretrainedDirDataset(filepath=str(tmp_path / "sft"))
    ds.save(Fingerprinted(Saver(b"v1"), "fp-v1"))
    assert read_stored_fingerprint(tmp_path / "sft") == "fp-v1"
    with pytest.raises(KeyboardInterrupt):
        ds.save(Fingerprinted(Saver(b"v2", crash=True), "fp-v2"))
    assert read_stored_fingerprint(tmp_path / "sft") == "fp-v1"
    assert (tmp_path / "sft" / "model.safetensors").read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]
    shutil.rmtree(tmp_path / "sft")
    assert StoredFingerprintDataset(filepath=str(tmp_path / "sft")).load() is None


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: (d / "fingerprint.json").write_text("{not json"), r"JSONDecodeError"),
    (lambda d: (d / "fingerprint.json").write_text('{"fp": "x"}'), r"KeyError: 'fingerprint'"),
    (lambda d: (d / "fingerprint.json").write_text('{"fingerprint": 3}'), r"'fingerprint' is 3"),
    (lambda d: (d / "fingerprint.json").unlink(), r"has no fingerprint.json"),
])
def test_unreadable_stored_fingerprint_warns_with_the_reason(tmp_path, caplog, damage, reason):
    from rpo_pipeline.datasets import read_stored_fingerprint

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"w")
    (d / "fingerprint.json").write_text('{"fingerprint": "abc"}')
    assert read_stored_fingerprint(d) == "abc" and not caplog.records
    damage(d)
    with caplog.at_level("WARNING", logger="rpo_pipeline.datasets"):
        assert read_stored_fingerprint(d) is None
    assert any(r.levelname == "WARNING" and re.search(reason, r.getMessage()) and "recomputing" in
               r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_parquet_fingerprint_warnings_and_a_first_run_is_silent(tmp_path, caplog):
    from rpo_pipeline.datasets import read_stored_fingerprint

    with caplog.at_level("WARNING"):
        assert read_stored_fingerprint(tmp_path / "absent.parquet") is None
        assert read_stored_fingerprint(tmp_path / "absent_dir") is None
    assert not caplog.records  # nothing stored yet: the normal first run
    table = tmp_path / "t.parquet"
    table.write_bytes(b"PAR1 damaged")
    with caplog.at_level("WARNING"):
        assert read_stored_fingerprint(table) is None
    assert "cannot read the stored fingerprint (ArrowInvalid" in caplog.records[-1].getMessage()
    pd.DataFrame({"a": [1]}).to_parquet(table)
    with caplog.at_level("WARNING"):
        assert read_stored_fingerprint(table) is None
    assert "has no stored fingerprint in its metadata" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("module", ["checkpoints", "fingerprinted", "model_source", "preference_file",
                                    "pretrained", "report"])
def test_docstring_examples_run(module, tmp_path):
    """Every dataset's Python example is a doctest that passes (with ``tmp_path`` to write to)."""
    import doctest
    import importlib

    mod = importlib.import_module(f"rpo_pipeline.datasets.{module}")
    tests = [t for t in doctest.DocTestFinder().find(mod, globs={**vars(mod), "tmp_path": tmp_path})
             if t.examples]
    assert tests, f"{module}: no examples"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


def test_every_dataset_has_a_yaml_and_a_python_example_and_keyword_only_arguments():
    import inspect

    import rpo_pipeline.datasets as ds

    classes = [getattr(ds, n) for n in ds.__all__ if n.endswith("Dataset")]
    assert len(classes) == 9
    for cls in classes:
        assert "Example (YAML)::" in cls.__doc__ and "Example (Python)::" in cls.__doc__, cls
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), cls
        with pytest.raises(TypeError):
            cls("data/x")


def test_read_only_datasets_refuse_save_with_a_dataset_error(tmp_path):
    from rpo_pipeline.datasets import CheckpointDirDataset, StoredFingerprintDataset

    for ds in (PreferenceFileDataset(filepath=str(tmp_path / "x.jsonl")),
               StoredFingerprintDataset(filepath=str(tmp_path / "x.parquet")),
               CheckpointDirDataset(filepath=str(tmp_path / "ckpt"))):
        with pytest.raises(DatasetError, match="read-only"):
            ds.save(pd.DataFrame())


def test_fsspec_urls_read_and_write(tmp_path):
    """Tables, JSON and preference files work on any fsspec filesystem (``memory://`` here)."""
    import fsspec

    from rpo_pipeline.datasets import FingerprintedJSONDataset, ReportTableDataset

    table = FingerprintedParquetDataset(filepath="memory://cache/t.parquet")
    table.save(Fingerprinted(pd.DataFrame({"a": [1, 2]}), "fp1"))
    assert table.load()["a"].tolist() == [1, 2] and table.exists()
    assert read_stored_fingerprint("memory://cache/t.parquet") == "fp1"
    table.save(CacheHit("fp1"))
    history = FingerprintedJSONDataset(filepath="memory://cache/h.json")
    history.save(Fingerprinted({"loss": [1.0]}, "fp1"))
    assert history.load() == {"loss": [1.0]}
    assert StoredFingerprintDataset(filepath="memory://cache/t.parquet",
                                    also=["memory://cache/h.json"]).load() == "fp1"
    report = ReportTableDataset(filepath="memory://report/m.parquet")
    report.save(pd.DataFrame({"policy": ["dpo"]}))
    assert fsspec.filesystem("memory").cat_file("/report/m.csv") == b"policy\ndpo\n"
    fs = fsspec.filesystem("memory")
    for i in (1, 2):
        fs.pipe_file(f"/prefs/part{i}.jsonl", json.dumps({"prompt": f"p{i}", "chosen": "a",
                                                           "rejected": "b"}).encode() + b"\n")
    df = PreferenceFileDataset(filepath="memory://prefs/*.jsonl").load()
    assert df["prompt"].tolist() == ["p1", "p2"]
    assert df["_source_file"].tolist() == ["memory:///prefs/part1.jsonl", "memory:///prefs/part2.jsonl"]
    with pytest.raises(DatasetError, match="must be on the local filesystem"):
        PretrainedDirDataset(filepath="s3://bucket/model")


def test_a_cache_entry_counts_only_when_every_part_carries_the_fingerprint(tmp_path, caplog):
    """``also``: a model and its history are one entry; a missing or stale part means recompute."""
    from rpo_pipeline.datasets import FingerprintedJSONDataset

    table = FingerprintedParquetDataset(filepath=str(tmp_path / "t.parquet"))
    history = FingerprintedJSONDataset(filepath=str(tmp_path / "h.json"))
    stored = StoredFingerprintDataset(filepath=str(tmp_path / "t.parquet"),
                                      also=[str(tmp_path / "h.json")])
    table.save(Fingerprinted(pd.DataFrame({"a": [1]}), "fp1"))
    assert stored.load() is None  # the history is not there yet
    history.save(Fingerprinted({"loss": []}, "fp1"))
    assert stored.load() == "fp1"
    history.save(Fingerprinted({"loss": []}, "fp0"))
    with caplog.at_level("WARNING"):
        assert stored.load() is None
    assert "different fingerprints" in caplog.text
    with pytest.raises(DatasetError, match="cache hit claimed for fp1 but the stored fingerprint is fp0"):
        history.save(CacheHit("fp1"))


@pytest.mark.parametrize("damage", ["cut in half", "one byte changed", "deleted"])
def test_a_damaged_model_directory_is_a_cache_miss_naming_the_file(tmp_path, caplog, damage):
    """The fingerprint of a saved model records each file's size and digest: a file cut in half,
    changed in place or deleted makes the stored fingerprint unusable (the stage recomputes), with
    a warning that names the file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rpo_pipeline.datasets import PretrainedDirDataset, StoredFingerprintDataset

    model_dir = tmp_path / "sft_model"
    PretrainedDirDataset(filepath=str(model_dir)).save(
        Fingerprinted(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)), "fp"))
    stored = StoredFingerprintDataset(filepath=str(model_dir))
    assert stored.load() == "fp"
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    if damage == "cut in half":
        weights.write_bytes(data[:len(data) // 2])
    elif damage == "one byte changed":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        weights.unlink()
    with caplog.at_level("WARNING", logger="rpo_pipeline.datasets"):
        assert stored.load() is None
    assert any(str(weights) in r.getMessage() and "recomputing" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_table_or_json_changed_in_place_is_a_cache_miss_naming_the_file(tmp_path, caplog):
    """A fingerprinted table or JSON value also records a digest of its content: rewritten with
    other values (still a valid file, its fingerprint intact), it is a miss with a warning naming
    the file, and the stage recomputes; stored again, it is a hit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rpo_pipeline.datasets import FingerprintedJSONDataset, FingerprintedParquetDataset, StoredFingerprintDataset

    table_path = tmp_path / "reference_logprobs.parquet"
    table = FingerprintedParquetDataset(filepath=str(table_path))
    df = pd.DataFrame({"group_id": ["a", "b"], "ref_logp": [-1.5, -2.0], "ids": [[1, 2], [3]]})
    table.save(Fingerprinted(df, "fp"))
    stored = StoredFingerprintDataset(filepath=str(table_path))
    assert stored.load() == "fp"
    written = pq.read_table(table_path)  # the same metadata (fingerprint and digest), other values
    changed = pa.Table.from_pandas(df.assign(ref_logp=[-1.5, -9.0]), preserve_index=False)
    pq.write_table(changed.replace_schema_metadata(written.schema.metadata), table_path)

    history_path = tmp_path / "reward_model.json"
    history = FingerprintedJSONDataset(filepath=str(history_path))
    history.save(Fingerprinted({"loss": [{"step": 1, "value": 0.5}]}, "fp"))
    assert StoredFingerprintDataset(filepath=str(history_path)).load() == "fp"
    history_path.write_text(history_path.read_text().replace("0.5", "0.25"))

    with caplog.at_level("WARNING", logger="rpo_pipeline.datasets"):
        assert stored.load() is None
        assert StoredFingerprintDataset(filepath=str(history_path)).load() is None
    for path in (table_path, history_path):
        assert any(str(path) in r.getMessage() and "changed after it was stored" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    table.save(Fingerprinted(df, "fp"))
    assert stored.load() == "fp"


def test_model_source_records_a_hub_id_with_its_revision_and_null_as_no_model(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from rpo_pipeline.datasets import ModelSource, ModelSourceDataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--judge" / "snapshots" / ("d" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--judge" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--judge" / "refs" / "main").write_text("d" * 40)
    ds = ModelSourceDataset(filepath=str(tmp_path / "judge"), key="evaluation.gold_judge_args.model")
    with pytest.raises(DatasetError, match="run the node that resolves evaluation.gold_judge_args.model"):
        ds.load()
    ds.save({"name_or_path": "org/judge"})
    assert ds.load() == ModelSource("org/judge", f"org/judge@{'d' * 40}")
    assert ds.load().name_or_path == "org/judge"  # from_pretrained reads it from the cache
    ds.save({"name_or_path": None})
    assert ds.load() == ModelSource(None, None) and ds.load().name_or_path is None
    local = tmp_path / "local_model"
    local.mkdir()
    ds.save({"name_or_path": str(local)})
    assert ds.load().name_or_path == str(local)
