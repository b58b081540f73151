"""Training jobs (SFT, reward model, DPO, RPO) that run in the caller's process or on N workers.

Kedro-free. A job is a picklable dataclass: model paths, token-id items and the stage's validated
parameters. ``fit_*(job)`` builds the model, the collate and the loss from it and runs
``training.train``; the same function runs in the node's process (``num_processes: 1``) or in every
worker of a ``torch.distributed`` group (``run_in_workers``), where ``train`` is data parallel.

With N workers the node keeps the catalog and MLflow to itself: it pickles the job into a
temporary directory it owns, the workers read it, rank 0 writes the trained weights
(``save_pretrained``) and the history there, and the node loads them back before the directory is
removed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rpo_pipeline.scoring import ResponseLogps
from rpo_pipeline.training import TrainConfig, TrainResult, evaluate, train, world

log = logging.getLogger(__name__)
Items = list[Any]  # policy.PreferencePair | ResponseGroup, reward_model.RewardPair, reference.SftExample


@dataclass
class Split:
    """Items of one split and their lengths (for length-bucketed batches)."""

    items: Items
    lengths: list[int]


@dataclass
class PolicyJob:
    """DPO or RPO from π_SFT: ``params`` is the stage's validated parameters (``model_dump``)."""

    method: str  # dpo | rpo | rpo_online (one round)
    model_path: str  # π_SFT (save_pretrained directory)
    params: dict[str, Any]
    train: Split
    val: Split  # DPO: val pairs; RPO: val groups
    val_pairs: Split | None = None  # RPO: val pairs ranked by the data's scores (rewards/* metrics)
    snapshot_steps: list[int] = field(default_factory=list)  # intermediate policies to keep


@dataclass
class RewardModelJob:
    config: Any  # reward_model.RewardModelConfig
    params: dict[str, Any]  # reward_model parameters
    train: Split
    evals: dict[str, Split] = field(default_factory=dict)  # val / test pairs, scored after training
    init_from: str | None = None  # a saved reward model to train further (``config`` unused)


@dataclass
class SftJob:
    model_path: str
    params: dict[str, Any]  # the reference parameters
    train: Split
    val: Split


