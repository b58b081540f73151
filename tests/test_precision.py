"""precision: auto picks bf16 only where it is fast; impossible explicit choices are refused."""

from __future__ import annotations

import pytest

from rpo_pipeline.precision import choose_precision, cpu_matmul_gflops

SLOW_BF16 = {"fp32": 69.0, "bf16": 0.8}  # this project's AVX2 development CPU
FAST_BF16 = {"fp32": 120.0, "bf16": 450.0}  # AMX


@pytest.mark.parametrize("device,kwargs,expected", [
    ("cpu", {"cpu_gflops": SLOW_BF16}, "fp32"),
    ("cpu", {"cpu_gflops": FAST_BF16}, "bf16"),
    ("cpu", {"cpu_gflops": {"fp32": 50.0, "bf16": 50.0}}, "fp32"),  # not faster: keep fp32
    ("cpu", {"cpu_gflops": {"fp32": 50.0, "bf16": 70.0}}, "fp32"),  # within the margin (1.5x)
    ("cpu", {"cpu_gflops": {"fp32": 50.0, "bf16": 80.0}}, "bf16"),
    ("cpu", {}, "fp32"),  # not measured
    ("cuda", {"cuda_bf16": True}, "bf16"),
    ("cuda", {"cuda_bf16": False}, "fp32"),  # no silent fp16 (it needs loss scaling)
    ("mps", {}, "fp32"),
])
def test_auto_picks_bf16_only_where_it_is_fast(device, kwargs, expected):
    assert choose_precision("auto", device, **kwargs) == expected


def test_explicit_choices_are_kept_or_refused_with_the_reason():
    assert choose_precision("fp32", "cuda", cuda_bf16=True) == "fp32"
    assert choose_precision("bf16", "cpu", cpu_gflops=SLOW_BF16) == "bf16"  # asked for: kept
    assert choose_precision("fp16", "cuda") == "fp16"
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        choose_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="no bf16 support"):
        choose_precision("bf16", "cuda", cuda_bf16=False)
    with pytest.raises(ValueError, match=r"precision = 'fp64': must be one of"):
        choose_precision("fp64", "cpu")


def test_cpu_measurement_is_positive_and_cached():
    speeds = cpu_matmul_gflops()
    assert speeds["fp32"] > 0 and speeds["bf16"] > 0
    assert cpu_matmul_gflops() is speeds


def test_inference_jobs_run_in_the_chosen_precision(tmp_path):
    """bf16 autocast changes the cached log-probs a little (so it is in the fingerprint); fp32 and
    an auto that resolves to fp32 give the same numbers."""
    import contextlib

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rpo_pipeline.jobs import InferenceJob, autocast, run_inference

    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, 64, (int(n),), generator=g).tolist() for n in (12, 9, 15, 7)]
    args = {"input_ids": seqs, "response_starts": [4, 3, 4, 2], "pad_id": 0, "batch_size": 2,
            "progress": False}
    run = {prec: run_inference(InferenceJob("response_logps", str(path), "cpu", args, precision=prec))[0]
           for prec in ("fp32", "bf16")}
    assert isinstance(autocast("fp32", "cpu"), contextlib.nullcontext)
    assert isinstance(autocast("bf16", "cpu"), torch.autocast)
    np.testing.assert_allclose(run["bf16"], run["fp32"], rtol=0.05)
    assert not np.array_equal(run["bf16"], run["fp32"])
