"""The project's one training loop (SFT, reward model, DPO and RPO plug their losses into it).

Kedro-free. ``train`` takes a model, a list of items, a ``collate`` that turns items into a batch
dict and a ``loss_fn(model, batch) -> (loss, metrics)``; it runs AdamW with warmup + decay,
gradient accumulation and clipping over length-bucketed batches, seeded, with a progress bar,
optional bf16 autocast, periodic evaluation, and atomic checkpoints it can resume from exactly
(weights, optimizer, scheduler, RNG and position in the data order).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from rpo_pipeline.atomic import atomic_dir
from rpo_pipeline.batching import iterate_batches, length_bucketed_batches
from rpo_pipeline.params import Device, NonNegInt, TrainParams

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class TrainConfig(TrainParams):
    """The loop's settings: a stage's ``train`` block (validated, see ``params``) and its device.

    Periodic evaluation, bf16 autocast, checkpoints and resume are off unless the stage's
    parameters turn them on (DPO and RPO: ``PolicyTrainParams``); the other fields have no default.
    """

    device: Device  # auto | cpu | cuda | cuda:N
    eval_every: NonNegInt = 0  # run eval_fn every N steps (and at the end); 0: only at the end
    bf16: bool = False  # bfloat16 autocast, where the device supports it (CUDA with bf16)
    checkpoint_every: NonNegInt = 0  # 0: no checkpoints
    checkpoint_dir: str | None = None
    resume: bool = False  # continue from checkpoint_dir/last if it exists


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


CHECKPOINT_STATE = "trainer_state.pt"


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer, scheduler, step: int,
                    result: TrainResult) -> None:
    """Atomically write ``directory/last``: weights (save_pretrained) + optimizer, scheduler, RNG."""
    with atomic_dir(Path(directory) / "last") as tmp:
        model.save_pretrained(str(tmp))
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "history": result.history, "log_steps": result.log_steps},
                   tmp / CHECKPOINT_STATE)
        (tmp / "step.json").write_text(json.dumps({"step": step}))


def load_checkpoint_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load save_pretrained weights into ``model`` in place (a peft adapter or a full model)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        return
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")),
                                                strict=False)
    model.tie_weights()
    tied = {k for k in missing if "lm_head" in k or k.endswith("wte.weight")}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{directory}: checkpoint does not match the model (missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")


def train(model: torch.nn.Module, items: Sequence[Any], lengths: Sequence[int],
          collate: Callable[[list[Any]], Batch], loss_fn: LossFn, cfg: TrainConfig,
          desc: str = "train", eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
          ) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; return the logged history.

    ``eval_fn(model) -> metrics`` runs every ``cfg.eval_every`` steps and at the end; its metrics
    are logged with an ``eval_`` prefix. A non-finite loss or gradient norm stops training
    (``FloatingPointError``) before the optimizer step, so the weights and the last checkpoint stay
    the last good state.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    result, start = TrainResult(), 0
    last = Path(cfg.checkpoint_dir) / "last" if cfg.checkpoint_dir else None
    if cfg.resume and last is not None and (last / CHECKPOINT_STATE).exists():
        state = torch.load(last / CHECKPOINT_STATE, weights_only=True)
        load_checkpoint_weights(model, last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, result.history, result.log_steps = state["step"], state["history"], state["log_steps"]
    batches = iterate_batches(len(items), lengths, cfg.batch_size, cfg.seed)
    for _ in range(start * cfg.grad_accum):  # same data order as an uninterrupted run
        next(batches)
    autocast = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    window: dict[str, float] = defaultdict(float)
    window_steps, seen, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not cfg.progress,
               dynamic_ncols=True)

    for step in range(start + 1, cfg.steps + 1):
        # forward/backward over grad_accum micro-batches
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = defaultdict(float)
        for _ in range(cfg.grad_accum):
            _, idx = next(batches)
            batch = to_device(collate([items[i] for i in idx]), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, metrics = loss_fn(model, batch)
            (loss / cfg.grad_accum).backward()
            step_metrics["loss"] += loss.item() / cfg.grad_accum
            for k, v in metrics.items():
                step_metrics[k] += v / cfg.grad_accum
            seen += len(idx)
        if not math.isfinite(step_metrics["loss"]):
            raise FloatingPointError(
                f"{desc}: loss is {step_metrics['loss']} at step {step}; stopped before the "
                f"optimizer step (last good checkpoint: {last if last and last.exists() else 'none'})")

        # clip, step, schedule (a non-finite gradient stops training like a non-finite loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if not math.isfinite(float(grad_norm)):
            raise FloatingPointError(
                f"{desc}: gradient norm is {float(grad_norm)} at step {step} (loss "
                f"{step_metrics['loss']:.4g}); stopped before the optimizer step (last good "
                f"checkpoint: {last if last and last.exists() else 'none'})")
        optimizer.step()
        scheduler.step()

        # bookkeeping: logs, evaluation, checkpoint
        step_metrics["grad_norm"] = float(grad_norm)
        step_metrics["learning_rate"] = scheduler.get_last_lr()[0]
        for k, v in step_metrics.items():
            window[k] += v
        window_steps += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = seen / (time.perf_counter() - t0)
            window["items_per_second"] = rate * window_steps
            for k, v in window.items():
                result.history.setdefault(k, []).append(v / window_steps)
            result.log_steps.append(step)
            bar.set_postfix(loss=f"{window['loss'] / window_steps:.4f}", items_s=f"{rate:.0f}")
            window, window_steps = defaultdict(float), 0
        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                    or step == cfg.steps):
            for k, v in eval_fn(model).items():
                result.history.setdefault(f"eval_{k}", []).append(v)
            result.history.setdefault("eval_step", []).append(step)
            model.train()
        if last is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0
                                                          or step == cfg.steps):
            save_checkpoint(cfg.checkpoint_dir, model, optimizer, scheduler, step, result)
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
