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


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley–Terry reward-model loss, mean over pairs.

    L = -log σ(r_c - r_r - m)  +  c · mean((r_c + r_r)²)

    m is an optional per-pair margin; the second term (reward centering, c = ``center_coef``)
    keeps rewards near zero mean.
    """
    loss = -torch.nn.functional.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def reward_pair_loss(center_coef: float = 0.0):
    """loss_fn for ``training.train``: chosen and rejected scored in one forward."""
    def fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = model(**batch)
        n = rewards.shape[0] // 2
        r_c, r_r = rewards[:n], rewards[n:]
        loss = bradley_terry(r_c, r_r, batch["margin"], center_coef)
        diff = (r_c - r_r).detach()
        return loss, {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    return fn
