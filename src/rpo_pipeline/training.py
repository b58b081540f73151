"""The project's one training loop (SFT, reward model, DPO and RPO plug their losses into it).

Kedro-free. ``train`` takes a model, a list of items, a ``collate`` that turns items into a batch
dict and a ``loss_fn(model, batch) -> (loss, metrics)``; it runs AdamW with warmup + decay,
gradient accumulation and clipping over length-bucketed batches, seeded, with a progress bar,
optional bf16 autocast, periodic evaluation, and atomic checkpoints it can resume from exactly
(weights, optimizer, scheduler, RNG and position in the data order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import get_scheduler

from rpo_pipeline.batching import iterate_batches, length_bucketed_batches
from rpo_pipeline.params import Device, NonNegInt, TrainParams
from rpo_pipeline.precision import resolve_precision

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class TrainConfig(TrainParams):
    """The loop's settings: a stage's ``train`` block (validated, see ``params``), its device and
    the loop features it uses. No field has a default: every value comes from conf/base, and a
    stage whose block lacks a feature (the reward model has no checkpoints) turns it off with
    ``LOOP_FEATURES_OFF``. ``train`` reads the number of processes from the process group it runs
    in; ``num_processes`` is how many workers the caller starts (``jobs.fit``).
    """

    device: Device  # auto | cpu | cuda | cuda:N
    eval_every: NonNegInt  # run eval_fn every N steps (and at the end); 0: only at the end
    patience: NonNegInt  # >0: stop after that many evaluations without a lower eval loss and keep
                         # the weights of the best one (early stopping); 0: off
    checkpoint_every: NonNegInt  # 0: no checkpoints
    checkpoint_dir: str | None
    resume: bool  # continue from checkpoint_dir/last if it exists

    @classmethod
    def of(cls, block: TrainParams, device: str, **overrides: Any) -> TrainConfig:
        """A stage's validated ``train`` block on ``device``, features it lacks turned off (the
        block's own keys that are not the loop's, e.g. SFT's ``responses``, stay with the stage)."""
        loop = {k: v for k, v in block.model_dump().items() if k in cls.model_fields}
        return cls(**{**LOOP_FEATURES_OFF, **loop, "device": device, **overrides})


# What a stage without periodic evaluation, early stopping or checkpoints runs with.
LOOP_FEATURES_OFF: dict[str, Any] = {"eval_every": 0, "patience": 0, "checkpoint_every": 0,
                                     "checkpoint_dir": None, "resume": False}


@dataclass
class TrainResult:
    history: dict[str, list[float]] = field(default_factory=dict)  # metric -> value per log step
    log_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    items_per_second: float = 0.0
    precision: str = "fp32"  # what ran: fp32, or bf16 / fp16 autocast
    snapshots: dict[int, Any] = field(default_factory=dict)  # step -> what ``snapshot_fn`` returned
    steps: int = 0  # optimizer steps taken (fewer than cfg.steps when early stopping stopped)
    best_step: int | None = None  # early stopping: the evaluation whose weights were kept


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_device(name: str) -> torch.device:
    """``resolve_device``, except that ``cuda`` in a process group means this rank's GPU."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


CHECKPOINT_STATE = "trainer_state.json"  # step, world size and history; accelerate writes the rest


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless ``torch.distributed`` is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: list[int], rank: int, world_size: int) -> tuple[list[int], float]:
    """This rank's contiguous part of a global batch and its loss weight.

    Parts differ in size by at most one. DDP averages gradients over ranks, so scaling each rank's
    mean loss by ``world_size * n_rank / n`` makes the update that of the mean over the whole global
    batch: N processes step exactly like 1 process with the same ``batch_size``. A rank
    whose part is empty (a global batch smaller than the world) gets one item with weight 0, so
    that it still takes part in the gradient all-reduce.
    """
    if world_size == 1:
        return batch, 1.0
    bounds = [len(batch) * r // world_size for r in range(world_size + 1)]
    part = batch[bounds[rank]:bounds[rank + 1]]
    if not part:
        return batch[:1], 0.0
    return part, world_size * len(part) / len(batch)


def _all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum ``values`` (the same keys on every rank) over all ranks."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def save_checkpoint(accelerator, directory: str | Path, step: int, result: TrainResult,
                    provenance: Mapping[str, Any] | None = None) -> None:
    """Atomically replace ``directory/last`` with accelerate's state (weights, optimizer,
    scheduler, each rank's RNG) and ``trainer_state.json`` (step, world size, history, and the
    ``provenance`` a resume must match).

    Every rank writes into one temporary sibling directory; rank 0 swaps it in once all are done.
    """
    last = Path(directory) / "last"
    tmp = last.with_name(f".last.tmp-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({
            "step": step, "world_size": accelerator.num_processes, "history": result.history,
            "log_steps": result.log_steps, "provenance": dict(provenance or {})}))
        old = last.with_name(f".last.old-{step}")
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def provenance_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Each key whose value differs between a checkpoint's provenance and this run's, as
    ``key: stored -> current`` (digests shortened)."""
    def show(v: Any) -> str:
        return "absent" if v is None else (f"{v[:12]}..." if isinstance(v, str) and len(v) == 32 else repr(v))
    return [f"{k}: {show(stored.get(k))} -> {show(current.get(k))}"
            for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]


