"""Reward model: a causal-LM backbone in 4-bit NF4 (bitsandbytes) with LoRA (peft) and a scalar head.

Kedro-free. The head reads the final hidden state at each sequence's last token, or the mean over its
response tokens (``pooling``), or the vocabulary logits there (``head_input: logits``). Batches are
``scoring.packed_collate``'s: the responses of one prompt (a pair, a group) run in one sequence with
the prompt once, as in every other scoring path.

Saved with ``save_pretrained``: the LoRA adapter (peft, safetensors), ``reward_head.safetensors``
and ``reward_model.json`` (backbone path, quantization, head input). Note: once a 4-bit model ran
under no-grad on CPU, bitsandbytes repacks its weights and it can no longer be trained — load a
fresh copy for each purpose (training, scoring).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from rpo_pipeline.base_model import lora_target_modules
from rpo_pipeline.constants import COMPUTE_DTYPES, REWARD_AGGREGATES
from rpo_pipeline.policy import pair_sides
from rpo_pipeline.preference_groups import groups_to_pairs
from rpo_pipeline.scoring import packed_collate, packed_states, scoring_batches
from rpo_pipeline.training import to_device, world

HEAD_FILE, CONFIG_FILE = "reward_head.safetensors", "reward_model.json"
DTYPES = dict(zip(COMPUTE_DTYPES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


@dataclass
class RewardModelConfig:
    backbone_path: str
    load_in_4bit: bool = True
    compute_dtype: str = "float32"  # bnb_4bit_compute_dtype
    head_input: str = "hidden"  # hidden | logits
    pooling: str = "last"  # last: the last token's features | mean: the mean over response tokens
    members: int = 1  # ensemble: one LoRA adapter and head row per member, rewards (N, members)
    finetune: str = "lora"  # lora: LoRA adapters on the frozen backbone | full: every weight trains
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "auto"  # see base_model.lora_target_modules; saved resolved

    def __post_init__(self) -> None:
        if self.head_input not in ("hidden", "logits"):
            raise ValueError(f"head_input must be 'hidden' or 'logits', got {self.head_input!r}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
        if self.members < 1:
            raise ValueError(f"members must be at least 1, got {self.members}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}")
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.finetune == "full" and (self.load_in_4bit or self.members > 1):
            raise ValueError("finetune 'full' trains the full-precision backbone of one model: it "
                             "needs load_in_4bit false and members 1")


def load_backbone(path: str, load_in_4bit: bool = True, compute_dtype: str = "float32",
                  device_map: str | None = "cpu") -> torch.nn.Module:
    """Causal LM from ``path``; with ``load_in_4bit`` its linear layers are bnb ``Linear4bit`` NF4.

    The weights that stay unquantized (embeddings, norms) are stored in ``compute_dtype``: with
    bfloat16 a gpt2-sized backbone takes 0.24 of its float32 footprint, with float32 0.40 (the
    38.6 M-parameter embedding is not quantized).
    """
    if not load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(
            path, **({} if device_map in (None, "cpu") else {"device_map": device_map}))
    dtype = DTYPES[compute_dtype]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                device_map=device_map)


def _device_map(device: str) -> str | dict[str, int]:
    """Where ``from_pretrained`` puts a 4-bit backbone: ``cpu``, or this process's GPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if device.startswith("cuda:"):
        return {"": int(device.split(":")[1])}
    return {"": torch.cuda.current_device()}


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (4-bit weights count their packed size)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class RewardModel(torch.nn.Module):
    """r(x, y) = w · f(x, y) + b, with f the backbone's final hidden state (or its vocabulary
    logits) at the last token (``pooling: last``) or averaged over the response's tokens
    (``pooling: mean``: a sum of per-token contributions over the length, the inductive bias of a
    bag-of-words model)."""

    def __init__(self, backbone: torch.nn.Module, config: RewardModelConfig,
                 head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        base_cfg = backbone.config
        width = base_cfg.vocab_size if config.head_input == "logits" else base_cfg.hidden_size
        self.head = head if head is not None else torch.nn.Linear(width, config.members)
        if head is None:
            torch.nn.init.normal_(self.head.weight, std=1.0 / (width + 1) ** 0.5)
            torch.nn.init.zeros_(self.head.bias)
        self.member: int | None = None  # one ensemble member alone (``select_member``)

    def select_member(self, member: int | None) -> None:
        """Make ``forward`` return member ``member``'s rewards (N,) through its adapter alone, the
        other members' adapters frozen: how an ensemble trains, one member after another; None:
        every member again."""
        self.member = member
        if member is not None:
            self.backbone.base_model.set_adapter(member_adapters(self.config.members)[member])
        else:
            self.backbone.base_model.set_adapter("default")
            _all_adapters_trainable(self.backbone, self.config.members)

    @classmethod
    def for_training(cls, config: RewardModelConfig, seed: int = 0, device: str = "cpu"
                     ) -> RewardModel:
        """Fresh backbone (4-bit if configured, on ``device``: bitsandbytes' CUDA kernels on a
        GPU) + new LoRA adapter + new head, seeded; ``finetune: full``: the full-precision
        backbone, every weight trainable, + new head."""
        torch.manual_seed(seed)
        backbone = load_backbone(config.backbone_path, config.load_in_4bit, config.compute_dtype,
                                 device_map=_device_map(device))
        if config.finetune == "full":
            backbone.requires_grad_(True)
            return cls(backbone, config)
        if config.load_in_4bit:
            backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
        config = replace(config, target_modules=lora_target_modules(
            backbone, config.target_modules, "reward_model.lora.target_modules"))
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=config.target_modules,
                          bias="none")
        model = get_peft_model(backbone, lora)
        for name, m in zip(member_adapters(config.members)[1:], range(1, config.members), strict=True):
            torch.manual_seed(seed + m)  # each member its own initialisation
            model.add_adapter(name, lora)
        _all_adapters_trainable(model, config.members)
        return cls(model, config)

    @classmethod
    def continue_training(cls, path: str, seed: int = 0, device: str = "cpu") -> RewardModel:
        """A saved reward model made trainable again: a fresh backbone (a 4-bit one that scored
        cannot train), the saved adapter loaded trainable, the saved head."""
        torch.manual_seed(seed)
        config = RewardModelConfig(**json.loads((Path(path) / CONFIG_FILE).read_text()))
        backbone = _saved_backbone(config, path, device, trainable=True)
        model = cls(backbone, config)
        model.head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return model.to(backbone.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards, shape (N,), of one model; an ensemble's (N, members), member m through its
        adapter and head row m."""
        if self.config.members == 1:
            return self._rewards(batch)
        if self.member is not None:
            return self._rewards(batch, self.member)
        out = []
        for m, name in enumerate([*member_adapters(self.config.members)[1:], "default"]):
            self.backbone.base_model.set_adapter(name)
            out.append(self._rewards(batch, (m + 1) % self.config.members))
        if self.training:  # set_adapter froze the inactive members' adapters
            _all_adapters_trainable(self.backbone, self.config.members)
        return torch.stack(out[-1:] + out[:-1], dim=-1)

    def _rewards(self, batch: dict[str, torch.Tensor], member: int | None = None) -> torch.Tensor:
        """Rewards, shape (N,), of the active adapter (head row ``member``; every row if None)
        for a ``scoring.packed_collate`` batch: the features are the final state at each row's last
        token, or (``pooling: mean``) the mean over its response tokens. A row without response
        tokens reads its last token."""
        states = packed_states(self.backbone.get_decoder(), batch)
        last = states[batch["last_at"]]
        if self.config.pooling == "mean":
            rows, n = batch["response_row"], int(batch["n_rows"])
            total = states.new_zeros(n, states.shape[-1]).index_add(0, rows, states[batch["response_at"]])
            count = states.new_zeros(n).index_add(0, rows, states.new_ones(rows.shape[0]))
            feats = torch.where(count[:, None] > 0, total / count.clamp(min=1)[:, None], last)
        else:
            feats = last
        if self.config.head_input == "logits":
            feats = self.backbone.get_output_embeddings()(feats)
        if member is not None:
            return torch.nn.functional.linear(feats.float(), self.head.weight[member:member + 1],
                                              self.head.bias[member:member + 1]).squeeze(-1)
        return self.head(feats.float()).squeeze(-1)

    def save_pretrained(self, path: str, **_: Any) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)  # the LoRA adapters (or, fine-tuned, every weight)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(Path(path) / HEAD_FILE))
        (Path(path) / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", backbone_path: str | None = None,
                        **_: Any) -> RewardModel:
        """A fresh copy for inference on ``device``: backbone (4-bit if saved so) + adapter + head.
        ``backbone_path`` replaces the saved one (a copy of the backbone elsewhere, e.g. an MLflow
        Model's artifacts); a fully fine-tuned backbone is read from ``path`` itself."""
        config = RewardModelConfig(**json.loads((Path(path) / CONFIG_FILE).read_text()))
        if backbone_path is not None:
            config = replace(config, backbone_path=str(backbone_path))
        backbone = _saved_backbone(config, path, device, trainable=False)
        cfg = backbone.config
        head = torch.nn.Linear(cfg.vocab_size if config.head_input == "logits" else cfg.hidden_size,
                               config.members)
        head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return cls(backbone, config, head.to(backbone.device)).eval()


def member_adapters(members: int) -> list[str]:
    """The LoRA adapter of each ensemble member: peft's ``default`` (saved at the top of the
    directory, as a single model's), then ``member_1`` ... (saved in subfolders)."""
    return ["default", *(f"member_{m}" for m in range(1, members))]


def _all_adapters_trainable(model: torch.nn.Module, members: int) -> None:
    """Every member's LoRA weights train (peft trains the active adapter only)."""
    if members > 1:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)


def _saved_backbone(config: RewardModelConfig, path: str, device: str, trainable: bool
                    ) -> torch.nn.Module:
    """The backbone of the reward model saved in ``path``: with ``finetune: full`` the fine-tuned
    weights stored there, else a fresh configured backbone (4-bit if so) with the saved adapters."""
    if config.finetune == "full":
        return load_backbone(path, False, device_map=_device_map(device)).requires_grad_(trainable)
    backbone = load_backbone(config.backbone_path, config.load_in_4bit, config.compute_dtype,
                             device_map=_device_map(device))
    if trainable and config.load_in_4bit:
        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
    backbone = _load_adapters(backbone, path, config.members, trainable=trainable)
    if trainable:
        _all_adapters_trainable(backbone, config.members)
    return backbone


def _load_adapters(backbone: torch.nn.Module, path: str, members: int, trainable: bool) -> PeftModel:
    model = PeftModel.from_pretrained(backbone, path, is_trainable=trainable)
    for name in member_adapters(members)[1:]:
        model.load_adapter(str(Path(path) / name), adapter_name=name, is_trainable=trainable)
    return model


class RewardPair(NamedTuple):
    """One reward-model training item (TRL's names): both sides' tokens (prompt + response), the
    margin the chosen reward should exceed the rejected one by (0: plain Bradley–Terry) and where
    each side's response starts (0: the whole sequence is the response)."""

    chosen_input_ids: list[int]
    rejected_input_ids: list[int]
    margin: float = 0.0
    chosen_response_start: int = 0
    rejected_response_start: int = 0
    member_weights: tuple[float, ...] = ()  # an ensemble member's bootstrap count of this pair


def reward_pair_items(tokenized: pd.DataFrame, pairs: pd.DataFrame, split: str,
                      margin_column: str | None = None) -> tuple[list[RewardPair], list[int]]:
    """One ``RewardPair`` per pair of ``split`` (``policy.pair_sides``), and its length (the longer
    side). ``margin_column``: None (margin 0), ``score_difference`` (score_chosen -
    score_rejected) or a column of the pairs; fails, before any model loads, when a pair has no
    finite margin."""
    chosen, rejected = pair_sides(tokenized, pairs, split)
    p = pairs[pairs["split"] == split].reset_index(drop=True)
    untokenized = chosen["input_ids"].isna() | rejected["input_ids"].isna()
    if untokenized.any():
        raise ValueError(f"{int(untokenized.sum())} {split} pairs have a response missing from "
                         f"tokenized_examples (e.g. group {p.loc[untokenized, 'group_id'].iloc[0]}); "
                         "re-run the data_processing pipeline")
    if margin_column is None:
        margins = np.zeros(len(p))
    elif margin_column == "score_difference":
        margins = (p["score_chosen"] - p["score_rejected"]).to_numpy(dtype=float)
    else:
        margins = p[margin_column].to_numpy(dtype=float)
    bad = ~np.isfinite(margins)
    if bad.any():
        raise ValueError(f"reward_model.margin_column {margin_column!r}: {int(bad.sum())} of {len(p)} "
                         f"{split} pairs have no finite value (e.g. group {p.loc[bad, 'group_id'].iloc[0]}); "
                         "the data has no scores there: set margin_column: null")
    items = [RewardPair(c, r, float(m), int(cs), int(rs)) for c, r, m, cs, rs in zip(
        chosen["input_ids"], rejected["input_ids"], margins, chosen["response_start"],
        rejected["response_start"], strict=True)]
    return items, [max(len(i.chosen_input_ids), len(i.rejected_input_ids)) for i in items]


class RewardGroup(NamedTuple):
    """The K responses of one prompt (prompt + response tokens each) and their scores, as one
    training item: every pair whose scores differ is a comparison, the higher-scored one preferred
    (InstructGPT: all K(K−1)/2 comparisons of a prompt in one batch element, each response run
    once)."""

    input_ids: list[list[int]]
    response_starts: list[int]
    scores: list[float]
    member_weights: tuple[float, ...] = ()  # an ensemble member's bootstrap count of this group

    @classmethod
    def of_pair(cls, pair: RewardPair) -> RewardGroup:
        return cls([pair.chosen_input_ids, pair.rejected_input_ids],
                   [pair.chosen_response_start, pair.rejected_response_start], [1.0, 0.0],
                   pair.member_weights)


def reward_group_items(tokenized: pd.DataFrame, groups: pd.DataFrame, split: str
                       ) -> tuple[list[RewardGroup], list[int]]:
    """One ``RewardGroup`` per group of ``split`` with at least one comparison (scored groups
    whose scores differ; a labelled pair counts its chosen response above its rejected one), and
    its length (its longest response)."""
    rows = tokenized[tokenized["split"] == split].sort_values(["group_id", "response_index"])
    seqs = {gid: part for gid, part in rows.groupby("group_id", sort=False)}
    items = []
    for g in groups[groups["split"] == split].itertuples(index=False):
        if g.group_id not in seqs or len(g.responses) < 2:
            continue
        if g.scores is not None and not g.labeled_pair:
            scores = [float(x) for x in g.scores]
        elif g.labeled_pair:
            scores = [1.0, 0.0] + [0.0] * (len(g.responses) - 2)
        else:
            continue
        if max(scores) == min(scores):
            continue
        part = seqs[g.group_id]
        if len(part) != len(scores):
            raise ValueError(f"group {g.group_id}: {len(scores)} scores but {len(part)} tokenized "
                             "responses; re-run the data_processing pipeline")
        items.append(RewardGroup([list(x) for x in part["input_ids"]],
                                 [int(x) for x in part["response_start"]], scores))
    return items, [max(len(x) for x in i.input_ids) for i in items]


def group_collate():
    """``RewardGroup`` (or ``RewardPair``) items -> one packed batch (each prompt once, each
    response once) and the comparisons: ``chosen_index`` / ``rejected_index`` (rows) and
    ``comparison_group`` (the item each comes from)."""
    def fn(items: Sequence[RewardGroup | RewardPair]) -> dict[str, torch.Tensor]:
        seqs, starts, chosen, rejected, group = [], [], [], [], []
        groups = [RewardGroup.of_pair(i) if isinstance(i, RewardPair) else i for i in items]
        for g, item in enumerate(groups):
            base = len(seqs)
            seqs += item.input_ids
            starts += item.response_starts
            for a, b in itertools.permutations(range(len(item.scores)), 2):
                if item.scores[a] > item.scores[b]:
                    chosen.append(base + a)
                    rejected.append(base + b)
                    group.append(g)
        batch = packed_collate(seqs, starts)
        batch["chosen_index"], batch["rejected_index"] = torch.tensor(chosen), torch.tensor(rejected)
        batch["comparison_group"] = torch.tensor(group)
        if groups[0].member_weights:
            batch["member_weights"] = torch.tensor([list(i.member_weights) for i in groups])
        return batch
    return fn


def with_bootstrap(items: list[Any], members: int, seed: int) -> list[Any]:
    """``items`` (``RewardPair`` or ``RewardGroup``) with each ensemble member's bootstrap count of
    each: member m draws len(items) items with replacement (a seeded multinomial), so it trains
    on its own resample."""
    counts = np.stack([np.random.default_rng([seed, m]).multinomial(len(items), [1 / len(items)] * len(items))
                       for m in range(members)], axis=1).astype(float)
    return [i._replace(member_weights=tuple(c)) for i, c in zip(items, counts, strict=True)]


def training_pairs(pairs: pd.DataFrame, groups: pd.DataFrame, comparisons: str) -> pd.DataFrame:
    """The reward model's training comparisons: ``preference_pairs`` as they are (``pairs``), or
    every ordered pair of each scored group whose scores differ (``all``; labelled pairs kept)."""
    if comparisons == "pairs":
        return pairs
    return groups_to_pairs(groups, rejected="all")


def training_items(tokenized: pd.DataFrame, pairs: pd.DataFrame, groups: pd.DataFrame,
                   comparisons: str, margin_column: str | None = None
                   ) -> tuple[list[RewardPair] | list[RewardGroup], list[int]]:
    """The reward model's train-split items: ``preference_pairs`` as ``RewardPair`` (``pairs``),
    or every group with all its comparisons as ``RewardGroup`` (``all``; margins unsupported)."""
    if comparisons == "pairs":
        return reward_pair_items(tokenized, pairs, "train", margin_column)
    if margin_column is not None:
        raise ValueError(f"reward_model.margin_column = {margin_column!r} needs "
                         "reward_model.comparisons: pairs (a group's comparisons have no margin column)")
    return reward_group_items(tokenized, groups, "train")


def pair_collate():
    """``RewardPair`` items -> one packed batch (``scoring.packed_collate``: a pair's prompt once),
    chosen rows first."""
    def fn(items: Sequence[RewardPair]) -> dict[str, torch.Tensor]:
        seqs = [i.chosen_input_ids for i in items] + [i.rejected_input_ids for i in items]
        batch = packed_collate(seqs, [i.chosen_response_start for i in items]
                               + [i.rejected_response_start for i in items])
        batch["margin"] = torch.tensor([float(i.margin) for i in items])
        if items[0].member_weights:
            batch["member_weights"] = torch.tensor([list(i.member_weights) for i in items])
        return batch
    return fn


@torch.inference_mode()
def score(model: RewardModel, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
          batch_size: int = 64) -> np.ndarray:
    """Rewards of token sequences (prompt + response, the response from ``response_starts``), in
    input order, shape (N, members): the responses of one prompt in one packed batch, the prompt
    run once.

    In a process group each rank scores every N-th batch (0.0 elsewhere; see
    ``reference.response_logps``).
    """
    model.eval()
    rank, size = world()
    out = np.zeros((len(sequences), model.config.members))
    for idx in scoring_batches(sequences, response_starts, batch_size)[rank::size]:
        b = packed_collate([sequences[i] for i in idx], [response_starts[i] for i in idx])
        rewards = model(to_device(b, model.head.weight.device))
        out[idx] = rewards.reshape(len(idx), -1).double().cpu().numpy()
    return out


def ensemble_reward(members: np.ndarray, aggregate: str = "mean", penalty: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The reward a policy trains on, and the members' spread, from (N, M) member rewards.

    ``mean``: r̄ = (1/M) Σ_m r_m; ``min``: min_m r_m (worst-case optimisation); ``mean_minus_std``:
    r̄ − λ·σ, σ the members' standard deviation (uncertainty-weighted optimisation; Coste et al.,
    arXiv 2310.02743). One member: r itself, σ = 0.
    """
    members = np.asarray(members, dtype=float).reshape(len(members), -1)
    mean, std = members.mean(1), members.std(1)
    if aggregate == "mean":
        return mean, std
    if aggregate == "min":
        return members.min(1), std
    if aggregate == "mean_minus_std":
        return mean - penalty * std, std
    raise ValueError(f"aggregate must be one of {REWARD_AGGREGATES}, got {aggregate!r}")
