"""Numeric precision per device: float32, or bf16 / fp16 autocast where the hardware runs it fast.

Kedro-free. ``precision: auto`` must not assume: a CPU without native bf16 (AVX2 only) runs a bf16
matmul ~80x slower than fp32 (measured on the 2-core development machine: 0.8 against 69 GFLOP/s),
while one with AMX or AVX512-BF16 runs it several times faster. So on CPU ``auto`` *measures*: one
small fp32 and one bf16 matmul, timed once per process (``cpu_matmul_gflops``; ~0.1 s on the slow
machine, cached), and picks bf16 only when it is faster. Querying the ISA (``torch.backends.cpu.
get_cpu_capability()``) would be cheaper but says nothing about the oneDNN kernels torch actually
has for it, which is what decides the speed. On CUDA ``auto`` is bf16 where the GPU supports it
(Ampere and newer), else float32: fp16 needs loss scaling and can overflow, so it is only used when
asked for.

``choose_precision`` is a pure function of the facts it is given, so it is tested without the
hardware; ``resolve_precision`` gathers the facts for a device.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from rpo_pipeline.params import PRECISIONS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# auto takes bf16 on a CPU only when its matmul is this much faster than fp32: a near tie is not
# worth the lost precision, and a margin keeps a noisy measurement from flipping the choice (and
# so the metrics) between two runs on the same machine
BF16_MARGIN = 1.5
log = logging.getLogger(__name__)


def choose_precision(requested: str, device_type: str, *, cuda_bf16: bool = False,
                     cpu_gflops: dict[str, float] | None = None) -> str:
    """The precision to run: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: CUDA -> bf16 if ``cuda_bf16`` else fp32; CPU -> bf16 if its measured bf16 matmul
    (``cpu_gflops["bf16"]``) is more than ``BF16_MARGIN`` times as fast as fp32, else fp32; other
    devices -> fp32. An explicit
    choice is kept where the device can run it, and refused (ValueError naming the setting) where
    it cannot: fp16 autocast needs CUDA, and bf16 on a CUDA device without bf16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision = {requested!r}: must be one of {list(PRECISIONS)}")
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if cuda_bf16 else "fp32"
        if device_type == "cpu" and cpu_gflops and (
                cpu_gflops["bf16"] > BF16_MARGIN * cpu_gflops["fp32"]):
            return "bf16"
        return "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise ValueError(f"precision = 'fp16' needs a CUDA device (this one is {device_type}): "
                         "use fp32, bf16 or auto")
    if requested == "bf16" and device_type == "cuda" and not cuda_bf16:
        raise ValueError("precision = 'bf16': this GPU has no bf16 support; use fp16, fp32 or auto")
    return requested


@functools.cache
def cpu_matmul_gflops(size: int = 256, repeats: int = 3) -> dict[str, float]:
    """Measured GFLOP/s of a ``size``³ matmul on this CPU in float32 and bfloat16 (best of
    ``repeats``, after one warm-up), with the process's torch threads."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
        a @ a  # warm-up (kernel selection, caches)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * size**3 / best / 1e9
    return out


def resolve_precision(requested: str, device: torch.device) -> str:
    """``choose_precision`` with this machine's facts (the CPU is measured only for ``auto``)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    speeds = cpu_matmul_gflops() if requested == "auto" and device.type == "cpu" else None
    chosen = choose_precision(requested, device.type, cuda_bf16=cuda_bf16, cpu_gflops=speeds)
    if speeds:
        log.info("precision auto on cpu: matmul fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s -> %s",
                 speeds["fp32"], speeds["bf16"], chosen)
    return chosen
