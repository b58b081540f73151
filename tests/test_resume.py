"""Checkpoints: a run killed with SIGKILL and resumed ends with the same weights; NaN stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

WORKER = str(Path(__file__).with_name("train_worker.py"))
STEPS = 120


def _run(out: Path, resume: bool, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, str(out), str(STEPS), "1" if resume else "0",
                           *extra], capture_output=True, text=True, timeout=300)


def _step(out: Path) -> int:
    try:
        return json.loads((out / "ckpt" / "last" / "step.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert _run(straight, resume=False).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, WORKER, str(killed), str(STEPS), "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _step(killed) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = _step(killed)
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


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    res = _run(out, False, "21")  # the 21st micro-batch (step 11, grad_accum 2) is NaN
    assert res.returncode != 0
    assert "FloatingPointError" in res.stderr and "at step 11" in res.stderr
    assert "last good checkpoint" in res.stderr
    assert _step(out) == 10 and not (out / "final.pt").exists()
