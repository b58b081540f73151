"""Checkpoints: a run killed with SIGKILL and resumed ends with the same weights; a NaN loss or
gradient stops cleanly before the optimizer step, keeping the last good checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TableLM, checkpoint_step, train_config

from rpo_pipeline.reference import SftExample
from rpo_pipeline.training import CHECKPOINT_STATE, train

WORKER = str(Path(__file__).with_name("train_worker.py"))
STEPS = 120


def _run(out: Path, resume: bool, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, str(out), str(STEPS), "1" if resume else "0",
                           *extra], capture_output=True, text=True, timeout=300)



def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, processes):
    straight = tmp_path / "straight"
    assert _run(straight, resume=False).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, WORKER, str(killed), str(STEPS), "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpoint_step(killed) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = checkpoint_step(killed)
    assert proc.returncode == -signal.SIGKILL and 0 < at < STEPS, (proc.returncode, at)
    assert not (killed / "final.pt").exists()
    leftovers = [p.name for p in (killed / "ckpt").iterdir() if p.name != "last"]
    assert all(name.startswith(".last.") for name in leftovers)  # at most an unfinished temp dir

    done = _run(killed, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(straight / "final.pt")
    b = torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(tmp_path, processes):
    out = tmp_path / "nan"
    res = _run(out, False, "21")  # the 21st micro-batch (step 11, grad_accum 2) is NaN
    assert res.returncode != 0
    assert "FloatingPointError" in res.stderr and "at step 11" in res.stderr
    assert "last good checkpoint" in res.stderr
    assert checkpoint_step(out) == 10 and not (out / "final.pt").exists()


def test_nan_gradient_with_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, processes):
    out = tmp_path / "nan_grad"
    res = _run(out, False, "21", "grad")
    assert res.returncode != 0
    assert "FloatingPointError" in res.stderr and "gradient norm is nan at step 11" in res.stderr
    assert "last good checkpoint" in res.stderr
    assert checkpoint_step(out) == 10 and not (out / "final.pt").exists()
    # accelerate's state files load with weights_only=True (no pickled code in them)
    last = out / "ckpt" / "last"
    assert json.loads((last / CHECKPOINT_STATE).read_text())["world_size"] == 1
    for name in ("optimizer.bin", "scheduler.bin"):
        assert torch.load(last / name, weights_only=True)
    assert (last / "model.safetensors").exists() and (last / "random_states_0.pkl").exists()


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_gradient_skips_the_optimizer_step(bad):
    """In process: at the bad step the error comes before any weight moves."""
    torch.manual_seed(0)
    model = TableLM()
    items = [SftExample([1, 2, 3, 4], 1)] * 8
    seen = {"calls": 0, "before": None}

    def loss_fn(m, batch):
        seen["calls"] += 1
        loss = -torch.log_softmax(m.logits[batch["packed_ids"]], -1).mean()
        if seen["calls"] == 3:  # a finite loss whose gradient is nan or inf
            seen["before"] = m.logits.detach().clone()
            x = m.logits * 1.0
            x.register_hook(lambda g: torch.full_like(g, float(bad)))
            return -torch.log_softmax(x[batch["packed_ids"]], -1).mean(), {}
        return loss, {}

    from rpo_pipeline.reference import sft_collate

    with pytest.raises(FloatingPointError, match=r"gradient norm is (nan|inf) at step 3"):
        train(model, items, [4] * 8, sft_collate(), loss_fn, train_config(steps=5, batch_size=2, lr=0.1))
    assert torch.equal(model.logits.detach(), seen["before"])


def test_snapshots_are_the_weights_after_their_steps():
    """The intermediate policies of the over-optimisation curves: the weights after steps 2 and 4
    of one run equal the weights of runs stopped there."""
    from rpo_pipeline.reference import sft_collate

    items = [SftExample([1, 2, 3, 4], 1), SftExample([4, 3, 2, 1], 1)] * 4

    def loss_fn(m, batch):
        return -torch.log_softmax(m.logits[batch["packed_ids"]], -1).mean(), {}

    def run(steps: int, snapshot_steps=()):
        torch.manual_seed(0)
        model = TableLM()
        result = train(model, items, [4] * 8, sft_collate(), loss_fn,
                       train_config(steps=steps, batch_size=2, lr=0.1, schedule="constant",
                                    warmup_steps=0), snapshot_steps=snapshot_steps,
                       snapshot_fn=lambda m: m.logits.detach().clone())
        return model.logits.detach(), result.snapshots

    final, snaps = run(6, snapshot_steps=[2, 4])
    assert sorted(snaps) == [2, 4]
    assert torch.equal(snaps[2], run(2)[0]) and torch.equal(snaps[4], run(4)[0])
    assert not torch.equal(snaps[4], final)


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights():
    """Eval losses 3, 2, 2.5, 2.6, 1 with patience 2: stops after step 4 (two evaluations without
    a lower loss) with the weights of step 2, the weights of a run stopped at step 2."""
    from rpo_pipeline.reference import sft_collate

    items = [SftExample([1, 2, 3, 4], 1), SftExample([4, 3, 2, 1], 1)] * 4

    def loss_fn(m, batch):
        return -torch.log_softmax(m.logits[batch["packed_ids"]], -1).mean(), {}

    def run(steps: int, patience: int = 0):
        torch.manual_seed(0)
        model = TableLM()
        scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0, 0.5])
        result = train(model, items, [4] * 8, sft_collate(), loss_fn,
                       train_config(steps=steps, batch_size=2, lr=0.1, schedule="constant",
                                    warmup_steps=0, eval_every=1, patience=patience),
                       eval_fn=lambda m: {"loss": next(scripted)})
        return model.logits.detach(), result

    kept, result = run(10, patience=2)
    assert result.steps == 4 and result.best_step == 2
    assert result.history["eval_loss"] == [3.0, 2.0, 2.5, 2.6]
    assert torch.equal(kept, run(2)[0])
    assert not torch.equal(kept, run(4)[0])
    _, full = run(5)  # patience 0: every step runs
    assert full.steps == 5 and full.best_step is None


def test_token_budget_cuts_batches_by_packed_tokens_and_trains():
    """``max_tokens_per_batch``: every batch holds at most ``batch_size`` items and at most the
    budget in tokens (an item above it alone), every item is used once per epoch; and ``train``
    sizes items by their packed tokens."""
    import numpy as np

    from rpo_pipeline.batching import length_bucketed_batches
    from rpo_pipeline.reference import sft_collate

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 40, 300).tolist() + [90]  # the last item is above the budget
    for shuffle in (True, False):
        batches = length_bucketed_batches(tokens, 8, seed=0, shuffle=shuffle, tokens=tokens,
                                          max_tokens=64)
        assert sorted(i for b in batches for i in b) == list(range(len(tokens)))
        assert all(len(b) <= 8 for b in batches)
        assert all(sum(tokens[i] for i in b) <= 64 or len(b) == 1 for b in batches)
        assert [300] in batches  # the long item trains alone
        assert len(batches) < len(tokens) / 2  # items share batches
    plain = length_bucketed_batches(tokens, 8, seed=0)
    assert sorted(len(b) for b in plain) == [5] + [8] * 37  # no budget: batch_size items

    seen = []

    def loss_fn(m, batch):
        seen.append(batch["packed_ids"].shape[1])
        return -torch.log_softmax(m.logits[batch["packed_ids"]], -1).mean(), {}

    items = [SftExample([1, 2, 3, 4], 1), SftExample([4, 3, 2, 1, 5, 1], 1), SftExample([2] * 12, 2)] * 4
    torch.manual_seed(0)
    train(TableLM(), items, [len(i.input_ids) for i in items], sft_collate(), loss_fn,
          train_config(steps=6, batch_size=8, max_tokens_per_batch=13))
    assert max(seen) <= 13 and min(seen) >= 4 and len(set(seen)) > 1
