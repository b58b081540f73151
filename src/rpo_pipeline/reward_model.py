"""Reward model: a causal-LM backbone in 4-bit NF4 (bitsandbytes) with LoRA (peft) and a scalar head.

Kedro-free. The head reads the final hidden state at each sequence's last token (``head_input:
hidden``) or the vocabulary logits there (``head_input: logits``, the seed's variant). Batches are
whole left-padded rows (``batching.collate``), or with ``share_prefix`` come from
``scoring.shared_prefix_collate``: a chosen and a rejected response (and the responses of one
prompt when scoring) run their common prefix once; the reward depends on the last token's state
only, so where the sequences are split does not change it.

Saved with ``save_pretrained``: the LoRA adapter (peft, safetensors), ``reward_head.safetensors``
and ``reward_model.json`` (backbone path, quantization, head input). Note: once a 4-bit model ran
under no-grad on CPU, bitsandbytes repacks its weights and it can no longer be trained — load a
fresh copy for each purpose (training, scoring).
"""

from __future__ import annotations

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
from rpo_pipeline.batching import collate, length_bucketed_batches
from rpo_pipeline.scoring import response_states, scoring_batches, shared_prefix_collate

# Prefix sharing in the reward model: off. Measured on the default data (4-bit tiny GPT-2, 2-core
# CPU, alternated, median of 3): training 0.92x, scoring 1.03x the speed of whole left-padded rows;
# the rows also keep the scores of before issue 13 exactly. ``share_prefix=True`` is tested equal.
SHARE_PREFIX = False
HEAD_FILE, CONFIG_FILE = "reward_head.safetensors", "reward_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RewardModelConfig:
    backbone_path: str
    load_in_4bit: bool = True
    compute_dtype: str = "float32"  # bnb_4bit_compute_dtype
    head_input: str = "hidden"  # hidden | logits
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "auto"  # see base_model.lora_target_modules; saved resolved

    def __post_init__(self) -> None:
        if self.head_input not in ("hidden", "logits"):
            raise ValueError(f"head_input must be 'hidden' or 'logits', got {self.head_input!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}")


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
    """r(x, y) = w · f(x, y) + b, with f the backbone's last-token hidden state or logits."""

    def __init__(self, backbone: torch.nn.Module, config: RewardModelConfig,
                 head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        base_cfg = backbone.config
        width = base_cfg.vocab_size if config.head_input == "logits" else base_cfg.hidden_size
        self.head = head if head is not None else torch.nn.Linear(width, 1)
        if head is None:
            torch.nn.init.normal_(self.head.weight, std=1.0 / (width + 1) ** 0.5)
            torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def for_training(cls, config: RewardModelConfig, seed: int = 0, device: str = "cpu"
                     ) -> RewardModel:
        """Fresh backbone (4-bit if configured, on ``device``: bitsandbytes' CUDA kernels on a
        GPU) + new LoRA adapter + new head, seeded."""
        torch.manual_seed(seed)
        backbone = load_backbone(config.backbone_path, config.load_in_4bit, config.compute_dtype,
                                 device_map=_device_map(device))
        if config.load_in_4bit:
            backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
        config = replace(config, target_modules=lora_target_modules(
            backbone, config.target_modules, "reward_model.lora.target_modules"))
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=config.target_modules,
                          bias="none")
        return cls(get_peft_model(backbone, lora), config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards, shape (N,), of a left-padded ``batching.collate`` batch (whole rows: the last
        position of every row is its last token) or a ``shared_prefix_collate`` batch."""
        if "input_ids" in batch:
            hidden = self.config.head_input == "hidden"
            out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], output_hidden_states=hidden,
                                use_cache=False, logits_to_keep=1)
            feats = out.hidden_states[-1][:, -1] if hidden else out.logits[:, -1]
            return self.head(feats.float()).squeeze(-1)
        before, states = response_states(self.backbone.get_decoder(), batch)
        last = batch["response_attention_mask"].sum(-1) - 1
        rows = torch.arange(states.shape[0], device=states.device)
        # the last token's state; the prompt's last state when a row has no response token
        feats = torch.where((last >= 0).unsqueeze(-1), states[rows, last.clamp(min=0)],
                            before[:, 0])
        if self.config.head_input == "logits":
            feats = self.backbone.get_output_embeddings()(feats)
        return self.head(feats.float()).squeeze(-1)

    def save_pretrained(self, path: str, **_: Any) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)  # the LoRA adapter only (safetensors)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(Path(path) / HEAD_FILE))
        (Path(path) / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", backbone_path: str | None = None,
                        **_: Any) -> RewardModel:
        """A fresh copy for inference on ``device``: backbone (4-bit if saved so) + adapter + head.
        ``backbone_path`` replaces the saved one (a copy of the backbone elsewhere, e.g. an MLflow
        Model's artifacts)."""
        config = RewardModelConfig(**json.loads((Path(path) / CONFIG_FILE).read_text()))
        if backbone_path is not None:
            config = replace(config, backbone_path=str(backbone_path))
        backbone = load_backbone(config.backbone_path, config.load_in_4bit, config.compute_dtype,
                                 device_map=_device_map(device))
        backbone = PeftModel.from_pretrained(backbone, path, is_trainable=False)
        cfg = backbone.config
        head = torch.nn.Linear(cfg.vocab_size if config.head_input == "logits" else cfg.hidden_size, 1)
        head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return cls(backbone, config, head.to(backbone.device)).eval()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences, leaving each at least one
    token of its own (the token whose state the head reads)."""
    n = min(len(a), len(b)) - 1
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RewardPair(NamedTuple):
    """One reward-model training item (TRL's names): both sides' tokens (prompt + response) and
    the margin the chosen reward should exceed the rejected one by (0: plain Bradley–Terry)."""

    chosen_input_ids: list[int]
    rejected_input_ids: list[int]
    margin: float = 0.0


def reward_pair_items(tokenized: pd.DataFrame, pairs: pd.DataFrame, split: str,
                      margin_column: str | None = None) -> tuple[list[RewardPair], list[int]]:
    """One ``RewardPair`` per pair of ``split`` (``policy.pair_sides``), and its length (the longer
    side). ``margin_column``: None (margin 0), ``score_difference`` (score_chosen -
    score_rejected) or a column of the pairs; fails, before any model loads, when a pair has no
    finite margin."""
    from rpo_pipeline.policy import pair_sides

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
    items = [RewardPair(c, r, float(m)) for c, r, m in zip(chosen["input_ids"], rejected["input_ids"],
                                                             margins, strict=True)]
    return items, [max(len(i.chosen_input_ids), len(i.rejected_input_ids)) for i in items]


def pair_collate(pad_id: int, share_prefix: bool = SHARE_PREFIX):
    """``RewardPair`` items -> one batch, chosen rows first: whole left-padded rows, or
    (``share_prefix``) each pair's common prefix (the prompt, at least) once."""
    def fn(items: Sequence[RewardPair]) -> dict[str, torch.Tensor]:
        seqs = [i.chosen_input_ids for i in items] + [i.rejected_input_ids for i in items]
        if share_prefix:
            starts = [common_prefix(i.chosen_input_ids, i.rejected_input_ids) for i in items]
            batch = shared_prefix_collate(seqs, starts + starts, pad_id)
        else:
            batch = collate(seqs, [0] * len(seqs), pad_id, padding_side="left")
        batch["margin"] = torch.tensor([float(i.margin) for i in items])
        return batch
    return fn


@torch.inference_mode()
def score(model: RewardModel, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
          pad_id: int, batch_size: int = 64, share_prefix: bool = SHARE_PREFIX) -> list[float]:
    """Rewards of token sequences (prompt + response, the response from ``response_starts``), in
    input order: the responses of one prompt in one batch, whole left-padded rows or (with
    ``share_prefix``) the prompt run once.

    In a process group each rank scores every N-th batch (0.0 elsewhere; see
    ``reference.response_logps``).
    """
    from rpo_pipeline.training import to_device, world

    model.eval()
    rank, size = world()
    out = [0.0] * len(sequences)
    batches = (scoring_batches(sequences, response_starts, batch_size) if share_prefix else
               length_bucketed_batches([len(s) for s in sequences], batch_size, 0, shuffle=False))
    for idx in batches[rank::size]:
        seqs, starts = [sequences[i] for i in idx], [response_starts[i] for i in idx]
        b = (shared_prefix_collate(seqs, starts, pad_id) if share_prefix
             else collate(seqs, [0] * len(seqs), pad_id, padding_side="left"))
        rewards = model(to_device(b, model.head.weight.device))
        for i, r in zip(idx, rewards.tolist(), strict=True):
            out[i] = r
    return out
