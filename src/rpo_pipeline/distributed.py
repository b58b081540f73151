"""Run a Kedro-free function on N local processes joined by ``torch.distributed``.

Kedro-free. The launcher is torch's elastic agent (``elastic_launch``: the engine behind ``torchrun``
and behind accelerate's ``notebook_launcher``), started from the calling process:

* workers are **spawned**, not forked: the caller (a Kedro node) holds threads, an MLflow client and
  Kedro state that a fork would copy half-initialised;
* they meet at a static rendezvous on a free localhost port and find ``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment (where
  ``accelerate.Accelerator`` reads them); the process group is set up before the function runs;
* a worker that raises or dies (SIGKILL included) makes the agent stop the others at once, with no
  restart; ``WorkerError`` then names each failed rank with its exit code or signal and its error;
* collectives time out after ``timeout_s``, so a rank that hangs fails instead of blocking forever.

Only paths and small values should travel as arguments and return values: workers read their inputs
from and write their outputs to files in a directory the caller owns.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from rpo_pipeline.params import BACKENDS


class WorkerError(RuntimeError):
    """One or more worker processes failed; the message names each failed rank and why."""


def resolve_backend(backend: str, device_type: str) -> str:
    """``auto``: nccl for CUDA, gloo otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable[..., Any], args: tuple, backend: str, timeout_s: float, threads: int) -> Any:
    """In each worker: threads, process group, the function, clean-up."""
    import torch  # in the spawned worker
    import torch.distributed as dist

    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: the host name may not resolve
    torch.set_num_threads(threads)
    if backend == "nccl":  # one GPU per local rank (``cuda`` in the workers means this one)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    result = fn(*args)  # on an error, exit at once (no tear-down): the agent stops the others
    dist.destroy_process_group()
    return result


def _describe(rank: int, failure: Any) -> str:
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    message = failure.message
    if isinstance(message, dict):  # from the worker's error file: {"message": "...", "extraInfo": ...}
        message = message.get("message", "")
    message = str(message or "").strip()
    if message and not message.startswith(("Signal", "To enable traceback")):
        how += f": {[line for line in message.splitlines() if line.strip()][-1]}"
    return f"rank {rank} (pid {failure.pid}) {how}"


def _is_follow_on(failure: Any) -> bool:
    """A rank that failed because a peer went away (its collective broke), not on its own."""
    text = str(failure.message)
    return any(m in text for m in ("Connection closed by peer", "Connection reset by peer", "Read error",
                                   "Broken pipe", "timed out", "Timed out"))


def run_workers(fn: Callable[..., Any], args: tuple = (), num_processes: int = 2, backend: str = "gloo",
                timeout_s: float = 600.0, threads_per_process: int | None = None) -> dict[int, Any]:
    """``fn(*args)`` on ``num_processes`` workers; their return values by rank.

    ``fn`` must be importable by name (a module-level function): workers are spawned.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # the launcher: only with workers
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = threads_per_process or max(1, (os.cpu_count() or 1) // num_processes)
    port = _free_port()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=num_processes,
                          run_id=uuid.uuid4().hex, rdzv_backend="static",
                          rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0},
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    try:
        return elastic_launch(config, entrypoint=_worker)(fn, args, backend, timeout_s, threads)
    except ChildFailedError as e:
        # the cause first: the others usually follow from it (a collective with a dead peer)
        ordered = sorted(e.failures.items(), key=lambda kv: (_is_follow_on(kv[1]), kv[1].timestamp, kv[0]))
        failed = "; then ".join(_describe(rank, f) for rank, f in ordered)
        raise WorkerError(f"{getattr(fn, '__name__', fn)} on {num_processes} processes failed: {failed}. "
                          "The other workers were stopped") from None
