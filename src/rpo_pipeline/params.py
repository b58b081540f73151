"""Typed parameter schemas: one pydantic model per parameter group, checked before any node runs.

Kedro-free. ``conf/base/parameters_<group>.yml`` is the only source of defaults: no field here has a
default, so a key missing from the YAML is an error, and so is an unknown one (at any depth, with
the nearest valid key suggested). Values are strict: ``lr: "1e-3"`` (a string) or ``steps: 1.5``
are refused, not coerced. Ranges and choices are declared on the fields; rules that tie keys
together (a setting that another one would silently ignore, split fractions summing to 1, ...) are
model validators.

``validate_project_params(params)`` checks the whole parameter tree (all groups, cross-group rules)
and raises one ``ParameterError`` listing every problem as ``<full.key.path> = <value>: <what is
allowed>``. The project hook runs it when the Kedro context is created, so ``--params`` overrides go
through the same check. Nodes turn their group's dict into its model with ``<Group>.parse(params)``
and read attributes; they never fall back to defaults of their own.

Example::

    >>> from rpo_pipeline.params import DpoParams
    >>> DpoParams.parse({**dpo_params, "beta": -1})
    ParameterError: invalid parameters:
      - dpo.beta = -1: must be greater than 0
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rpo_pipeline.constants import (
    BUILTIN_TINY_GPT2,
    COMPUTE_DTYPES,
    PAIR_LOSS_NAMES,
    REWARD_AGGREGATES,
    RPO_DISTANCES,
)
from rpo_pipeline.preference_formats import FORMATS
from rpo_pipeline.preference_groups import SPLITS
from rpo_pipeline.text_format import Template

GOLD_JUDGES = ("vader", "none", "hf_classifier")
BACKENDS = ("auto", "gloo", "nccl")
# transformers schedulers that need nothing beyond warmup and total steps
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
             "constant_with_warmup", "inverse_sqrt")
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                     "responses", "scores", "text")

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                              description="where the stage runs: auto (cuda when available, else cpu) | cpu | "
                                          "mps | cuda | cuda:N")]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class ParameterError(ValueError):
    """Invalid parameters; the message lists every problem with its full key path."""


class RuleError(ValueError):
    """A rule between keys failed; ``key`` is the offending key relative to the model."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class Schema(BaseModel):
    """Base of every parameter model: unknown keys and loose types are errors; no defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    group: ClassVar[str] = ""  # the parameter group a top-level schema validates

    @classmethod
    def parse(cls, params: Any, prefix: str | None = None, source: str = "") -> Any:
        """The validated model of ``params``; ``ParameterError`` naming ``<prefix>.<key>`` (and the
        configuration ``source``) if not."""
        try:
            return cls.model_validate(params)
        except ValidationError as e:
            prefix = prefix if prefix is not None else cls.group
            raise ParameterError(format_errors(e, cls, prefix, source)) from None


# ---- shared blocks ------------------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # see precision.py

Backend = Annotated[Literal[BACKENDS], Field(description="torch.distributed backend; auto: nccl on CUDA, gloo "
                                                         "otherwise")]
Precision = Annotated[Literal[PRECISIONS], Field(description="as in train.precision: autocast for the forward "
                                                             "passes")]


class TrainParams(Schema):
    """A ``train`` block: AdamW with warmup + schedule, clipping, accumulation (``training.train``)."""

    steps: Annotated[NonNegInt, Field(description='optimizer steps')]
    batch_size: Annotated[PosInt, Field(description=(
        "items per optimizer step (the global batch, split over the processes)"))]
    max_tokens_per_batch: Annotated[PosInt | None, Field(description=(
        "also at most this many packed tokens per batch (an item above it trains alone); null: items only"))]
    grad_accum: Annotated[PosInt, Field(description='micro-batches accumulated per optimizer step')]
    lr: Annotated[PosFloat, Field(description='AdamW peak learning rate')]
    warmup_steps: Annotated[NonNegInt, Field(description='linear warmup steps')]
    schedule: Annotated[Literal[SCHEDULES], Field(description='learning-rate schedule after warmup')]
    weight_decay: Annotated[NonNegFloat, Field(description='AdamW weight decay (not on biases and norms)')]
    max_grad_norm: Annotated[PosFloat, Field(description='gradient clipping norm')]
    seed: Annotated[int, Field(description='seed of the data order, initialisation and dropout')]
    log_every: Annotated[PosInt, Field(description='log metrics every N steps')]
    progress: Annotated[bool, Field(description='show a progress bar')]
    precision: Annotated[Literal[PRECISIONS], Field(description=(
        "auto: bf16 autocast on CUDA with bf16, else fp32 | fp32 | bf16 | fp16 (CUDA)"))]
    num_processes: Annotated[PosInt, Field(description="data-parallel worker processes (1: in the node's process)")]
    strategy: Annotated[Literal["ddp", "fsdp"], Field(description=(
        "how the workers share the model (accelerate): ddp | fsdp (GPUs only)"))]
    backend: Backend

    @model_validator(mode="after")
    def _every_process_gets_items(self) -> TrainParams:
        if self.batch_size < self.num_processes:
            raise RuleError("batch_size", f"= {self.batch_size} is smaller than num_processes = "
                            f"{self.num_processes}: batch_size is the global batch, split over the "
                            "processes, so some would get no item; raise batch_size or lower "
                            "num_processes")
        return self


class PolicyTrainParams(TrainParams):
    """DPO / RPO ``train``: adds periodic evaluation, checkpoints (in the catalog's
    ``<method>.checkpoints``) and resume."""

    eval_every: Annotated[NonNegInt, Field(description='evaluate on the val split every N steps (0: only at the end)')]
    checkpoint_every: Annotated[NonNegInt, Field(description=(
        "write a resumable checkpoint to <method>.checkpoints every N steps (0: none)"))]
    resume: Annotated[bool, Field(description='continue from the last checkpoint, only if it comes from this same run')]


class LoraParams(Schema):
    """LoRA adapters (peft)."""

    r: Annotated[PosInt, Field(description='LoRA rank')]
    alpha: Annotated[PosInt, Field(description='LoRA scaling numerator (scale alpha / r)')]
    dropout: Annotated[float, Field(ge=0, lt=1, description='dropout on the LoRA input')]
    target_modules: Annotated[Any, Field(description=(
        "auto: the architecture's attention + MLP projections | all-linear | a list of layer names"))]

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if v in ("auto", "all-linear") or (isinstance(v, list) and v and all(isinstance(x, str) and x
                                                                               for x in v)):
            return v
        raise ValueError("must be 'auto' (the architecture's projections), 'all-linear', or a "
                         "non-empty list of linear layer names")


class PolicyLoraParams(LoraParams):
    """LoRA adapters (peft) on the policy, merged into it when training ends."""

    enabled: Annotated[bool, Field(description=(
        "train LoRA adapters (merged into the policy at the end) instead of every weight"))]


class InferenceParams(Schema):
    """Batched inference (log-probs, reward scores), sharded by batch over ``num_processes``."""

    batch_size: Annotated[PosInt, Field(description='sequences per forward pass')]
    num_processes: Annotated[PosInt, Field(description='worker processes the batches are sharded over')]
    backend: Backend
    precision: Precision


# ---- base_model ---------------------------------------------------------------------------------
class BuiltinTokenizerParams(Schema):
    """The builtin model's byte-level BPE tokenizer, trained on the train split's text."""

    vocab_size: Annotated[int, Field(ge=260, description=(
        "byte-level BPE vocabulary size (256 bytes + special tokens at least)"))]
    min_frequency: Annotated[PosInt, Field(description='minimum count of a merged token in the training text')]


class BuiltinModelParams(Schema):
    """Sizes of the builtin GPT-2, built from config with random weights."""

    n_layer: Annotated[PosInt, Field(description='transformer blocks')]
    n_embd: Annotated[PosInt, Field(description='hidden width')]
    n_head: Annotated[PosInt, Field(description='attention heads (must divide n_embd)')]
    n_positions: Annotated[PosInt, Field(description='longest sequence, in tokens')]
    activation_function: Annotated[Literal["gelu_pytorch_tanh", "gelu_new", "gelu", "relu", "silu"], Field(description=(
        "MLP activation"))]

    @model_validator(mode="after")
    def _heads_divide_width(self) -> BuiltinModelParams:
        if self.n_embd % self.n_head:
            raise RuleError("n_embd", f"= {self.n_embd} is not divisible by n_head = {self.n_head}")
        return self


class BaseModelParams(Schema):
    """``base_model``: the builtin tiny GPT-2 (``tokenizer``/``model`` sizes) or a pretrained LM."""

    group: ClassVar[str] = "base_model"
    name_or_path: NonEmptyStr
    seed: int
    tokenizer: BuiltinTokenizerParams  # builtin:tiny-gpt2 only
    model: BuiltinModelParams  # builtin:tiny-gpt2 only
    chat_template: NonEmptyStr | None
    load_args: dict[str, Any]  # from_pretrained kwargs of a pretrained model

    @property
    def builtin(self) -> bool:
        return self.name_or_path == BUILTIN_TINY_GPT2

    @model_validator(mode="after")
    def _load_args_only_for_pretrained(self) -> BaseModelParams:
        if self.builtin and self.load_args:
            raise RuleError("load_args", f"= {self.load_args} would be ignored: {BUILTIN_TINY_GPT2} "
                            "is built from config, not loaded; set name_or_path to a pretrained "
                            "model or remove load_args")
        return self


# ---- data_processing ----------------------------------------------------------------------------
class SplitParams(Schema):
    train: Annotated[Fraction, Field(description='fraction of prompts in the train split')]
    val: Annotated[Fraction, Field(description='fraction of prompts in the val split (choosing defaults)')]
    test: Annotated[Fraction, Field(description='fraction of prompts in the test split (final numbers only)')]

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise RuleError("", f"fractions sum to {total:g}; train + val + test must be 1")
        return self


class DataProcessingParams(Schema):
    group: ClassVar[str] = "data_processing"
    format: Literal[("auto", *FORMATS)]
    on_invalid: Literal["raise", "drop"]
    columns: dict[Literal[CANONICAL_COLUMNS], NonEmptyStr]
    seed: int
    split: SplitParams
    rejected: Literal["worst", "random"]
    template: str
    use_chat_template: bool
    max_prompt_length: PosInt
    max_length: PosInt
    # format text: [lo, hi], the range of each text's prompt word count
    prompt_words: Annotated[list[PosInt], Field(min_length=2, max_length=2)]

    @field_validator("prompt_words")
    @classmethod
    def _word_range(cls, v: list[int]) -> list[int]:
        if v[0] > v[1]:
            raise ValueError(f"[{v[0]}, {v[1]}] is not a range: the first bound must not exceed "
                             "the second")
        return v

    @field_validator("template")
    @classmethod
    def _template_parses(cls, v: str) -> str:
        Template.parse(v)
        return v

    @model_validator(mode="after")
    def _room_for_a_response(self) -> DataProcessingParams:
        if self.max_length <= self.max_prompt_length:
            raise RuleError("max_length", f"= {self.max_length} must be greater than "
                            f"max_prompt_length = {self.max_prompt_length} (room for the response)")
        return self


# ---- reference ----------------------------------------------------------------------------------
class SftParams(TrainParams):
    """``reference.sft``: supervised fine-tuning of the base model into π_SFT = π_ref."""

    responses: Literal["all", "chosen"]
    eval_every: NonNegInt  # val loss every N steps (0: only at the end)
    patience: NonNegInt  # early stopping: stop after N evaluations without a lower val loss (0: off)

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> SftParams:
        if self.patience and not self.eval_every:
            raise RuleError("patience", f"is {self.patience} but eval_every is 0: early stopping "
                            "needs a val loss every eval_every steps; set eval_every")
        return self


class ReferenceParams(Schema):
    group: ClassVar[str] = "reference"
    device: Device
    sft: SftParams
    logprobs: InferenceParams


# ---- reward_model -------------------------------------------------------------------------------
class EnsembleParams(Schema):
    members: PosInt  # 1: one reward model
    aggregate: Literal[REWARD_AGGREGATES]
    penalty: NonNegFloat  # λ of mean_minus_std
    bootstrap: bool  # each member trains on its own bootstrap resample of the pairs


class RewardModelParams(Schema):
    group: ClassVar[str] = "reward_model"
    backbone: NonEmptyStr  # sft | base | a causal LM directory
    load_in_4bit: bool
    compute_dtype: Literal[COMPUTE_DTYPES]
    head_input: Literal["hidden", "logits"]
    pooling: Literal["last", "mean"]
    comparisons: Literal["pairs", "all"]
    finetune: Literal["lora", "full"]  # lora: adapters on the frozen (4-bit) backbone | full
    ensemble: EnsembleParams
    lora: LoraParams
    center_coef: NonNegFloat
    margin_column: Literal["score_difference", "score_chosen", "score_rejected"] | None
    disable_dropout: bool
    device: Device
    train: TrainParams
    score: InferenceParams

    @model_validator(mode="after")
    def _margins_need_pairs(self) -> RewardModelParams:
        if self.comparisons == "all" and self.margin_column is not None:
            raise RuleError("margin_column", f"= {self.margin_column!r} needs comparisons: pairs "
                            "(the comparisons of a whole group have no margin column)")
        return self

    @model_validator(mode="after")
    def _full_finetune_needs_full_precision(self) -> RewardModelParams:
        if self.finetune == "full" and self.load_in_4bit:
            raise RuleError("finetune", "= 'full' trains every backbone weight, which a 4-bit "
                            "backbone cannot: set load_in_4bit: false")
        if self.finetune == "full" and self.ensemble.members > 1:
            raise RuleError("finetune", f"= 'full' trains one backbone, but ensemble.members is "
                            f"{self.ensemble.members} (members are LoRA adapters on one backbone): "
                            "set members: 1 or finetune: lora")
        return self

    @model_validator(mode="after")
    def _compute_dtype_needs_4bit(self) -> RewardModelParams:
        if not self.load_in_4bit and self.compute_dtype != "float32":
            raise RuleError("compute_dtype", f"= {self.compute_dtype!r} would be ignored: it is the "
                            "4-bit compute dtype and load_in_4bit is false (the full-precision "
                            "backbone loads in float32)")
        return self


# ---- dpo / rpo ----------------------------------------------------------------------------------
class PolicyParams(Schema):
    """What DPO and RPO share: π_SFT (+ LoRA), β, the SFT term, the training block."""

    beta: PosFloat
    sft_weight: NonNegFloat
    device: Device
    disable_dropout: bool
    lora: PolicyLoraParams
    train: PolicyTrainParams


class DpoParams(PolicyParams):
    group: ClassVar[str] = "dpo"
    loss: Literal[PAIR_LOSS_NAMES]
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)]

    @model_validator(mode="after")
    def _smoothing_only_for_sigmoid(self) -> DpoParams:
        if self.label_smoothing and self.loss != "sigmoid":
            raise RuleError("label_smoothing", f"= {self.label_smoothing:g} would be ignored: only "
                            f"the sigmoid loss (cDPO) uses it, and loss is {self.loss!r}; set it "
                            "to 0 or use loss: sigmoid")
        return self


class RewardAwareParams(PolicyParams):
    """What offline and online RPO share: the distance, η, the target normalisation."""

    distance: Literal[RPO_DISTANCES]
    eta: PosFloat
    reward_normalization: Literal["none", "zscore", "per_prompt"]
    average_logps: bool


class RpoParams(RewardAwareParams):
    group: ClassVar[str] = "rpo"
    reward_source: Literal["reward_model", "dataset"]


# ---- evaluation ---------------------------------------------------------------------------------
class SamplingConfig(Schema):
    """Sampling settings shared by every policy (``evaluation.sampling``)."""

    n_samples: Annotated[PosInt, Field(description='completions sampled per prompt')]
    temperature: Annotated[PosFloat, Field(description='sampling temperature')]
    top_p: Annotated[float, Field(gt=0, le=1, description='nucleus sampling mass (1: off)')]
    top_k: Annotated[NonNegInt, Field(description='top-k sampling (0: off)')]
    max_new_tokens: Annotated[PosInt, Field(description='longest completion, in tokens')]
    batch_size: Annotated[PosInt, Field(description='prompts per generate call (x n_samples sequences)')]
    seed: Annotated[int, Field(description='seed of the sampler')]

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("null is not allowed: transformers reads it as top_k = 50, which "
                             "truncates sampling and biases the KL estimate; use 0 to turn top-k off")
        return v


class GoldJudgeArgs(Schema):
    """``hf_classifier`` settings (``model`` must stay null for the other judges)."""

    model: Annotated[NonEmptyStr | None, Field(description=(
        "hf_classifier: a local path or Hub id of a sentiment classifier (null for the other judges)"))]
    positive_label: Annotated[NonEmptyStr, Field(description='hf_classifier: the label whose probability is the score')]
    batch_size: Annotated[PosInt, Field(description='hf_classifier: texts per forward pass')]
    device: Annotated[Device, Field(description='hf_classifier: auto | cpu | cuda[:N]')]


class CurveParams(Schema):
    points: PosInt  # points per method along training, the trained policy the last (rpo_online: its rounds)
    prompts: PosInt  # val prompts each point is sampled on (evaluation.sampling per prompt)


class EvaluationParams(Schema):
    group: ClassVar[str] = "evaluation"
    split: Literal[SPLITS]
    max_prompts: PosInt | None
    sampling: SamplingConfig
    curve: CurveParams
    gold_judge: Literal[GOLD_JUDGES]
    gold_judge_args: GoldJudgeArgs
    batch_size: PosInt
    device: Device
    progress: bool
    num_processes: PosInt  # sampling and scoring sharded by batch (samples do not depend on it)
    backend: Backend
    precision: Literal[PRECISIONS]  # sampling and scoring (the gold judge runs as it is)

    @model_validator(mode="after")
    def _judge_model_matches_judge(self) -> EvaluationParams:
        model = self.gold_judge_args.model
        if self.gold_judge == "hf_classifier" and model is None:
            raise RuleError("gold_judge_args.model", "is null but gold_judge is 'hf_classifier': give "
                            "a local path or Hub id of a sentiment classifier")
        if self.gold_judge != "hf_classifier" and model is not None:
            raise RuleError("gold_judge_args.model", f"= {model!r} would be ignored: gold_judge is "
                            f"{self.gold_judge!r}; set gold_judge: hf_classifier or model: null")
        return self


def _two_samples_per_prompt(sampling: SamplingConfig, why: str) -> None:
    """Groups built from samples need K = ``sampling.n_samples`` ≥ 2."""
    if sampling.n_samples < 2:
        raise RuleError("sampling.n_samples", f"= {sampling.n_samples}: {why}, so K must be at "
                        "least 2")


class RefreshParams(Schema):
    labels_per_round: NonNegInt  # 0: the reward model stays as trained offline
    steps: PosInt  # fine-tuning steps of the reward model per round (reward_model.train's batch, lr)


class RpoOnlineParams(RewardAwareParams):
    """Online RPO: ``rounds`` x (sample K from the current policy on ``prompts_per_round`` fresh
    train prompts, score with the reward model, π_ref log-probs, ``train.steps`` RPO steps)."""

    group: ClassVar[str] = "rpo_online"
    rounds: PosInt
    prompts_per_round: PosInt
    sampling: SamplingConfig  # n_samples = K responses per prompt
    judge: Literal["reward_model", "gold"]  # gold: evaluation.gold_judge scores the samples
    refresh: RefreshParams

    @model_validator(mode="after")
    def _groups_need_two_responses(self) -> RpoOnlineParams:
        _two_samples_per_prompt(self.sampling, "RPO compares the K responses of a prompt")
        return self


class GeneratePreferencesParams(Schema):
    """Sample K responses per prompt of ``splits`` from π_SFT and score them with a judge."""

    group: ClassVar[str] = "generate_preferences"
    splits: Annotated[list[Literal[SPLITS]], Field(min_length=1)]
    max_prompts: PosInt | None  # per split; null: every prompt
    judge: Literal["gold", "reward_model"]  # gold: evaluation.gold_judge (vader by default)
    sampling: SamplingConfig
    device: Device
    progress: bool
    num_processes: PosInt
    backend: Backend
    precision: Precision

    @model_validator(mode="after")
    def _groups_need_two_responses(self) -> GeneratePreferencesParams:
        _two_samples_per_prompt(self.sampling, "a preference needs two responses of a prompt")
        return self


# ---- the whole tree -----------------------------------------------------------------------------
# the preference-trained policies, each a parameter group, a namespace and an evaluated policy
POLICY_METHODS = (DpoParams.group, RpoParams.group, RpoOnlineParams.group)

GROUPS: dict[str, type[Schema]] = {
    m.group: m for m in (BaseModelParams, DataProcessingParams, ReferenceParams, RewardModelParams,
                         DpoParams, RpoParams, RpoOnlineParams, EvaluationParams,
                         GeneratePreferencesParams)
}


class ProjectParams(Schema):
    """Every parameter group, and the rules between groups."""

    base_model: BaseModelParams
    data_processing: DataProcessingParams
    reference: ReferenceParams
    reward_model: RewardModelParams
    dpo: DpoParams
    rpo: RpoParams
    rpo_online: RpoOnlineParams
    evaluation: EvaluationParams
    generate_preferences: GeneratePreferencesParams

    @model_validator(mode="after")
    def _sequences_fit_the_builtin_model(self) -> ProjectParams:
        if not self.base_model.builtin:
            return self
        if self.data_processing.use_chat_template and self.base_model.chat_template is None:
            raise RuleError("data_processing.use_chat_template", f"is true but {BUILTIN_TINY_GPT2} "
                            "has no chat template: set base_model.chat_template (a Jinja template) "
                            "or use_chat_template: false")
        positions = self.base_model.model.n_positions
        dp, sampling = self.data_processing, self.evaluation.sampling
        if dp.max_length > positions:
            raise RuleError("data_processing.max_length", f"= {dp.max_length} exceeds "
                            f"base_model.model.n_positions = {positions}")
        for key, cfg in (("evaluation.sampling", sampling),
                         ("rpo_online.sampling", self.rpo_online.sampling),
                         ("generate_preferences.sampling", self.generate_preferences.sampling)):
            if dp.max_prompt_length + cfg.max_new_tokens > positions:
                raise RuleError(f"{key}.max_new_tokens", f"= {cfg.max_new_tokens} plus "
                                f"data_processing.max_prompt_length = {dp.max_prompt_length} exceeds "
                                f"base_model.model.n_positions = {positions}")
        return self

    @model_validator(mode="after")
    def _gold_judge_exists(self) -> ProjectParams:
        if self.generate_preferences.judge == "gold" and self.evaluation.gold_judge == "none":
            raise RuleError("generate_preferences.judge", "is 'gold' but evaluation.gold_judge is "
                            "'none': set a gold judge or judge: reward_model")
        return self


assert set(GROUPS) == set(ProjectParams.model_fields), "every group is a field of ProjectParams"


def validate_project_params(params: dict[str, Any], source: str = "") -> ProjectParams:
    """The whole parameter tree, validated; ``ParameterError`` listing every problem if not.

    ``source`` (e.g. ``conf/base + conf/hh_rlhf + --params``) is named in the message.
    """
    return ProjectParams.parse(params, prefix="", source=source)


# ---- messages -----------------------------------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """The schema class inside an annotation (``X | None``, ``Annotated[X, ...]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, Schema):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _model_at(model: type[Schema], loc: tuple) -> type[Schema] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        model = _unwrap(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


# names users bring from transformers' TrainingArguments / TRL / peft configs -> ours
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps",
           "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "schedule",
           "scheduler": "schedule", "logging_steps": "log_every", "eval_steps": "eval_every",
           "save_steps": "checkpoint_every",
           "resume_from_checkpoint": "resume", "warmup": "warmup_steps", "loss_type": "loss",
           "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "model_name_or_path": "name_or_path", "max_completion_length": "max_length",
           "rpo_alpha": "sft_weight", "temp": "temperature", "num_samples": "n_samples"}


