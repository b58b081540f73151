"""Response log-probs with each distinct prompt run once (prefix sharing) and the LM head applied
only where a token is scored.

Kedro-free. Chosen and rejected responses, and the K responses of an RPO group, share one prompt.
A batch from ``shared_prefix_collate`` holds each distinct prompt of its rows once (left-padded)
and every row's response (right-padded); ``prompt_index[n]`` is row n's prompt. ``ResponseLogps``

1. runs the decoder over the prompts with a KV cache;
2. gathers the cache for each row (``prompt_index``: a differentiable index, so the gradients of
   every response reach the shared prompt's activations and weights);
3. runs the responses on top of it, with positions continuing from each prompt's length;
4. applies the LM head only to the hidden states that predict a response token (the prompt's last
   state, then each response state but the last), and takes the target tokens' log-probs with one
   cross-entropy, in chunks when the (tokens × vocabulary) logits would be large:

    log π(y | x) = Σ_t [ h_t · W_{y_t} − logsumexp_v(h_t · W_v) ],  h_t the state before y_t.

A ``batching.collate`` batch (one whole row per sequence) takes one plain forward instead, with
the same response-only LM head (``row_states``), or with ``full_logits`` the LM head at every
position. SFT uses whole rows with full logits: its items have nothing to share, its dropout masks
stay those of a plain forward, and its weights stay those of before to the last bit — which
matters because the reward model quantizes them to NF4, where a last-bit change can move a weight
to the next 4-bit level (measured: sliced SFT logits moved SFT losses by ~1e-6, and then the
reward model's test accuracy by 0.004).

This is the same quantity as one forward over the padded prompt + response rows (tested to 1e-5 in
loss and every gradient, ``tests/test_scoring.py``), with the prompt tokens computed once per
group instead of once per response (arXiv 2410.20305 packs the group into one sequence with a
block mask; a KV cache gives the same saving with any architecture's own attention code), and
no logits, log-softmax or backward through the LM head at prompt positions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# logits above this many elements (tokens x vocabulary) are computed chunk by chunk, each chunk
# recomputed in the backward pass instead of kept (256 MiB of float32)
CHUNK_ELEMENTS = 2**26


def shared_prefix_collate(sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                          pad_id: int) -> dict[str, torch.Tensor]:
    """Rows (prompt + response token ids, index of the first response token) -> a batch with each
    distinct prompt once.

    Keys: ``prompt_ids`` / ``prompt_attention_mask`` (G, P), left-padded; ``response_ids`` /
    ``response_attention_mask`` (N, R), right-padded; ``prompt_index`` (N,), row -> prompt. Rows
    keep their order. A row whose response starts at 0 gives its first token to the prompt (that
    token has no context, so it is never scored); a row with no response token scores 0.
    """
    seen: dict[tuple[int, ...], int] = {}
    prompts: list[tuple[int, ...]] = []
    index, responses = [], []
    for x, start in zip(sequences, response_starts, strict=True):
        start = max(int(start), 1)
        prompt = tuple(int(t) for t in x[:start])
        if prompt not in seen:
            seen[prompt] = len(prompts)
            prompts.append(prompt)
        index.append(seen[prompt])
        responses.append(x[start:])
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    p_ids = torch.full((len(prompts), width_p), pad_id, dtype=torch.long)
    p_mask = torch.zeros((len(prompts), width_p), dtype=torch.long)
    for g, p in enumerate(prompts):
        p_ids[g, width_p - len(p):] = torch.tensor(p, dtype=torch.long)
        p_mask[g, width_p - len(p):] = 1
    r_ids = torch.full((len(responses), width_r), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(responses), width_r), dtype=torch.long)
    for n, r in enumerate(responses):
        r_ids[n, :len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        r_mask[n, :len(r)] = 1
    return {"prompt_ids": p_ids, "prompt_attention_mask": p_mask, "response_ids": r_ids,
            "response_attention_mask": r_mask, "prompt_index": torch.tensor(index)}


def scoring_batches(sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                    batch_size: int) -> list[list[int]]:
    """Row indices in batches for inference: the rows of one prompt are adjacent (so a batch runs
    that prompt once), prompts in descending length of their longest row (little padding)."""
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


def response_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of a ``shared_prefix_collate`` batch: for each row, the state before
    each response token (N, R, H: the prompt's last state, then the response's), and the states at
    the response positions themselves (N, R, H)."""
    p_ids, p_mask = batch["prompt_ids"], batch["prompt_attention_mask"]
    r_ids, r_mask = batch["response_ids"], batch["response_attention_mask"]
    index = batch["prompt_index"]
    prompt = decoder(input_ids=p_ids, attention_mask=p_mask,
                     position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    cache = prompt.past_key_values
    cache.batch_select_indices(index)  # each row's copy of its prompt's keys and values
    offset = p_mask.sum(-1)[index].unsqueeze(-1)
    positions = offset + torch.arange(r_ids.shape[1], device=r_ids.device)
    out = decoder(input_ids=r_ids, attention_mask=torch.cat([p_mask[index], r_mask], dim=1),
                  position_ids=positions, past_key_values=cache, use_cache=True)
    h = out.last_hidden_state
    before = torch.cat([prompt.last_hidden_state[index, -1:], h[:, :-1]], dim=1)
    return before, h


def row_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a ``batching.collate`` batch (one padded row per sequence, prompt included): the final
    hidden state before each scored response token (T, H), those tokens (T,) and their rows (T,).
    One forward over whole rows: the layout for items with nothing to share (SFT), and the one
    whose dropout masks are those of a plain forward."""
    ids = batch["input_ids"]
    h = decoder(input_ids=ids, attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    scored = batch["response_mask"][:, 1:]  # token t+1 is predicted from state t
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1).expand_as(scored)
    return h[:, :-1][scored], ids[:, 1:][scored], rows[scored]


def batch_response_logps(lm: torch.nn.Module, batch: dict[str, torch.Tensor], full_logits: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(response | prompt) per row (float64; token terms in float32) and the
    response token counts, for a ``shared_prefix_collate`` batch (each prompt once) or a
    ``batching.collate`` batch (whole rows). The LM head runs only on scored positions, except
    with ``full_logits`` on whole rows: logits at every position, the computation before issue 13
    to the last bit (SFT keeps it: see ``jobs.fit_sft``)."""
    if getattr(lm.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(lm).__name__} caps its logits (final_logit_softcapping), which "
                         "log-probs from the LM head alone would miss")
    if "input_ids" in batch and full_logits:
        ids = batch["input_ids"]
        logits = lm(input_ids=ids, attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False).logits
        token_lp = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                    reduction="none")
        scored = batch["response_mask"][:, 1:]
        return token_lp.masked_fill(~scored, 0.0).double().sum(-1), scored.sum(-1)
    if "input_ids" in batch:
        states, targets, rows = row_states(lm.get_decoder(), batch)
        n_rows = batch["input_ids"].shape[0]
    else:
        before, _ = response_states(lm.get_decoder(), batch)
        mask = batch["response_attention_mask"].bool()
        states, targets = before[mask], batch["response_ids"][mask]
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(-1).expand_as(mask)[mask]
        n_rows = mask.shape[0]
    token_lp = target_logps(lm.get_output_embeddings(), states, targets)
    total = torch.zeros(n_rows, dtype=torch.float64, device=token_lp.device)
    counts = torch.zeros(n_rows, dtype=torch.long, device=token_lp.device)
    return (total.index_add(0, rows, token_lp.double()),
            counts.index_add(0, rows, torch.ones_like(rows)))


class ResponseLogps(torch.nn.Module):
    """A causal LM as a module whose forward is ``batch_response_logps``: what the training loop
    wraps (DDP / FSDP see one forward), and what inference scores with. ``lm`` keeps the weights;
    save and load ``lm``."""

    def __init__(self, lm: torch.nn.Module, full_logits: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.full_logits = full_logits

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_response_logps(self.lm, batch, self.full_logits)
