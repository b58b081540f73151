"""The N-process launcher: workers joined by torch.distributed (gloo on CPU) return by rank; a
worker that raises, is killed or hangs fails the call within a bounded time, naming the rank."""

from __future__ import annotations

import json
import time

import dist_fns
import pytest

from rpo_pipeline.distributed import WorkerError, resolve_backend, run_workers


def test_two_workers_meet_and_return_by_rank(tmp_path, processes):
    out = run_workers(dist_fns.sum_of_ranks, (str(tmp_path),), num_processes=2, threads_per_process=1)
    assert sorted(out) == [0, 1]
    for rank in (0, 1):
        assert out[rank] == {"rank": rank, "world": 2, "sum": 1.0, "env_rank": rank, "threads": 1}
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == out[rank]


@pytest.mark.parametrize(("fn", "expected"), [
    (dist_fns.rank_one_raises, r"rank_one_raises on 2 processes failed: rank 1 \(pid \d+\) exit code 1: "
                               r"ValueError: bad batch on this rank"),
    (dist_fns.rank_one_is_killed, r"rank_one_is_killed on 2 processes failed: rank 1 \(pid \d+\) killed by "
                                  r"signal 9 \(SIGKILL\)"),
    # the waiting rank's gloo timeout ends it with exit code 1, or under load with gloo's abort
    (dist_fns.rank_one_hangs, r"rank_one_hangs on 2 processes failed: rank 0 \(pid \d+\) (exit code 1|"
                              r"killed by signal 6 \(SIGABRT\)): .*(timed out|Timed out)"),
])
def test_a_failed_worker_fails_the_call_in_bounded_time_naming_the_rank(fn, expected, processes):
    t0 = time.perf_counter()
    with pytest.raises(WorkerError, match=expected) as e:
        run_workers(fn, num_processes=2, timeout_s=5, threads_per_process=1)
    assert "The other workers were stopped" in str(e.value)
    assert time.perf_counter() - t0 < 90  # never hangs: the hung rank's peer times out after 5 s


def test_backend_choice():
    assert resolve_backend("auto", "cpu") == "gloo" and resolve_backend("auto", "cuda") == "nccl"
    assert resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'gloo', 'nccl'\)"):
        resolve_backend("mpi", "cpu")
