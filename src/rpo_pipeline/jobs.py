"""Jobs: training (SFT, reward model, DPO, RPO) and sharded inference, in the caller's process or
on N workers.

Kedro-free. A job is a small picklable dataclass per kind (model paths, token-id items and the
stage's validated parameters) with ``run(model=None)``: it builds the model, the collate and the
loss and runs ``training.train`` (or the inference function). The same ``run`` executes in the
node's process (``num_processes: 1``) or in every worker of a ``torch.distributed`` group, where
``train`` is data parallel and inference is sharded by batch.

With N workers the node keeps the catalog and MLflow to itself: it pickles the job into a
temporary directory it owns; each worker's entry point (``worker``) reads it and dispatches on its
type; rank 0 writes the trained weights (``save_pretrained``) and the history there (inference: each
rank its shard), and the node loads them back before the directory is removed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rpo_pipeline import reward_model as rm
from rpo_pipeline.base_model import lora_target_modules
from rpo_pipeline.distributed import resolve_backend, run_workers
from rpo_pipeline.evaluation import completion_logps, generate
from rpo_pipeline.fingerprint import fingerprint, hash_dir
from rpo_pipeline.losses import (
    preference_loss_fn,
    reward_aware_loss_fn,
    reward_group_loss_fn,
    reward_pair_loss_fn,
    sft_nll,
)
from rpo_pipeline.params import (
    DpoParams,
    ReferenceParams,
    RewardModelParams,
    RpoOnlineParams,
    RpoParams,
    SamplingConfig,
)
from rpo_pipeline.policy import group_collate, policy_collate
from rpo_pipeline.precision import AUTOCAST_DTYPES, resolve_precision
from rpo_pipeline.reference import response_logps, sft_collate
from rpo_pipeline.scoring import ResponseLogps
from rpo_pipeline.training import TrainConfig, TrainResult, evaluate, resolve_device, train, world

log = logging.getLogger(__name__)
Items = list[Any]  # policy.PreferencePair | ResponseGroup, reward_model.RewardPair, reference.SftExample
Fitted = tuple[torch.nn.Module, TrainResult, dict[str, float]]  # the model, its training, its metrics


@dataclass
class Split:
    """Items of one split and their lengths (for length-bucketed batches)."""

    items: Items
    lengths: list[int]


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
    return AutoModelForCausalLM.from_pretrained(path)


# Parameters that do not change what a resumed run computes from its checkpoint onwards.
_RESUME_FREE = frozenset({"resume", "checkpoint_every", "checkpoint_dir", "progress", "log_every",
                          "eval_every", "num_processes", "backend", "device"})


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k in _RESUME_FREE:
            continue
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def provenance(start_model: str, train: Split, params: Any) -> dict[str, Any]:
    """What a checkpoint is a checkpoint of: the start model's files, the training items and every
    parameter that changes the result (by dotted key), for ``training.train``'s resume check."""
    return {"start_model": hash_dir(start_model),
            "train_data": fingerprint(json.dumps([list(i) for i in train.items], default=str)),
            **{f"params.{k}": v for k, v in _flat(params.model_dump(mode="json")).items()}}


@dataclass(kw_only=True)
class DpoJob:
    """DPO family from π_SFT (+ LoRA, merged at the end) with the configured pair loss."""

    method: ClassVar[str] = "dpo"
    model_path: str  # π_SFT (save_pretrained directory)
    params: DpoParams
    train: Split
    val: Split  # val pairs
    checkpoint_dir: str | None = None  # where train.checkpoint_every writes (the catalog's <method>.checkpoints)
    snapshot_steps: list[int] = field(default_factory=list)  # intermediate policies to keep

    def losses(self) -> tuple[Callable, Callable, Callable]:
        """The collate, the loss and the evaluation for this method."""
        p = self.params
        loss_fn = preference_loss_fn(p.loss, p.beta, p.label_smoothing, p.sft_weight)
        collate = policy_collate()

        def eval_fn(m):
            return evaluate(m, self.val.items, self.val.lengths, collate, loss_fn, 2 * p.train.batch_size,
                            p.device)
        return collate, loss_fn, eval_fn

    def run(self, model: torch.nn.Module | None = None) -> Fitted:
        p = self.params
        collate, loss_fn, eval_fn = self.losses()
        model = model if model is not None else _load_lm(self.model_path)
        if p.disable_dropout:
            disable_dropout(model)
        if p.lora.enabled:
            targets = lora_target_modules(model, p.lora.target_modules, f"{self.method}.lora.target_modules")
            torch.manual_seed(p.train.seed)  # the adapter's initialisation, the same in every process
            model = get_peft_model(model, LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha,
                                                     lora_dropout=p.lora.dropout, target_modules=targets))

        def snapshot(wrapped: torch.nn.Module) -> torch.nn.Module:
            """A CPU copy of the policy (its adapter merged)."""
            lm = copy.deepcopy(wrapped.lm).cpu()
            return lm.merge_and_unload() if p.lora.enabled else lm

        cfg = TrainConfig.of(p.train, p.device, checkpoint_dir=self.checkpoint_dir)
        if (cfg.checkpoint_every or cfg.resume) and self.checkpoint_dir is None:
            raise ValueError(f"{self.method}.train.checkpoint_every / resume need a checkpoint folder; "
                             "give the job the catalog's checkpoint_dir")
        checked = provenance(self.model_path, self.train, p) if cfg.checkpoint_every or cfg.resume else None
        result = train(ResponseLogps(model), self.train.items, self.train.lengths, collate, loss_fn,
                       cfg, desc=self.method, eval_fn=eval_fn if self.val.items else None,
                       snapshot_steps=self.snapshot_steps, snapshot_fn=snapshot, provenance=checked)
        if p.lora.enabled:
            model = model.merge_and_unload()
        return model.cpu(), result, {}