def _config(train_block: dict[str, Any], device: str) -> TrainConfig:
    return TrainConfig(**train_block, device=device)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (as TRL's ``disable_dropout``, the default of its DPO and reward configs).

    In a policy, π's log-probs are then computed like the cached π_ref's, in eval mode, so the
    implicit reward starts at exactly 0 and its gradient is not noise. In any model it makes the
    gradient a function of the batch alone, so N processes take exactly the steps of one process
    (dropout masks are drawn per process)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _load_lm(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def fit_policy(job: PolicyJob, model: torch.nn.Module | None = None
               ) -> tuple[torch.nn.Module, TrainResult, dict[str, float]]:
    """π_SFT (+ LoRA, merged at the end) trained with the DPO-family or the RPO loss."""
    from peft import LoraConfig, get_peft_model

    from rpo_pipeline.base_model import lora_target_modules
    from rpo_pipeline.losses import preference_loss_fn, reward_aware_loss_fn
    from rpo_pipeline.params import DpoParams, RpoOnlineParams, RpoParams
    from rpo_pipeline.policy import group_collate, policy_collate

    schema = {"dpo": DpoParams, "rpo": RpoParams, "rpo_online": RpoOnlineParams}[job.method]
    p = schema.model_validate(job.params)
    cfg = _config(p.train.model_dump(), p.device)
    if job.method == "dpo":
        loss_fn = preference_loss_fn(p.loss, p.beta, p.label_smoothing, p.sft_weight)
        collate = policy_collate()
        batch = 2 * p.train.batch_size

        def eval_fn(m):
            return evaluate(m, job.val.items, job.val.lengths, collate, loss_fn, batch, p.device)
    else:
        loss_fn = reward_aware_loss_fn(p.distance, p.beta, p.eta, p.average_logps, p.sft_weight)
        collate, pair_collate_fn = group_collate(), policy_collate()
        pair_metrics = preference_loss_fn("sigmoid", p.beta)
        batch = p.train.batch_size
        gold = job.val_pairs

        def eval_fn(m):
            out = evaluate(m, job.val.items, job.val.lengths, collate, loss_fn, 2 * batch, p.device)
            g = evaluate(m, gold.items, gold.lengths, pair_collate_fn, pair_metrics, 4 * batch,
                         p.device)
            return out | {k: v for k, v in g.items() if k.startswith(("rewards/", "logps/"))}

    model = model if model is not None else _load_lm(job.model_path)
    if p.disable_dropout:
        disable_dropout(model)
    if p.lora.enabled:
        targets = lora_target_modules(model, p.lora.target_modules, f"{job.method}.lora.target_modules")
        torch.manual_seed(p.train.seed)  # the adapter's initialisation, the same in every process
        model = get_peft_model(model, LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha,
                                                 lora_dropout=p.lora.dropout, target_modules=targets))
    def snapshot(wrapped: torch.nn.Module) -> torch.nn.Module:
        """A CPU copy of the policy (its adapter merged)."""
        lm = copy.deepcopy(wrapped.lm).cpu()
        return lm.merge_and_unload() if p.lora.enabled else lm

    result = train(ResponseLogps(model), job.train.items, job.train.lengths, collate, loss_fn,
                   cfg, desc=job.method, eval_fn=eval_fn if job.val.items else None,
                   snapshot_steps=job.snapshot_steps, snapshot_fn=snapshot)
    if p.lora.enabled:
        model = model.merge_and_unload()
    return model.cpu(), result, {}


def fit_reward_model(job: RewardModelJob, model: torch.nn.Module | None = None
                     ) -> tuple[torch.nn.Module, TrainResult, dict[str, float]]:
    """Bradley–Terry training of LoRA + head on the (4-bit) backbone; then accuracy and loss on
    each split of ``job.evals`` (training is over: evaluating may repack the 4-bit weights)."""
    from rpo_pipeline.losses import reward_group_loss_fn, reward_pair_loss_fn
    from rpo_pipeline.params import RewardModelParams
    from rpo_pipeline.reward_model import RewardGroup, RewardModel, group_collate, pair_collate

    p = RewardModelParams.model_validate(job.params)
    cfg = _config(p.train.model_dump(), p.device)
    if model is None and job.init_from is not None:
        model = RewardModel.continue_training(job.init_from, seed=cfg.seed, device=p.device)
    elif model is None:
        model = RewardModel.for_training(job.config, seed=cfg.seed, device=p.device)
    if p.disable_dropout:
        disable_dropout(model)
    collate = pair_collate()
    loss_fn = reward_pair_loss_fn(p.center_coef)
    if any(isinstance(i, RewardGroup) for i in job.train.items):  # whole groups (or with pairs)
        train_collate, train_loss = group_collate(), reward_group_loss_fn(p.center_coef)
    else:
        train_collate, train_loss = collate, loss_fn
    members = model.config.members
    if members == 1:
        result = train(model, job.train.items, job.train.lengths, train_collate, train_loss, cfg,
                       desc="reward_model")
    else:  # one member after another, each on its bootstrap resample with its seed
        for m in range(members):
            model.select_member(m)
            mine = [(i._replace(member_weights=()), n) for i, n in zip(job.train.items, job.train.lengths,
                                                                        strict=True)
                    for _ in range(int(i.member_weights[m]) if i.member_weights else 1)]
            part = train(model, [i for i, _ in mine], [n for _, n in mine], train_collate, train_loss,
                         cfg.model_copy(update={"seed": cfg.seed + m}), desc=f"reward_model member {m}")
            result = part if m == 0 else replace(result, seconds=result.seconds + part.seconds)
        model.select_member(None)
        result.items_per_second = cfg.steps * cfg.batch_size * members / max(result.seconds, 1e-9)
    metrics: dict[str, float] = {}
    for split, data in job.evals.items():
        if data.items:
            ev = evaluate(model, data.items, data.lengths, collate, loss_fn, 2 * cfg.batch_size,
                          p.device)
            metrics[f"{split}_accuracy"], metrics[f"{split}_loss"] = ev["accuracy"], ev["loss"]
    return model, result, metrics


def fit_sft(job: SftJob, model: torch.nn.Module | None = None
            ) -> tuple[torch.nn.Module, TrainResult, dict[str, float]]:
    """Response NLL on the training examples; the val loss at the end."""
    from rpo_pipeline.losses import sft_nll
    from rpo_pipeline.params import ReferenceParams
    from rpo_pipeline.reference import sft_collate

    p = ReferenceParams.model_validate(job.params)
    cfg = _config(p.sft.model_dump(exclude={"responses"}), p.device)
    model = model if model is not None else _load_lm(job.model_path)
    collate = sft_collate()
    # whole rows, full logits: SFT weights bit-identical to before issue 13 (see ``scoring``)
    scorer = ResponseLogps(model)

    def val_loss(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(m, job.val.items, job.val.lengths, collate, sft_nll,
                        batch_size=2 * cfg.batch_size, device=p.device)

    periodic = cfg.eval_every and job.val.items
    result = train(scorer, job.train.items, job.train.lengths, collate, sft_nll, cfg, desc="sft",
                   eval_fn=val_loss if periodic else None)
    val = val_loss(scorer)  # of the weights kept (the best evaluation's under early stopping)
    return model.cpu(), result, {"val_loss": val["loss"]}


FITS: dict[str, Callable[..., tuple[torch.nn.Module, TrainResult, dict[str, float]]]] = {
    "policy": fit_policy, "reward_model": fit_reward_model, "sft": fit_sft}

JOB_FILE, MODEL_DIR, RESULT_FILE, SNAPSHOT_DIR = "job.pkl", "model", "result.json", "snapshots"


def _fit_worker(kind: str, workdir: str) -> None:
    """In each worker: the job from ``workdir``; rank 0 writes the model and the result there."""
    with open(Path(workdir) / JOB_FILE, "rb") as f:
        job = pickle.load(f)  # written a moment ago by the node that owns workdir
    model, result, metrics = FITS[kind](job)
    rank, _ = world()
    if rank == 0:
        model.save_pretrained(str(Path(workdir) / MODEL_DIR))
        for step, snap in result.snapshots.items():
            snap.save_pretrained(str(Path(workdir) / SNAPSHOT_DIR / str(step)))
        (Path(workdir) / RESULT_FILE).write_text(json.dumps({
            "history": result.history, "log_steps": result.log_steps, "seconds": result.seconds,
            "items_per_second": result.items_per_second, "precision": result.precision,
            "metrics": metrics}))


def fit_in_workers(kind: str, job: Any, num_processes: int, backend: str, device: str,
                   load: Callable[[str], torch.nn.Module], timeout_s: float = 1800.0
                   ) -> tuple[torch.nn.Module, TrainResult, dict[str, float]]:
    """``FITS[kind](job)`` on ``num_processes`` workers; the trained model (through ``load``),
    the result and the metrics, as the in-process call returns them."""
    from rpo_pipeline.distributed import resolve_backend, run_workers
    from rpo_pipeline.training import resolve_device

    backend = resolve_backend(backend, resolve_device(device).type)
    with tempfile.TemporaryDirectory(prefix=f"rpo-{kind}-") as tmp:
        with open(Path(tmp) / JOB_FILE, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        log.info("%s: training on %d processes (%s), work directory %s", kind, num_processes,
                 backend, tmp)
        run_workers(_fit_worker, (kind, tmp), num_processes, backend, timeout_s)
        out = json.loads((Path(tmp) / RESULT_FILE).read_text())
        model = load(str(Path(tmp) / MODEL_DIR))
        snaps = Path(tmp) / SNAPSHOT_DIR
        snapshots = {int(d.name): load(str(d)) for d in sorted(snaps.iterdir())} if snaps.exists() else {}
    result = TrainResult(history=out["history"], log_steps=out["log_steps"], seconds=out["seconds"],
                         items_per_second=out["items_per_second"], precision=out["precision"],
                         snapshots=snapshots)
    return model, result, out["metrics"]


def fit(kind: str, job: Any, num_processes: int, backend: str, device: str,
        model: Callable[[], torch.nn.Module], load: Callable[[str], torch.nn.Module]
        ) -> tuple[torch.nn.Module, TrainResult, dict[str, float]]:
    """In this process (``model()`` builds the model) or on ``num_processes`` workers."""
    if num_processes == 1:
        return FITS[kind](job, model())
    return fit_in_workers(kind, job, num_processes, backend, device, load)



# --------------------------------------------------------------------------------------------------
# Inference sharded by batch: reference log-probs, reward scores, sampling
# --------------------------------------------------------------------------------------------------
@dataclass
class InferenceJob:
    """``kind``: ``response_logps`` (``reference.response_logps``), ``completion_logps``
    (``evaluation.completion_logps``), ``rewards`` (``reward_model.score``) or ``generate``
    (``evaluation.generate``), of the model at ``model_path`` with ``args``."""

    kind: str
    model_path: str
    device: str
    args: dict[str, Any]
    precision: str = "fp32"  # params.PRECISIONS: bf16 / fp16 run the forward passes in autocast


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` resolved on ``device`` (``precision.resolve_precision``),
    or nothing for fp32."""
    from rpo_pipeline.precision import AUTOCAST_DTYPES, resolve_precision
    from rpo_pipeline.training import resolve_device

    dev = resolve_device(device)
    chosen = resolve_precision(precision, dev)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[chosen])


def run_inference(job: InferenceJob, model: torch.nn.Module | None = None) -> Any:
    """The job's function on this process's share of the batches (all of them in one process)."""
    from rpo_pipeline.evaluation import completion_logps, generate
    from rpo_pipeline.reference import response_logps
    from rpo_pipeline.reward_model import RewardModel, score

    if job.kind not in ("rewards", "response_logps", "completion_logps", "generate"):
        raise ValueError(f"unknown inference job {job.kind!r}")
    if job.kind == "rewards":
        model = model if model is not None else RewardModel.from_pretrained(job.model_path,
                                                                            device=job.device)
    else:
        model = model if model is not None else _load_lm(job.model_path)
    with autocast(job.precision, job.device):
        if job.kind == "rewards":
            return score(model, **job.args)
        if job.kind == "response_logps":
            return response_logps(model, device=job.device, **job.args)
        if job.kind == "completion_logps":
            return completion_logps(model, device=job.device, **job.args)
        return generate(model, device=job.device, **job.args)


def merge_shards(parts: list[Any]) -> Any:
    """One result from the ranks' results, each filled only where that rank computed.

    Arrays and float lists are summed (every entry is non-zero on at most one rank, so the sum is
    exact); lists of lists take each entry from the rank that filled it; tuples merge per element.
    """
    import numpy as np

    first = parts[0]
    if isinstance(first, tuple):
        return tuple(merge_shards([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, np.ndarray):
        return sum(parts[1:], start=first.copy())
    if isinstance(first, list) and first and isinstance(first[0], list):
        return [next((p[i] for p in parts if p[i]), first[i]) for i in range(len(first))]
    if isinstance(first, list):
        return [float(sum(p[i] for p in parts)) for i in range(len(first))]
    raise TypeError(f"cannot merge shards of {type(first).__name__}")


def _infer_worker(workdir: str) -> None:
    with open(Path(workdir) / JOB_FILE, "rb") as f:
        job = pickle.load(f)  # written a moment ago by the node that owns workdir
    out = run_inference(job)
    rank, _ = world()
    with open(Path(workdir) / f"shard_{rank}.pkl", "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


def infer(job: InferenceJob, num_processes: int, backend: str,
          model: Callable[[], torch.nn.Module] | None = None, timeout_s: float = 1800.0) -> Any:
    """``run_inference(job)`` here (``model()`` gives the model, if set) or sharded by batch over
    ``num_processes`` workers, merged: the same result either way."""
    if num_processes == 1:
        return run_inference(job, model() if model is not None else None)
    from rpo_pipeline.distributed import resolve_backend, run_workers
    from rpo_pipeline.training import resolve_device

    backend = resolve_backend(backend, resolve_device(job.device).type)
    with tempfile.TemporaryDirectory(prefix=f"rpo-{job.kind}-") as tmp:
        with open(Path(tmp) / JOB_FILE, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        run_workers(_infer_worker, (tmp,), num_processes, backend, timeout_s)
        parts = []
        for rank in range(num_processes):
            with open(Path(tmp) / f"shard_{rank}.pkl", "rb") as f:
                parts.append(pickle.load(f))
    return merge_shards(parts)


# --------------------------------------------------------------------------------------------------
# Launched from outside (torchrun / accelerate launch, e.g. under Slurm on several machines)
# --------------------------------------------------------------------------------------------------
def write_job(job: Any, directory: str | Path) -> Path:
    """Write ``job`` where ``python -m rpo_pipeline.jobs DIRECTORY KIND`` finds it (a shared
    filesystem for several machines); rank 0 writes ``model/`` and ``result.json`` there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / JOB_FILE, "wb") as f:
        pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
    return directory


def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m rpo_pipeline.jobs DIRECTORY KIND`` (KIND: policy | reward_model | sft):
    the job of DIRECTORY in the process group that torchrun or accelerate launch describes in the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    import os
    import sys

    import torch.distributed as dist

    directory, kind = (argv or sys.argv[1:])[:2]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    _fit_worker(kind, directory)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
