"""precision: auto is a rule on the device's facts (bf16 only on CUDA with bf16, fp32 on every CPU);
impossible explicit choices are refused; stages of one process may each run their own precision."""

from __future__ import annotations

import pytest

from rpo_pipeline.precision import DeviceFacts, choose_precision, cpu_bf16_flags, device_facts

AVX2 = DeviceFacts("cpu", cpu_capability="AVX2")  # this project's development CPUs: bf16 ~80x slower
AVX512_BF16 = DeviceFacts("cpu", cpu_capability="AVX512", cpu_bf16_flags=("avx512_bf16",))
AMX = DeviceFacts("cpu", cpu_capability="AVX512", cpu_bf16_flags=("amx_bf16", "avx512_bf16"))
CUDA_BF16, CUDA_NO_BF16 = DeviceFacts("cuda", cuda_bf16=True), DeviceFacts("cuda", cuda_bf16=False)


@pytest.mark.parametrize("facts,expected", [
    (AVX2, "fp32"),
    (AVX512_BF16, "fp32"),  # fast bf16, but other numbers: bf16 on a CPU is asked for, not assumed
    (AMX, "fp32"),
    (CUDA_BF16, "bf16"),
    (CUDA_NO_BF16, "fp32"),  # no silent fp16 (it needs loss scaling)
    (DeviceFacts("mps"), "fp32"),
])
def test_auto_is_a_rule_on_the_device_facts(facts, expected):
    assert choose_precision("auto", facts) == expected


def test_explicit_choices_are_kept_or_refused_with_the_reason():
    assert choose_precision("fp32", CUDA_BF16) == "fp32"
    assert choose_precision("bf16", AVX2) == "bf16"  # asked for: kept, even where it is slow
    assert choose_precision("bf16", AMX) == "bf16"
    assert choose_precision("fp16", CUDA_NO_BF16) == "fp16"
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        choose_precision("fp16", AMX)
    with pytest.raises(ValueError, match="no bf16 support"):
        choose_precision("bf16", CUDA_NO_BF16)
    with pytest.raises(ValueError, match=r"precision = 'fp64': must be one of"):
        choose_precision("fp64", AVX2)


def test_device_facts_are_read_not_measured(tmp_path, monkeypatch):
    import time

    import torch

    import rpo_pipeline.precision as precision

    def no_timing(*a, **k):
        raise AssertionError("resolving a precision must not time anything")

    monkeypatch.setattr(time, "perf_counter", no_timing)
    facts = device_facts(torch.device("cpu"))
    assert facts.device_type == "cpu" and not facts.cuda_bf16
    assert facts.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_bf16_flags(str(info)) == ("amx_bf16", "avx512_bf16")
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert cpu_bf16_flags(str(info)) == ()
    assert cpu_bf16_flags(str(tmp_path / "absent")) == ()


def test_inference_jobs_run_in_the_chosen_precision(tmp_path):
    """bf16 autocast changes the cached log-probs a little (so it is in the fingerprint); fp32 and
    an auto that resolves to fp32 give the same numbers."""
    import contextlib

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rpo_pipeline.jobs import ResponseLogpsJob, autocast, run_inference

    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(path)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, 64, (int(n),), generator=g).tolist() for n in (12, 9, 15, 7)]
    run = {prec: run_inference(ResponseLogpsJob(model_path=str(path), device="cpu", precision=prec,
                                                input_ids=seqs, response_starts=[4, 3, 4, 2],
                                                batch_size=2, progress=False))[0]
           for prec in ("fp32", "bf16")}
    assert isinstance(autocast("fp32", "cpu"), contextlib.nullcontext)
    assert isinstance(autocast("bf16", "cpu"), torch.autocast)
    np.testing.assert_allclose(run["bf16"], run["fp32"], rtol=0.05)
    assert not np.array_equal(run["bf16"], run["fp32"])


