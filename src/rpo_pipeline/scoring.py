"""Response log-probs from one packed sequence per batch: no padding token in any projection,
each prompt once, the LM head only where a token is scored.

Kedro-free. ``packed_collate`` lays a batch of rows (prompt + response token ids, index of the
first response token) out as one sequence of segments, back to back. A segment is one distinct
prompt followed by every response of the batch that continues it (a DPO pair: prompt, chosen,
rejected; an RPO group: prompt and its K responses; an SFT row: its own prompt and response):

    segment = x · y_1 · y_2 · … · y_K,   positions 0..|x|-1, then |x|..|x|+|y_k|-1 for each y_k

and attention is causal inside the prompt and inside each response, every response sees the whole
prompt, and no token sees another response or another segment (arXiv 2410.20305). The decoder runs
once over the T tokens of the batch (``packed_attention``: q, k and v are cut into the segments for
one ``scaled_dot_product_attention`` call with each segment's block mask, the only place padding
exists), then the LM head runs only on the state before each response token, and the target tokens'
log-probs come from one cross-entropy, in chunks when the (tokens × vocabulary) logits would be
large:

    log π(y | x) = Σ_t [ h_t · W_{y_t} − logsumexp_v(h_t · W_v) ],  h_t the state before y_t.

This equals one forward over padded prompt + response rows (tested to 1e-5 in value and every
gradient for GPT-2 and Llama, ``tests/test_scoring.py``). SFT, the reference cache, the policy
losses, the reward model and evaluation scoring all use this one path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

# logits above this many elements (tokens x vocabulary) are computed chunk by chunk, each chunk
# recomputed in the backward pass instead of kept (256 MiB of float32)
CHUNK_ELEMENTS = 2**26
PACKED_ATTENTION = "rpo_packed"  # the attention implementation name models score with


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, segment_index: torch.Tensor | None = None,
                     segment_unpack: torch.Tensor | None = None, **kwargs):
    """Attention over a ``packed_collate`` sequence, for transformers' attention interface.

    ``query``/``key``/``value`` (1, heads, T, d) hold the packed tokens; ``segment_index`` (S, L)
    names the packed token at each slot of each segment (T: padding), ``attention_mask`` (S, 1, L,
    L) is each segment's block mask and ``segment_unpack`` (T,) each token's slot. Calls without
    ``segment_index`` (generation, plain forwards) are transformers' SDPA attention.
    """
    if segment_index is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    heads, dim = query.shape[1], query.shape[-1]
    slots = segment_index.flatten()

    def segments(x: torch.Tensor) -> torch.Tensor:  # (1, H, T, d) -> (S, H, L, d)
        x = F.pad(x[0], (0, 0, 0, 1))  # token T: zeros, the padding slots' input
        return x.index_select(1, slots).view(heads, *segment_index.shape, dim).transpose(0, 1)

    out = F.scaled_dot_product_attention(segments(query), segments(key), segments(value),
                                         attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    out = out.transpose(0, 1).reshape(heads, -1, dim).index_select(1, segment_unpack)
    return out.transpose(0, 1).unsqueeze(0), None  # (1, T, H, d), as transformers' SDPA returns


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` (a transformers model, or a module holding one: peft, the reward model)
    to ``packed_attention``; other calls it makes stay SDPA."""
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            if m.config._attn_implementation != PACKED_ATTENTION:
                m.set_attn_implementation(PACKED_ATTENTION)
            break
    return model


