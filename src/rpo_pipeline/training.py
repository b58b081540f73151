"""The project's one training loop (SFT, reward model, DPO and RPO plug their losses into it).

Kedro-free. ``train`` takes a model, a list of items, a ``collate`` that turns items into a batch
dict and a ``loss_fn(model, batch) -> (loss, metrics)``; it runs AdamW with warmup + decay,
gradient accumulation and clipping over length-bucketed batches, seeded, with a progress bar.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from rpo_pipeline.batching import iterate_batches, length_bucketed_batches

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 32  # items per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0
    schedule: str = "cosine"  # any transformers scheduler name: linear, cosine, constant_with_warmup
    weight_decay: float = 0.0  # not applied to biases and norms
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """Build from a parameter dict; unknown keys fail with the list of valid ones."""
        valid = {f.name for f in fields(cls)}
        merged = {**params, **overrides}
        unknown = sorted(set(merged) - valid)
        if unknown:
            raise ValueError(f"unknown training parameters {unknown}; valid: {sorted(valid)}")
        return cls(**merged)


@dataclass
class TrainResult:
    history: dict[str, list[float]] = field(default_factory=dict)  # metric -> value per log step
    log_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    items_per_second: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train(model: torch.nn.Module, items: Sequence[Any], lengths: Sequence[int],
          collate: Callable[[list[Any]], Batch], loss_fn: LossFn, cfg: TrainConfig,
          desc: str = "train") -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; return the logged history."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    batches = iterate_batches(len(items), lengths, cfg.batch_size, cfg.seed)
    result = TrainResult()
    window: dict[str, float] = defaultdict(float)
    window_steps, seen, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=desc, disable=not cfg.progress, dynamic_ncols=True)

    for step in range(1, cfg.steps + 1):
        # forward/backward over grad_accum micro-batches
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = defaultdict(float)
        for _ in range(cfg.grad_accum):
            _, idx = next(batches)
            batch = to_device(collate([items[i] for i in idx]), device)
            loss, metrics = loss_fn(model, batch)
            (loss / cfg.grad_accum).backward()
            step_metrics["loss"] += loss.item() / cfg.grad_accum
            for k, v in metrics.items():
                step_metrics[k] += v / cfg.grad_accum
            seen += len(idx)
        if not math.isfinite(step_metrics["loss"]):
            raise FloatingPointError(f"{desc}: loss is {step_metrics['loss']} at step {step}")

        # clip, step, schedule
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()

        # bookkeeping
        step_metrics["grad_norm"] = float(grad_norm)
        step_metrics["learning_rate"] = scheduler.get_last_lr()[0]
        for k, v in step_metrics.items():
            window[k] += v
        window_steps += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            for k, v in window.items():
                result.history.setdefault(k, []).append(v / window_steps)
            result.log_steps.append(step)
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{window['loss'] / window_steps:.4f}", items_s=f"{rate:.0f}")
            window, window_steps = defaultdict(float), 0
        bar.update(1)

    bar.close()
    result.seconds = time.perf_counter() - t0
    result.items_per_second = seen / max(result.seconds, 1e-9)
    return result


@torch.inference_mode()
def evaluate(model: torch.nn.Module, items: Sequence[Any], lengths: Sequence[int],
             collate: Callable[[list[Any]], Batch], loss_fn: LossFn, batch_size: int,
             device: str = "auto") -> dict[str, float]:
    """Item-weighted mean of the loss and metrics over ``items`` (eval mode, no grad)."""
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    totals: dict[str, float] = defaultdict(float)
    for idx in length_bucketed_batches(lengths, batch_size, seed=0, shuffle=False):
        loss, metrics = loss_fn(model, to_device(collate([items[i] for i in idx]), dev))
        totals["loss"] += loss.item() * len(idx)
        for k, v in metrics.items():
            totals[k] += v * len(idx)
    model.train(was_training)
    return {k: v / max(len(items), 1) for k, v in totals.items()}