def suggest(key: str, valid: list[str]) -> str | None:
    """The valid key the user most likely meant: a known alias, else the closest spelling."""
    if ALIASES.get(key) in valid:
        return ALIASES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_errors(error: ValidationError, model: type[Schema], prefix: str = "", source: str = ""
                  ) -> str:
    """One line per problem: ``full.key.path = value: what is allowed``."""
    lines = []
    for e in error.errors():
        loc = tuple(p for p in e["loc"] if p != "[key]")
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, RuleError):
            loc = loc + tuple(p for p in cause.key.split(".") if p)
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or "parameters"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = sorted(parent.model_fields) if parent is not None else []
            close = suggest(str(loc[-1]), valid)
            hint = f"did you mean {close}? " if close else ""
            lines.append(f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}")
        elif kind == "missing":
            lines.append(f"{path}: missing (every key needs a value in conf/base; the YAML is the "
                         "only source of defaults)")
        elif isinstance(cause, RuleError):
            lines.append(f"{path} {cause}")
        else:
            msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
            value = e.get("input")
            shown = f"{_show(value)} ({type(value).__name__})" if kind.endswith("_type") else _show(value)
            lines.append(f"{path} = {shown}: {msg}")
    where = (f" in {prefix}" if prefix else "") + (f" from {source}" if source else "")
    return f"invalid parameters{where} ({len(lines)} problem{'s' * (len(lines) > 1)}):\n" + \
        "\n".join(f"  - {line}" for line in lines)


def base_parameters(group: str, conf_source: str | Path = "conf") -> dict[str, Any]:
    """Parameter group ``group`` exactly as ``<conf_source>/base/parameters_<group>.yml`` defines it:
    the only source of defaults, for callers outside a Kedro session (benchmarks, tests)."""
    from omegaconf import OmegaConf  # Kedro's config library; only this helper reads YAML

    path = Path(conf_source) / "base" / f"parameters_{group}.yml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)[group]