def packed_collate(sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                   share_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Rows (prompt + response token ids, index of the first response token) -> one packed batch.

    Rows with the same prompt become one segment (``share_prompt=False``: one segment per row, the
    unshared computation). Keys: ``packed_ids`` / ``packed_positions`` (1, T); ``segment_index``
    (S, L), ``segment_mask`` (S, 1, L, L), ``segment_unpack`` (T,) for ``packed_attention``;
    ``score_from`` / ``score_target`` / ``score_row`` (M,): for each response token, the packed
    position of the state that predicts it, the token and its row; ``response_at`` /
    ``response_row``: the position of each response token (a row whose response starts at 0: its
    first token too) and its row; ``last_at`` (N,): each row's last token; ``n_rows``. A row whose response
    starts at 0 gives its first token to the prompt (that token has no context, so it is never
    scored); a row with no response token scores 0.
    """
    segments: list[tuple[tuple[int, ...], list[tuple[int, list[int], bool]]]] = []
    seen: dict[tuple[int, ...], int] = {}
    for n, (x, start) in enumerate(zip(sequences, response_starts, strict=True)):
        start = max(int(start), 1)
        prompt = tuple(int(t) for t in x[:start])
        if not share_prompt or prompt not in seen:
            seen[prompt] = len(segments)
            segments.append((prompt, []))
        segments[seen[prompt]][1].append((n, [int(t) for t in x[start:]], int(start) == 0))
    lengths = [len(p) + sum(len(r) for _, r, _ in rs) for p, rs in segments]
    width, total = max(lengths), sum(lengths)
    ids, positions, unpack = (np.empty(total, np.int64) for _ in range(3))
    index = np.full((len(segments), width), total, np.int64)
    mask = np.zeros((len(segments), width, width), bool)
    last = np.empty(len(sequences), np.int64)
    score_from, target, row, at_, at_row = [], [], [], [], []
    at = 0
    for s, ((prompt, responses), length) in enumerate(zip(segments, lengths, strict=True)):
        p = len(prompt)
        ids[at:at + p], positions[at:at + p] = prompt, np.arange(p)
        mask[s, :p, :p] = np.tri(p, dtype=bool)
        o = p
        for n, r, whole in responses:
            m = len(r)
            ids[at + o:at + o + m], positions[at + o:at + o + m] = r, np.arange(p, p + m)
            mask[s, o:o + m, :p] = True
            mask[s, o:o + m, o:o + m] = np.tri(m, dtype=bool)
            own = list(range(at + o, at + o + m))
            score_from += [at + p - 1] + own[:-1] if m else []
            at_ += [at] * whole + own  # a whole-sequence response includes its first token
            at_row += [n] * (whole + m)
            target += r
            row += [n] * m
            last[n] = at + o + m - 1 if m else at + p - 1
            o += m
        index[s, :length] = np.arange(at, at + length)
        unpack[at:at + length] = s * width + np.arange(length)
        mask[s, np.arange(length, width), np.arange(length, width)] = True  # padding sees itself
        at += length
    t = torch.from_numpy
    return {"packed_ids": t(ids)[None], "packed_positions": t(positions)[None],
            "segment_index": t(index), "segment_mask": t(mask)[:, None], "segment_unpack": t(unpack),
            "score_from": torch.tensor(score_from, dtype=torch.long),
            "score_target": torch.tensor(target, dtype=torch.long),
            "score_row": torch.tensor(row, dtype=torch.long),
            "response_at": torch.tensor(at_, dtype=torch.long),
            "response_row": torch.tensor(at_row, dtype=torch.long), "last_at": t(last),
            "n_rows": torch.tensor(len(sequences))}


def packed_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (T, H) of a ``packed_collate`` batch: one decoder call."""
    use_packed_attention(decoder)
    return decoder(input_ids=batch["packed_ids"], position_ids=batch["packed_positions"],
                   attention_mask=batch["segment_mask"], segment_index=batch["segment_index"],
                   segment_unpack=batch["segment_unpack"], use_cache=False).last_hidden_state[0]


def scoring_batches(sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                    batch_size: int) -> list[list[int]]:
    """Row indices in batches for inference: the rows of one prompt are adjacent (so a batch runs
    that prompt once), prompts in descending length of their longest row."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (x, start) in enumerate(zip(sequences, response_starts, strict=True)):
        groups[tuple(int(t) for t in x[:max(int(start), 1)])].append(i)
    lengths = [len(x) for x in sequences]
    ordered = sorted(groups.values(), key=lambda g: -max(lengths[i] for i in g))
    order = [i for g in ordered for i in sorted(g, key=lambda i: -lengths[i])]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def target_logps(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """log softmax(head(states))[targets] per row of ``states`` (T, H), in float32.

    Above ``chunk_elements`` logits the rows go in chunks, each recomputed in the backward pass
    (activation checkpointing), so at most one chunk of logits is alive at a time.
    """
    vocab = head.weight.shape[0]

    def part(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), y, reduction="none")

    rows = max(1, chunk_elements // vocab)
    if states.shape[0] <= rows:
        return part(states, targets)
    grad = torch.is_grad_enabled()
    return torch.cat([checkpoint(part, states[i:i + rows], targets[i:i + rows], use_reentrant=False)
                      if grad else part(states[i:i + rows], targets[i:i + rows])
                      for i in range(0, states.shape[0], rows)])


def batch_response_logps(lm: torch.nn.Module, batch: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(response | prompt) per row (float64; token terms in float32) and the
    response token counts, for a ``packed_collate`` batch."""
    if getattr(lm.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(lm).__name__} caps its logits (final_logit_softcapping), which "
                         "log-probs from the LM head alone would miss")
    h = packed_states(lm.get_decoder(), batch)
    token_lp = target_logps(lm.get_output_embeddings(), h[batch["score_from"]], batch["score_target"])
    rows, n_rows = batch["score_row"], int(batch["n_rows"])
    total = torch.zeros(n_rows, dtype=torch.float64, device=token_lp.device)
    counts = torch.zeros(n_rows, dtype=torch.long, device=token_lp.device)
    return (total.index_add(0, rows, token_lp.double()),
            counts.index_add(0, rows, torch.ones_like(rows)))


class ResponseLogps(torch.nn.Module):
    """A causal LM as a module whose forward is ``batch_response_logps``: what the training loop
    wraps (DDP / FSDP see one forward), and what inference scores with. ``lm`` keeps the weights;
    save and load ``lm``."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = use_packed_attention(lm)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_response_logps(self.lm, batch)