@dataclass(kw_only=True)
class RpoJob(DpoJob):
    """RPO from π_SFT: the policy's implicit reward margins matched to the reward model's over K
    responses; evaluation adds ``rewards/*`` on ``val_pairs`` ranked by the data's scores."""

    method: ClassVar[str] = "rpo"
    params: RpoParams
    val_pairs: Split  # val pairs ranked by the data's scores (rewards/* metrics)

    def losses(self) -> tuple[Callable, Callable, Callable]:
        p, gold = self.params, self.val_pairs
        loss_fn = reward_aware_loss_fn(p.distance, p.beta, p.eta, p.average_logps, p.sft_weight)
        collate, pair_collate_fn = group_collate(), policy_collate()
        pair_metrics = preference_loss_fn("sigmoid", p.beta)
        batch = p.train.batch_size

        def eval_fn(m):
            out = evaluate(m, self.val.items, self.val.lengths, collate, loss_fn, 2 * batch, p.device)
            g = evaluate(m, gold.items, gold.lengths, pair_collate_fn, pair_metrics, 4 * batch, p.device)
            return out | {k: v for k, v in g.items() if k.startswith(("rewards/", "logps/"))}
        return collate, loss_fn, eval_fn


@dataclass(kw_only=True)
class RpoOnlineJob(RpoJob):
    """One online round of RPO, from the last round's policy."""

    method: ClassVar[str] = "rpo_online"
    params: RpoOnlineParams


@dataclass(kw_only=True)
class RewardModelJob:
    """Bradley–Terry training of LoRA + head on the (4-bit) backbone; then accuracy and loss on
    each split of ``evals`` (training is over: evaluating may repack the 4-bit weights)."""

    config: rm.RewardModelConfig | None  # the model to build (None with ``init_from``)
    params: RewardModelParams
    train: Split
    evals: dict[str, Split] = field(default_factory=dict)  # val / test pairs, scored after training
    init_from: str | None = None  # a saved reward model to train further

    def run(self, model: torch.nn.Module | None = None) -> Fitted:
        p = self.params
        cfg = TrainConfig.of(p.train, p.device)
        if model is None and self.init_from is not None:
            model = rm.RewardModel.continue_training(self.init_from, seed=cfg.seed, device=p.device)
        elif model is None:
            model = rm.RewardModel.for_training(self.config, seed=cfg.seed, device=p.device)
        if p.disable_dropout:
            disable_dropout(model)
        collate = rm.pair_collate()
        loss_fn = reward_pair_loss_fn(p.center_coef)
        if any(isinstance(i, rm.RewardGroup) for i in self.train.items):  # whole groups (or with pairs)
            train_collate, train_loss = rm.group_collate(), reward_group_loss_fn(p.center_coef)
        else:
            train_collate, train_loss = collate, loss_fn
        members = model.config.members
        if members == 1:
            result = train(model, self.train.items, self.train.lengths, train_collate, train_loss, cfg,
                           desc="reward_model")
        else:  # one member after another, each on its bootstrap resample with its seed
            for m in range(members):
                model.select_member(m)
                mine = [(i._replace(member_weights=()), n)
                        for i, n in zip(self.train.items, self.train.lengths, strict=True)
                        for _ in range(int(i.member_weights[m]) if i.member_weights else 1)]
                part = train(model, [i for i, _ in mine], [n for _, n in mine], train_collate, train_loss,
                             cfg.model_copy(update={"seed": cfg.seed + m}), desc=f"reward_model member {m}")
                result = part if m == 0 else replace(result, seconds=result.seconds + part.seconds)
            model.select_member(None)
            result.items_per_second = cfg.steps * cfg.batch_size * members / max(result.seconds, 1e-9)
        metrics: dict[str, float] = {}
        for split, data in self.evals.items():
            if data.items:
                ev = evaluate(model, data.items, data.lengths, collate, loss_fn, 2 * cfg.batch_size,
                              p.device)
                metrics[f"{split}_accuracy"], metrics[f"{split}_loss"] = ev["accuracy"], ev["loss"]
        return model, result, metrics