def load_checkpoint(accelerator, model: torch.nn.Module, last: Path, result: TrainResult,
                    provenance: Mapping[str, Any] | None = None) -> int:
    """Restore accelerate's state from ``last`` into the prepared objects; the step to go on from.

    The checkpoint must come from the same run: with ``provenance`` (start model, data, parameters
    that change results; ``jobs.provenance``) every entry must equal the stored one, else a
    ``ValueError`` names each that differs. It must come from the same number of processes (DDP's
    saved keys, the per-rank RNG files and the data shards depend on it), and its weights must match
    the model: accelerate loads them non-strictly (tied weights are saved once), so the keys are
    checked here.
    """
    state = json.loads((last / CHECKPOINT_STATE).read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{last}: the checkpoint was written by {state['world_size']} processes; "
                         f"resume with num_processes: {state['world_size']} (this run has "
                         f"{accelerator.num_processes}) or set resume: false")
    if provenance is not None and not state.get("provenance"):
        log.warning("%s: the checkpoint records nothing of the run that wrote it; resuming unchecked", last)
    elif provenance is not None:
        differs = provenance_differences(state["provenance"], provenance)
        if differs:
            raise ValueError(f"{last}: the checkpoint comes from another run, so resuming would mix two "
                             f"runs; it differs in {'; '.join(differs)}. Set resume: false to start "
                             "over, or restore the settings it was written with")
    with safe_open(str(last / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    expected = set(model.state_dict())
    tied = {k for k in expected - saved if "lm_head" in k or k.endswith("wte.weight")
            or "embed_tokens" in k}
    if saved - expected or expected - saved - tied:
        raise ValueError(f"{last}: checkpoint does not match the model (missing "
                         f"{sorted(expected - saved - tied)[:3]}, unexpected {sorted(saved - expected)[:3]})")
    accelerator.load_state(str(last), strict=False)
    result.history, result.log_steps = state["history"], state["log_steps"]
    return int(state["step"])


def make_accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` for ``cfg``: device, gradient accumulation, mixed precision
    (``precision.resolve_precision``: bf16 / fp16 autocast only where chosen), and DDP or FSDP
    when the process group has >1 rank.

    The scheduler steps once per optimizer step (``step_scheduler_with_optimizer=False``): ``steps``
    counts optimizer steps whatever the number of processes.
    """
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    _, size = world()
    if size > 1 and cfg.strategy == "fsdp" and device.type == "cpu":
        # accelerate shards with FSDP only on accelerators; on CPU it would quietly run DDP
        raise ValueError("train.strategy = 'fsdp' needs GPUs (or another accelerator): on the "
                         "CPU accelerate would silently fall back to DDP; use strategy: ddp")
    fsdp = FullyShardedDataParallelPlugin() if size > 1 and cfg.strategy == "fsdp" else None
    # accelerate keeps the mixed precision and the accumulation plugin in process-wide singletons
    # that refuse a second, different Accelerator; stages run one after another in a process, each
    # with its own settings, so each starts from a fresh state (the process group, in PartialState,
    # is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=device.type == "cpu",
                       mixed_precision="no" if precision == "fp32" else precision,
                       gradient_accumulation_steps=cfg.grad_accum,
                       step_scheduler_with_optimizer=False, fsdp_plugin=fsdp,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


@contextlib.contextmanager
def deterministic_kernels(device: torch.device):
    """On a CPU, torch's deterministic kernels for the block (restored afterwards).

    Some CPU backward kernels accumulate in parallel in an order that can change from run to run
    (scatter-adds such as ``index_put_`` with ``accumulate=True``; on 2 threads one gave weights
    differing in the last bits between two identical RPO rounds in one process). Their
    deterministic versions cost little on a CPU and make the same command give the same numbers
    (``make reproduce``). On CUDA the fast kernels are kept (deterministic ones
    need ``CUBLAS_WORKSPACE_CONFIG`` and cost speed).
    """
    if device.type != "cpu":
        yield
        return
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def train(model: torch.nn.Module, items: Sequence[Any], lengths: Sequence[int],
          collate: Callable[[list[Any]], Batch], loss_fn: LossFn, cfg: TrainConfig,
          desc: str = "train", eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          snapshot_steps: Sequence[int] = (),
          snapshot_fn: Callable[[torch.nn.Module], Any] | None = None,
          provenance: Mapping[str, Any] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; return the logged history.

    Runs on ``accelerate.Accelerator``; inside a ``torch.distributed`` process group of N ranks
    (``distributed.run_workers``) it is data parallel: every step takes ``grad_accum`` global
    batches of ``batch_size`` items from one seeded, length-bucketed order, and each rank trains
    on its ``shard`` (so the steps do not depend on N). Logged metrics are means over the global
    batch; ``items_per_second`` counts the items of all ranks. ``eval_fn(model) -> metrics`` runs
    every ``cfg.eval_every`` steps and at the end on every rank (see ``evaluate``); its metrics are
    logged with an ``eval_`` prefix. After each of ``snapshot_steps`` (on rank 0)
    ``result.snapshots[step] = snapshot_fn(model)``: the intermediate policies of the
    over-optimisation curves. With ``cfg.patience`` > 0 training stops once that many evaluations
    in a row brought no lower ``loss`` from ``eval_fn``, and the weights of the best evaluation are
    restored (``result.best_step``; the schedule still spans ``cfg.steps``). A non-finite loss or
    gradient norm stops training (``FloatingPointError``) before the optimizer step, so the
    weights and the last checkpoint stay the last good state.
    """
    with deterministic_kernels(resolve_device(cfg.device)):
        return _train(model, items, lengths, collate, loss_fn, cfg, desc, eval_fn,
                      snapshot_steps, snapshot_fn, provenance)


def _train(model: torch.nn.Module, items: Sequence[Any], lengths: Sequence[int],
           collate: Callable[[list[Any]], Batch], loss_fn: LossFn, cfg: TrainConfig,
           desc: str, eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None,
           snapshot_steps: Sequence[int] = (),
           snapshot_fn: Callable[[torch.nn.Module], Any] | None = None,
           provenance: Mapping[str, Any] | None = None) -> TrainResult:
    """``train``'s loop."""
    rank, size = world()
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ran = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    result, start = TrainResult(precision=ran), 0
    last = Path(cfg.checkpoint_dir) / "last" if cfg.checkpoint_dir else None
    if cfg.resume and last is not None and (last / CHECKPOINT_STATE).exists():
        start = load_checkpoint(accelerator, accelerator.unwrap_model(wrapped), last, result, provenance)
    result.steps = start
    # batch_size is global (as nanoGPT keeps its total batch): the number of processes splits the
    # work of a step, it does not change the step
    # with a token budget, each item's size is its packed tokens (prompt once + responses)
    tokens = ([int(collate([it])["packed_ids"].shape[1]) for it in items]
              if cfg.max_tokens_per_batch else None)
    batches = iterate_batches(len(items), lengths, cfg.batch_size, cfg.seed, tokens,
                              cfg.max_tokens_per_batch)
    for _ in range(start * cfg.grad_accum):  # same data order as an uninterrupted run
        next(batches)
    window: dict[str, float] = defaultdict(float)
    window_steps, seen, t0 = 0, 0, time.perf_counter()
    best_loss, best_state, evals_since_best = math.inf, None, 0
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not cfg.progress or rank > 0,
               dynamic_ncols=True)

    for step in range(start + 1, cfg.steps + 1):
        # forward/backward over grad_accum micro-batches (gradients synchronised on the last)
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = defaultdict(float)
        for _ in range(cfg.grad_accum):
            _, idx = next(batches)
            part, weight = shard(idx, rank, size)
            batch = to_device(collate([items[i] for i in part]), device)
            if size > 1:
                batch["shard_weight"] = weight  # for per-token means (losses.token_mean)
            with accelerator.accumulate(wrapped):
                with accelerator.autocast():
                    loss, metrics = loss_fn(wrapped, batch)
                accelerator.backward(loss if size == 1 else loss * weight)
            share = 1.0 if size == 1 else weight / size  # this rank's share of the global mean
            step_metrics["loss"] += share * loss.item() / cfg.grad_accum
            for k, v in metrics.items():
                step_metrics[k] += share * v / cfg.grad_accum
            seen += len(idx)
        if size > 1:
            step_metrics = defaultdict(float, _all_reduce_sum(step_metrics, device))
        if not math.isfinite(step_metrics["loss"]):
            raise FloatingPointError(
                f"{desc}: loss is {step_metrics['loss']} at step {step}; stopped before the "
                f"optimizer step (last good checkpoint: {last if last and last.exists() else 'none'})")

        # clip, step, schedule (a non-finite gradient stops training like a non-finite loss)
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
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
        stop = False
        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                    or step == cfg.steps):
            evaluated = eval_fn(accelerator.unwrap_model(wrapped))
            for k, v in evaluated.items():
                result.history.setdefault(f"eval_{k}", []).append(v)
            result.history.setdefault("eval_step", []).append(step)
            wrapped.train()
            if cfg.patience:  # every rank sees the same (all-reduced) loss, so all stop together
                if evaluated["loss"] < best_loss:
                    best_loss, result.best_step, evals_since_best = evaluated["loss"], step, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                                  accelerator.unwrap_model(wrapped).state_dict().items()}
                else:
                    evals_since_best += 1
                    stop = evals_since_best >= cfg.patience
        if last is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0
                                                          or step == cfg.steps):
            save_checkpoint(accelerator, cfg.checkpoint_dir, step, result, provenance)
        if snapshot_fn is not None and step in snapshot_steps and rank == 0:
            result.snapshots[step] = snapshot_fn(accelerator.unwrap_model(wrapped))
        bar.update(1)
        result.steps = step
        if stop:
            break

    bar.close()
    if best_state is not None:
        accelerator.unwrap_model(wrapped).load_state_dict(best_state)
    accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - t0
    result.items_per_second = seen / max(result.seconds, 1e-9)
    accelerator.free_memory()
    return result


@torch.inference_mode()
def evaluate(model: torch.nn.Module, items: Sequence[Any], lengths: Sequence[int],
             collate: Callable[[list[Any]], Batch], loss_fn: LossFn, batch_size: int,
             device: str = "auto") -> dict[str, float]:
    """Item-weighted mean of the loss and metrics over ``items`` (eval mode, no grad).

    In a process group every rank takes every N-th batch of the same length-sorted list and the
    sums are all-reduced, so each batch is computed as in one process (only the order of the final
    sum differs).
    """
    rank, size = world()
    dev = local_device(device)
    was_training = model.training
    model.to(dev).eval()
    totals: dict[str, float] = defaultdict(float)
    totals["loss"] = 0.0
    for idx in length_bucketed_batches(lengths, batch_size, seed=0, shuffle=False)[rank::size]:
        loss, metrics = loss_fn(model, to_device(collate([items[i] for i in idx]), dev))
        totals["loss"] += loss.item() * len(idx)
        for k, v in metrics.items():
            totals[k] += v * len(idx)
    if size > 1:
        totals = _all_reduce_sum(_same_keys(totals), dev)
    model.train(was_training)
    return {k: v / max(len(items), 1) for k, v in totals.items()}


def _same_keys(totals: dict[str, float]) -> dict[str, float]:
    """Every rank's metric names (a rank with no batch has only ``loss``), zero where missing."""
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(totals))
    return {k: totals.get(k, 0.0) for k in sorted(set().union(*names))}
