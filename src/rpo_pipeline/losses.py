"""Training losses, each a short function of a model and a batch (see ``training.train``).

Kedro-free. Batches come from ``batching.collate``.
"""

from __future__ import annotations

import torch

from rpo_pipeline.batching import response_logprobs


def sft_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Response negative log-likelihood, averaged over response tokens in the batch.

    L = - (1 / Σ_b |y_b|) Σ_b Σ_{t ∈ y_b} log π(y_t | x, y_<t);  the prompt x is not scored.
    """
    logp_sum, n_tokens, _ = response_logprobs(model, batch)
    loss = -logp_sum.sum() / n_tokens.sum().clamp(min=1)
    return loss, {"tokens": float(n_tokens.sum())}