@dataclass(kw_only=True)
class SftJob:
    """Response NLL on the training examples; the val loss at the end."""

    model_path: str
    params: ReferenceParams
    train: Split
    val: Split

    def run(self, model: torch.nn.Module | None = None) -> Fitted:
        p = self.params
        cfg = TrainConfig.of(p.sft, p.device)
        model = model if model is not None else _load_lm(self.model_path)
        collate = sft_collate()
        scorer = ResponseLogps(model)

        def val_loss(m: torch.nn.Module) -> dict[str, float]:
            return evaluate(m, self.val.items, self.val.lengths, collate, sft_nll,
                            batch_size=2 * cfg.batch_size, device=p.device)

        periodic = cfg.eval_every and self.val.items
        result = train(scorer, self.train.items, self.train.lengths, collate, sft_nll, cfg, desc="sft",
                       eval_fn=val_loss if periodic else None)
        val = val_loss(scorer)  # of the weights kept (the best evaluation's under early stopping)
        return model.cpu(), result, {"val_loss": val["loss"]}


FitJob = DpoJob | RpoJob | RpoOnlineJob | RewardModelJob | SftJob


# --------------------------------------------------------------------------------------------------
# Inference sharded by batch: reference log-probs, reward scores, sampling
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Inference:
    """The model at ``model_path`` on ``device``; bf16 / fp16 ``precision`` runs the forward passes
    in autocast (``params.PRECISIONS``)."""

    model_path: str
    device: str
    precision: str

    def load(self) -> torch.nn.Module:
        return _load_lm(self.model_path)