def _tiny_dir(tmp_path):
    """A tiny GPT-2 and its BPE tokenizer, saved with ``save_pretrained``."""
    from rpo_pipeline.base_model import build_tiny_gpt2, train_bpe_tokenizer

    texts = [f"the film was {w} and the plot {v}" for w in ("good", "bad", "long", "fine")
             for v in ("worked", "failed", "dragged")] * 4
    tok = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    path = tmp_path / "lm"
    build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def _dpo_items(tok, n=8):

    from rpo_pipeline.policy import PreferencePair

    items = []
    for i in range(n):
        prompt = tok(f"the film was {'good' if i % 2 else 'bad'}")["input_ids"]
        chosen = prompt + tok(" and the plot worked")["input_ids"] + [tok.eos_token_id]
        rejected = prompt + tok(" and the plot dragged")["input_ids"] + [tok.eos_token_id]
        items.append(PreferencePair(chosen, len(prompt), rejected, len(prompt), -20.0 - i % 3, -21.0))
    return items, [len(i.chosen_input_ids) + len(i.rejected_input_ids) for i in items]


def _train(path, items, lengths, pad, precision):
    """DPO on the tiny model in ``precision``: what ran, and the trained weights."""
    import torch
    from helpers import train_config
    from transformers import AutoModelForCausalLM

    from rpo_pipeline.jobs import disable_dropout
    from rpo_pipeline.losses import preference_loss_fn
    from rpo_pipeline.policy import policy_collate
    from rpo_pipeline.scoring import ResponseLogps
    from rpo_pipeline.training import train

    lm = AutoModelForCausalLM.from_pretrained(path)
    disable_dropout(lm)
    res = train(ResponseLogps(lm), items, lengths, policy_collate(), preference_loss_fn("sigmoid", 0.1),
                train_config(steps=3, batch_size=4, lr=1e-2, precision=precision))
    return res.precision, torch.cat([p.detach().flatten() for p in lm.parameters()])


def test_stages_with_different_precisions_run_in_one_process(tmp_path):
    """accelerate keeps its mixed precision process-wide: fp32, bf16, then fp32 again in one process
    (the stages of one run with other settings) each run as asked, the last as if alone."""
    import torch

    path, tok = _tiny_dir(tmp_path)
    items, lengths = _dpo_items(tok)
    ran = [_train(path, items, lengths, tok.pad_token_id, p) for p in ("fp32", "bf16", "fp32")]
    assert [r[0] for r in ran] == ["fp32", "bf16", "fp32"]
    assert torch.equal(ran[0][1], ran[2][1])  # fp32 after bf16 is fp32 exactly
    assert not torch.equal(ran[0][1], ran[1][1])  # bf16 autocast did run


def test_benchmark_runs_trl_bf16_defaults_then_ours_in_fp32_in_one_process(tmp_path):
    """bench_dpo_vs_trl.py's order: TRL at its defaults (bf16 autocast on the CPU), TRL in fp32,
    then ours in fp32 and in bf16, in one process."""
    import importlib.util

    from datasets import Dataset
    from helpers import ROOT

    from rpo_pipeline.losses import preference_loss_fn
    from rpo_pipeline.policy import policy_collate

    spec = importlib.util.spec_from_file_location("bench_dpo_vs_trl",
                                                  ROOT / "benchmarks" / "bench_dpo_vs_trl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path, tok = _tiny_dir(tmp_path)
    items, lengths = _dpo_items(tok)
    ds = Dataset.from_dict({"prompt": ["the film was good"] * 4, "chosen": [" and the plot worked"] * 4,
                            "rejected": [" and the plot dragged"] * 4})
    loss = preference_loss_fn("sigmoid", bench.BETA)
    for name in ("defaults", "fp32"):
        assert bench.trl(path, tok, ds, 1, 2, bench.TRL_SETTINGS[name]) > 0
    for precision in ("fp32", "bf16"):
        assert bench.ours(path, items, lengths, policy_collate(), loss, 2, 4, precision) > 0
