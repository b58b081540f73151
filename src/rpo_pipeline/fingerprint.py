"""Content fingerprints for the project's caches (SFT model, reference log-probs, reward model).

A fingerprint is a BLAKE2b hex digest over a sequence of parts: mappings (canonical JSON), strings,
numbers, DataFrames (their content, list columns included) and directories (file names + bytes).
Equal inputs give equal fingerprints in any process; any change to any part changes it.

Caches store the fingerprint next to what it describes; a stage recomputes only when the
fingerprint of its inputs differs from the stored one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rpo_pipeline.sources import hub_revision
from rpo_pipeline.tracking import MetricsPayload, scalars

FINGERPRINT_FILE = "fingerprint.json"
log = logging.getLogger(__name__)


def _feed(h: Any, path: str | Path) -> None:
    """Add one file's bytes to the digest ``h``, 1 MiB at a time."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def hash_bytes(data: bytes) -> str:
    """Digest of a byte string."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str | Path) -> str:
    """Digest of one file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, path)
    return h.hexdigest()


def file_record(path: str | Path, exclude: tuple[str, ...] = (FINGERPRINT_FILE,)
                ) -> dict[str, dict[str, Any]]:
    """Each file under ``path`` (relative name) -> its size and digest: what a cache stores next
    to its fingerprint, so that damaged bytes make it a miss (``damaged_file``)."""
    root = Path(path)
    return {str(f.relative_to(root)): {"size": f.stat().st_size, "blake2b": hash_file(f)}
            for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude)}


def damaged_file(path: str | Path, record: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why the files under ``path`` no longer match ``file_record``'s ``record`` (naming the first
    file that differs), or None when every recorded file has its size and digest."""
    root = Path(path)
    for name, stored in record.items():
        f = root / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != stored["size"]:
            return f"{f} has {f.stat().st_size} bytes, {stored['size']} when it was stored"
        if hash_file(f) != stored["blake2b"]:
            return f"{f} does not match the digest stored with it"
    return None


def hash_dir(path: str | Path, exclude: tuple[str, ...] = (FINGERPRINT_FILE,)) -> str:
    """Digest of every file under ``path`` (relative names and bytes), in sorted order; the stored
    fingerprint is not content."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory to fingerprint")
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude):
        h.update(str(f.relative_to(root)).encode() + b"\x00")
        _feed(h, f)
        h.update(b"\x01")
    return h.hexdigest()


def model_source(name_or_path: str) -> Any:
    """A fingerprint part for a model given as a local directory (its bytes) or as a Hub id (the id
    and the revision it resolves to, ``sources.hub_revision``)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    return {"hub_id": name_or_path, "revision": hub_revision(name_or_path)}


def hash_frame(df: pd.DataFrame) -> str:
    """Digest of a table's columns, dtypes and values (list/array cells included), row order kept."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(len(df)).encode())
    for col in df.columns:
        h.update(f"\x00{col}:{df[col].dtype}\x00".encode())
        values = df[col].tolist()
        if values and isinstance(values[0], list | tuple | np.ndarray):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
            h.update(lengths.tobytes())
            flat = np.concatenate([np.asarray(v) for v in values]) if len(values) else np.array([])
            h.update(str(flat.dtype).encode() + np.ascontiguousarray(flat).tobytes())
        else:
            h.update(json.dumps(values, default=str).encode())
    return h.hexdigest()


def _part(h: Any, part: Any) -> None:
    if isinstance(part, pd.DataFrame):
        h.update(b"frame:" + hash_frame(part).encode())
    elif isinstance(part, Path):
        h.update(b"dir:" + hash_dir(part).encode())
    elif isinstance(part, Mapping | list | tuple | str | int | float | bool) or part is None:
        h.update(b"json:" + json.dumps(part, sort_keys=True, default=str).encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(part).__name__}")
    h.update(b"\x1e")


def fingerprint(*parts: Any) -> str:
    """Digest of all ``parts`` in order (see the module docstring for what a part can be)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        _part(h, p)
    return h.hexdigest()


# Parameters that change how a run reports, not what it computes.
COSMETIC_KEYS = frozenset({"progress", "log_every"})


def result_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without cosmetic keys (at any depth), for fingerprints."""
    return {k: result_params(v) if isinstance(v, Mapping) else v
            for k, v in params.items() if k not in COSMETIC_KEYS}


@dataclass(frozen=True)
class Fingerprinted:
    """A value to store together with the fingerprint of the inputs that produced it."""

    value: Any
    fingerprint: str


@dataclass(frozen=True)
class CacheHit:
    """The stored value already matches ``fingerprint``: saving it is a no-op."""

    fingerprint: str


class CachedStage:
    """The cache check every cached stage makes (SFT, reference log-probs, reward model, reward
    scores): started when the node starts, it compares the fingerprint of the stage's inputs with
    the stored one and, on a match, gives what the node returns instead of computing.

    ``hit_key`` / ``seconds_key`` name the stage's MLflow metrics (``reference.sft_cache_hit``,
    ``reward_model.seconds``, ...: contracts, so they stay as each stage first named them)::

        stage = CachedStage("SFT", hit_key="sft_cache_hit", seconds_key="sft_seconds")
        fp = fingerprint(...)
        if (hit := stage.reuse(fp, stored_fingerprint)) is not None:
            return hit                      # (CacheHit(fp), {sft_cache_hit: 1, sft_seconds: s})
        ...                                 # compute
        return Fingerprinted(value, fp), stage.computed({"sft_val_loss": ...})
    """

    def __init__(self, what: str, *, hit_key: str = "cache_hit",
                 seconds_key: str = "cache_seconds") -> None:
        self.what, self.hit_key, self.seconds_key = what, hit_key, seconds_key
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def reuse(self, fp: str, stored: str | None) -> tuple[CacheHit, MetricsPayload] | None:
        """``(CacheHit(fp), metrics)`` when ``stored`` is ``fp`` (logged), else None."""
        if fp != stored:
            return None
        seconds = self.seconds()
        log.info("%s cache hit (%s): reusing the stored result, %.3f s", self.what, fp[:12], seconds)
        return CacheHit(fp), scalars({self.hit_key: 1, self.seconds_key: seconds})

    def computed(self, metrics: dict[str, float]) -> MetricsPayload:
        """The metrics of a run that computed: ``metrics`` + ``hit_key: 0`` + ``seconds_key``."""
        return scalars({self.hit_key: 0, **metrics, self.seconds_key: self.seconds()})
