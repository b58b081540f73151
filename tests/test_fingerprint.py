"""rpo_pipeline.fingerprint: content fingerprints and the one cache check (CachedStage)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rpo_pipeline.fingerprint import fingerprint, hash_frame


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


def test_cosmetic_parameters_do_not_change_fingerprints():
    from rpo_pipeline.fingerprint import result_params

    a = {"lr": 1e-3, "progress": True, "log_every": 10, "nested": {"progress": False, "x": 1}}
    b = {"lr": 1e-3, "progress": False, "log_every": 50, "nested": {"x": 1}}
    assert fingerprint(result_params(a)) == fingerprint(result_params(b))
    assert fingerprint(result_params(a)) != fingerprint(result_params({**b, "lr": 2e-3}))


def test_cached_stage_reuses_only_on_a_match_and_names_its_metrics(caplog):
    from rpo_pipeline.fingerprint import CachedStage, CacheHit

    stage = CachedStage("SFT", hit_key="sft_cache_hit", seconds_key="sft_seconds")
    assert stage.reuse("abc", None) is None and stage.reuse("abc", "abd") is None
    with caplog.at_level("INFO"):
        hit, metrics = stage.reuse("abc", "abc")
    assert hit == CacheHit("abc") and "SFT cache hit (abc)" in caplog.text
    assert metrics["sft_cache_hit"] == [{"value": 1.0, "step": 0}]
    assert set(metrics) == {"sft_cache_hit", "sft_seconds"} and metrics["sft_seconds"][0]["value"] >= 0
    computed = stage.computed({"sft_val_loss": 2.5})
    assert {k: v[0]["value"] for k, v in computed.items() if k != "sft_seconds"} == {
        "sft_cache_hit": 0.0, "sft_val_loss": 2.5}


def test_a_hub_id_is_fingerprinted_by_id_and_cached_revision(tmp_path, monkeypatch):
    """A model named by Hub id (not a local directory) is fingerprinted by its id and the commit of
    its snapshot in the local Hugging Face cache; offline and uncached, by its id alone."""
    import huggingface_hub.constants

    from rpo_pipeline.fingerprint import model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_source("org/absent") == {"hub_id": "org/absent", "revision": None}

    def cache(sha: str) -> None:
        repo = tmp_path / "hub" / "models--org--tiny"
        (repo / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / sha / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)

    cache("a" * 40)
    first = fingerprint(model_source("org/tiny"))
    assert model_source("org/tiny") == {"hub_id": "org/tiny", "revision": "a" * 40}
    cache("b" * 40)  # the cached main moved to another commit
    assert fingerprint(model_source("org/tiny")) != first
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "w.bin").write_bytes(b"1")
    assert model_source(str(tmp_path / "local")) == tmp_path / "local"  # a directory: its bytes