@dataclass(kw_only=True)
class ResponseLogpsJob(_Inference):
    """``reference.response_logps``: summed response log-prob and token count per sequence."""

    input_ids: list[list[int]]
    response_starts: list[int]
    batch_size: int
    progress: bool = False

    def run(self, model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return response_logps(model, self.input_ids, self.response_starts, self.batch_size,
                              self.device, progress=self.progress)


@dataclass(kw_only=True)
class CompletionLogpsJob(_Inference):
    """``evaluation.completion_logps``: log π(completion | prompt) per pair."""

    prompts: list[list[int]]
    completions: list[list[int]]
    batch_size: int

    def run(self, model: torch.nn.Module) -> np.ndarray:
        return completion_logps(model, self.prompts, self.completions, self.batch_size, self.device)


@dataclass(kw_only=True)
class GenerateJob(_Inference):
    """``evaluation.generate``: completions per prompt (sampled, or greedy) and their log-probs."""

    prompts: list[list[int]]
    cfg: SamplingConfig
    eos_id: int
    pad_id: int
    greedy: bool
    progress: bool
    desc: str

    def run(self, model: torch.nn.Module) -> tuple[list[list[list[int]]], list[list[float]]]:
        return generate(model, self.prompts, self.cfg, self.eos_id, self.pad_id, greedy=self.greedy,
                        device=self.device, progress=self.progress, desc=self.desc)


@dataclass(kw_only=True)
class RewardsJob(_Inference):
    """``reward_model.score``: every member's reward per sequence."""

    sequences: list[list[int]]
    response_starts: list[int]
    batch_size: int

    def load(self) -> torch.nn.Module:
        return rm.RewardModel.from_pretrained(self.model_path, device=self.device)

    def run(self, model: torch.nn.Module) -> np.ndarray:
        return rm.score(model, self.sequences, self.response_starts, self.batch_size)


InferenceJob = ResponseLogpsJob | CompletionLogpsJob | GenerateJob | RewardsJob


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` resolved on ``device`` (``precision.resolve_precision``),
    or nothing for fp32."""
    dev = resolve_device(device)
    chosen = resolve_precision(precision, dev)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[chosen])


def run_inference(job: InferenceJob, model: torch.nn.Module | None = None) -> Any:
    """The job on this process's share of the batches (all of them in one process)."""
    model = model if model is not None else job.load()
    with autocast(job.precision, job.device):
        return job.run(model)


def merge_shards(parts: list[Any]) -> Any:
    """One result from the ranks' results, each filled only where that rank computed.

    Arrays and float lists are summed (every entry is non-zero on at most one rank, so the sum is
    exact); lists of lists take each entry from the rank that filled it; tuples merge per element.
    """
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


# --------------------------------------------------------------------------------------------------
# Workers: one entry point, dispatched on the job's type
# --------------------------------------------------------------------------------------------------
JOB_FILE, MODEL_DIR, RESULT_FILE, SNAPSHOT_DIR = "job.pkl", "model", "result.json", "snapshots"


def write_job(job: FitJob | InferenceJob, workdir: str | Path) -> None:
    with open(Path(workdir) / JOB_FILE, "wb") as f:
        pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)


def worker(workdir: str) -> None:
    """Each worker's entry point: the job pickled in ``workdir``, run as its type says.

    A training job: rank 0 writes the model, its snapshots and ``result.json`` there. An inference
    job: each rank writes its shard (``shard_<rank>.pkl``)."""
    with open(Path(workdir) / JOB_FILE, "rb") as f:
        job = pickle.load(f)  # written a moment ago by the node that owns workdir
    rank, _ = world()
    match job:
        case DpoJob() | RewardModelJob() | SftJob():
            model, result, metrics = job.run()
            if rank == 0:
                model.save_pretrained(str(Path(workdir) / MODEL_DIR))
                for step, snap in result.snapshots.items():
                    snap.save_pretrained(str(Path(workdir) / SNAPSHOT_DIR / str(step)))
                (Path(workdir) / RESULT_FILE).write_text(json.dumps({
                    "history": result.history, "log_steps": result.log_steps, "seconds": result.seconds,
                    "items_per_second": result.items_per_second, "precision": result.precision,
                    "metrics": metrics}))
        case ResponseLogpsJob() | CompletionLogpsJob() | GenerateJob() | RewardsJob():
            out = run_inference(job)
            with open(Path(workdir) / f"shard_{rank}.pkl", "wb") as f:
                pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
        case _:
            raise TypeError(f"{workdir}/{JOB_FILE} holds a {type(job).__name__}, not a job")


def read_fitted(workdir: str | Path, load: Callable[[str], torch.nn.Module]) -> Fitted:
    """What ``worker`` left in ``workdir`` after a training job: the model (through ``load``), the
    result (its snapshots loaded too) and the metrics."""
    workdir = Path(workdir)
    out = json.loads((workdir / RESULT_FILE).read_text())
    model = load(str(workdir / MODEL_DIR))
    snaps = workdir / SNAPSHOT_DIR
    snapshots = {int(d.name): load(str(d)) for d in sorted(snaps.iterdir())} if snaps.exists() else {}
    result = TrainResult(history=out["history"], log_steps=out["log_steps"], seconds=out["seconds"],
                         items_per_second=out["items_per_second"], precision=out["precision"],
                         snapshots=snapshots)
    return model, result, out["metrics"]


def fit(job: FitJob, num_processes: int, backend: str, device: str,
        model: Callable[[], torch.nn.Module], load: Callable[[str], torch.nn.Module],
        timeout_s: float = 1800.0) -> Fitted:
    """``job.run`` in this process (``model()`` builds the model) or on ``num_processes`` workers
    (the trained model comes back through ``load``): the same result either way."""
    if num_processes == 1:
        return job.run(model())
    backend = resolve_backend(backend, resolve_device(device).type)
    kind = type(job).__name__
    with tempfile.TemporaryDirectory(prefix=f"rpo-{kind}-") as tmp:
        write_job(job, tmp)
        log.info("%s: training on %d processes (%s), work directory %s", kind, num_processes, backend, tmp)
        run_workers(worker, (tmp,), num_processes, backend, timeout_s)
        return read_fitted(tmp, load)


def infer(job: InferenceJob, num_processes: int, backend: str,
          model: Callable[[], torch.nn.Module] | None = None, timeout_s: float = 1800.0) -> Any:
    """``run_inference(job)`` here (``model()`` gives the model, if set) or sharded by batch over
    ``num_processes`` workers, merged: the same result either way."""
    if num_processes == 1:
        return run_inference(job, model() if model is not None else None)
    backend = resolve_backend(backend, resolve_device(job.device).type)
    with tempfile.TemporaryDirectory(prefix=f"rpo-{type(job).__name__}-") as tmp:
        write_job(job, tmp)
        run_workers(worker, (tmp,), num_processes, backend, timeout_s)
        parts = []
        for rank in range(num_processes):
            with open(Path(tmp) / f"shard_{rank}.pkl", "rb") as f:
                parts.append(pickle.load(f))
    return merge_shards(parts)


# --------------------------------------------------------------------------------------------------
# Launched from outside: torchrun / accelerate launch (e.g. under Slurm on several machines)
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m rpo_pipeline.jobs DIRECTORY``: ``worker(DIRECTORY)`` in the process group
    that torchrun or accelerate launch describe in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    ...). ``DIRECTORY`` holds the job ``write_job`` wrote (on a filesystem every machine shares)."""
    directory = (argv if argv is not None else sys.argv[1:])[0]
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        worker(directory)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # run as -m: the job classes a pickle names live in rpo_pipeline.jobs, not in this __main__
    from rpo_pipeline.jobs import main as module_main

    module_main()
