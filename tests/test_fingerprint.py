"""The fingerprint changes when any input changes, and only then; cache writes are atomic."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from kedro.io import DatasetError

from rpo_pipeline.datasets import (
    FingerprintedParquetDataset,
    PretrainedDirDataset,
    StoredFingerprintDataset,
    read_stored_fingerprint,
)
from rpo_pipeline.fingerprint import CacheHit, Fingerprinted, fingerprint, hash_frame


def _frame():
    return pd.DataFrame({"group_id": ["a", "a", "b"], "response_index": [0, 1, 0],
                         "input_ids": [[1, 2, 3], [1, 2, 4, 5], [7, 8]],
                         "response_start": [2, 2, 1]})


def _dir(tmp_path, name="m", payload=b"weights"):
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text('{"n_layer": 2}')
    return d


def _fp(d, frame, params, device="cpu"):
    return fingerprint("sft", 1, Path(d), frame, params, device)


def test_equal_inputs_give_equal_fingerprints(tmp_path):
    d1, d2 = _dir(tmp_path, "m1"), _dir(tmp_path, "m2")  # same content, other place
    params = {"lr": 1e-3, "steps": 10, "nested": {"a": 1, "b": 2}}
    assert _fp(d1, _frame(), params) == _fp(d2, _frame().copy(), dict(reversed(params.items())))
    # the stored fingerprint file inside a model directory is not part of its content
    (d1 / "fingerprint.json").write_text('{"fingerprint": "x"}')
    assert _fp(d1, _frame(), params) == _fp(d2, _frame(), params)


@pytest.mark.parametrize("change", ["weights", "config", "new_file", "token_id", "response_start",
                                    "row_order", "extra_row", "param", "nested_param", "device"])
def test_any_change_changes_the_fingerprint(tmp_path, change):
    d = _dir(tmp_path)
    frame, params, device = _frame(), {"lr": 1e-3, "nested": {"a": 1}}, "cpu"
    before = _fp(d, frame, params, device)
    if change == "weights":
        (d / "model.safetensors").write_bytes(b"weightz")
    elif change == "config":
        (d / "config.json").write_text('{"n_layer": 3}')
    elif change == "new_file":
        (d / "adapter.bin").write_bytes(b"")
    elif change == "token_id":
        frame.at[1, "input_ids"] = [1, 2, 4, 6]
    elif change == "response_start":
        frame.at[0, "response_start"] = 1
    elif change == "row_order":
        frame = frame.iloc[[1, 0, 2]].reset_index(drop=True)
    elif change == "extra_row":
        frame = pd.concat([frame, frame.tail(1)], ignore_index=True)
    elif change == "param":
        params["lr"] = 2e-3
    elif change == "nested_param":
        params["nested"]["a"] = 2
    elif change == "device":
        device = "cuda"
    assert _fp(d, frame, params, device) != before


def test_list_boundaries_matter():
    a = pd.DataFrame({"x": [[1, 2], [3]]})
    b = pd.DataFrame({"x": [[1], [2, 3]]})
    assert hash_frame(a) != hash_frame(b)


def test_parquet_cache_roundtrip_and_hit(tmp_path):
    path = tmp_path / "cache.parquet"
    ds = FingerprintedParquetDataset(str(path))
    stored = StoredFingerprintDataset(str(path))
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
    ds = FingerprintedParquetDataset(str(path))
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

    ds = PretrainedDirDataset(str(tmp_path / "sft"))
    ds.save(Fingerprinted(Saver(b"v1"), "fp-v1"))
    assert read_stored_fingerprint(tmp_path / "sft") == "fp-v1"
    with pytest.raises(KeyboardInterrupt):
        ds.save(Fingerprinted(Saver(b"v2", crash=True), "fp-v2"))
    assert read_stored_fingerprint(tmp_path / "sft") == "fp-v1"
    assert (tmp_path / "sft" / "model.safetensors").read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]
    shutil.rmtree(tmp_path / "sft")
    assert StoredFingerprintDataset(str(tmp_path / "sft")).load() is None


def test_cosmetic_parameters_do_not_change_fingerprints():
    from rpo_pipeline.fingerprint import result_params

    a = {"lr": 1e-3, "progress": True, "log_every": 10, "nested": {"progress": False, "x": 1}}
    b = {"lr": 1e-3, "progress": False, "log_every": 50, "nested": {"x": 1}}
    assert fingerprint(result_params(a)) == fingerprint(result_params(b))
    assert fingerprint(result_params(a)) != fingerprint(result_params({**b, "lr": 2e-3}))


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
