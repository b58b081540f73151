"""Numeric precision per device, chosen by a rule on the device's facts, never by a timing.

Kedro-free. ``precision: auto`` is a pure function of what the device *is*:

* CUDA with bf16 support (Ampere and newer): bf16 autocast;
* everything else, every CPU included: fp32.

bf16 on a CPU is an explicit choice (``precision: bf16``, or an env that sets it). A CPU with
AVX-512-BF16 or AMX runs a bf16 matmul 3-4x faster than fp32, an AVX2-only CPU ~80x slower; either
way bf16 changes the results, and the same command must give the same numbers on every machine of
one CPU class. fp16 needs loss scaling and can overflow, so it is only used when asked for, on CUDA.

``choose_precision`` takes a ``DeviceFacts`` and is tested for every kind of device without the
hardware; ``device_facts`` reads them off this machine (no measurement) and ``resolve_precision``
combines the two. The facts are logged with every run (``hooks.TagRuns``) and the resolved
precision is part of the SFT, reference-cache and reward-model fingerprints.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rpo_pipeline.params import PRECISIONS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs with native bf16 matmuls (informational: auto never picks bf16 on a CPU)
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceFacts:
    """What decides the precision of a device: its type, whether a CUDA device has bf16, and for a
    CPU the kernel capability torch dispatches to (``torch.backends.cpu.get_cpu_capability()``:
    ``AVX2``, ``AVX512``, ...) and the bf16 instructions it has (``avx512_bf16``, ``amx_bf16``)."""

    device_type: str
    cuda_bf16: bool = False
    cpu_capability: str = ""
    cpu_bf16_flags: tuple[str, ...] = ()

    @property
    def cpu_native_bf16(self) -> bool:
        return bool(self.cpu_bf16_flags)


def choose_precision(requested: str, facts: DeviceFacts) -> str:
    """The precision to run: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: bf16 on a CUDA device with bf16, fp32 everywhere else (on every CPU, whatever its
    bf16 speed). An explicit choice is kept where the device can run it and refused (ValueError
    naming the setting) where it cannot: fp16 autocast needs CUDA, and bf16 on a CUDA device
    without bf16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision = {requested!r}: must be one of {list(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if facts.device_type == "cuda" and facts.cuda_bf16 else "fp32"
    if requested == "fp16" and facts.device_type != "cuda":
        raise ValueError(f"precision = 'fp16' needs a CUDA device (this one is {facts.device_type}): "
                         "use fp32, bf16 or auto")
    if requested == "bf16" and facts.device_type == "cuda" and not facts.cuda_bf16:
        raise ValueError("precision = 'bf16': this GPU has no bf16 support; use fp16, fp32 or auto")
    return requested


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native-bf16 instruction flags (``CPU_BF16_FLAGS``) this CPU reports (none where
    ``cpuinfo`` cannot be read, e.g. not on Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def device_facts(device: torch.device) -> DeviceFacts:
    """This machine's facts for ``device`` (read, not measured; the CPU's are always included,
    since they decide the fp32 kernels' summation order and so the last digits of the results)."""
    return DeviceFacts(device_type=device.type,
                       cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
                       cpu_capability=torch.backends.cpu.get_cpu_capability(),
                       cpu_bf16_flags=cpu_bf16_flags())


def resolve_precision(requested: str, device: torch.device) -> str:
    """``choose_precision`` with this machine's facts for ``device``."""
    facts = device_facts(device)
    chosen = choose_precision(requested, facts)
    if requested == "auto" and device.type == "cpu" and facts.cpu_native_bf16:
        _note_native_bf16(facts.cpu_bf16_flags)
    return chosen


@functools.cache
def _note_native_bf16(flags: tuple[str, ...]) -> None:
    """Say once per process that ``auto`` kept fp32 on a CPU that runs bf16 fast."""
    log.info("precision auto on a CPU with native bf16 (%s) -> fp32; set precision: bf16 for its "
             "faster matmuls, with other numbers (README, Speed)", ",".join(flags))
