"""Worker functions for test_distributed.py (module level: workers are spawned and import them)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist


def sum_of_ranks(out_dir: str) -> dict:
    """all_reduce the ranks; write the result to <out_dir>/<rank>.json (files carry outputs)."""
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    info = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(),
            "env_rank": int(os.environ["RANK"]), "threads": torch.get_num_threads()}
    (Path(out_dir) / f"{info['rank']}.json").write_text(json.dumps(info))
    return info


def rank_one_raises() -> int:
    dist.barrier()
    if dist.get_rank() == 1:
        raise ValueError("bad batch on this rank")
    dist.all_reduce(torch.zeros(1))
    return 0


def rank_one_is_killed() -> int:
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.zeros(1))
    return 0


def rank_one_hangs() -> int:
    dist.barrier()
    if dist.get_rank() == 1:
        time.sleep(600)
    dist.all_reduce(torch.zeros(1))
    return 0
