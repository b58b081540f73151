"""Training losses, each a short function of a model and a batch (see ``training.train``).

Kedro-free. For the policy losses and SFT, ``model`` is a ``scoring.ResponseLogps`` (one forward
gives each row's summed response log-prob and token count) and batches come from
``scoring.packed_collate``; for the reward model it is a ``reward_model.RewardModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rpo_pipeline.constants import PAIR_LOSS_NAMES, RPO_DISTANCES


def token_mean(total: torch.Tensor, tokens: torch.Tensor, batch: dict) -> torch.Tensor:
    """``total / tokens``: a sum over response tokens divided by their number.

    Data parallel, ``training.train`` puts this rank's ``shard_weight`` w_r = N·n_r/n in the batch
    and scales the whole loss by it, which makes per-item means global. A per-token mean needs the
    global token count T instead: the term is multiplied by (T_r / T) / (n_r / n), so that after
    the loop's weighting and DDP's average it is Σ_r total_r / T, exactly the mean over the tokens
    of the global batch (an all-reduce of the token counts).
    """
    loss = total / tokens.clamp(min=1)
    weight = batch.get("shard_weight")
    if weight is None:
        return loss
    import torch.distributed as dist  # only inside a process group

    mine = tokens.detach().to(torch.float64) * float(weight > 0)
    everyone = mine.clone()
    dist.all_reduce(everyone)
    if weight == 0:
        return loss * 0.0
    return loss * (mine / everyone.clamp(min=1) / (weight / dist.get_world_size())).to(loss.dtype)


def sft_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Response negative log-likelihood, averaged over response tokens in the batch.

    L = - (1 / Σ_b |y_b|) Σ_b Σ_{t ∈ y_b} log π(y_t | x, y_<t);  the prompt x is not scored.
    """
    logp_sum, n_tokens = model(batch)
    loss = token_mean(-logp_sum.sum(), n_tokens.sum(), batch)
    return loss, {"tokens": float(n_tokens.sum())}


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley–Terry reward-model loss, mean over pairs.

    L = -log σ(r_c - r_r - m)  +  c · mean((r_c + r_r)²)

    m is an optional per-pair margin; the second term (reward centering, c = ``center_coef``)
    keeps rewards near zero mean.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def ensemble_bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weights: torch.Tensor,
                           margin: torch.Tensor | float = 0.0, center_coef: float = 0.0
                           ) -> torch.Tensor:
    """Bradley–Terry loss of an ensemble of M reward heads, each on its own bootstrap of the pairs.

    r_*: (B, M) rewards; weights w: (B, M), how often member m drew pair i (bootstrap counts).

    L = (1/M) Σ_m [ Σ_i w_im · (−log σ(r_c,im − r_r,im − m_i)) / Σ_i w_im ]  +  c · mean((r_c + r_r)²)

    A member that drew no pair of the batch adds nothing.
    """
    margin = margin.unsqueeze(-1) if isinstance(margin, torch.Tensor) else margin
    nll = -F.logsigmoid(r_chosen - r_rejected - margin)
    loss = ((nll * weights).sum(0) / weights.sum(0).clamp(min=1e-8)).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def reward_pair_loss_fn(center_coef: float = 0.0):
    """loss_fn for ``training.train``: chosen and rejected scored in one forward. An ensemble's
    rewards (N, M) train each member on its bootstrap weights (``batch['member_weights']``);
    accuracy and margin are those of the members' mean."""
    def fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = model(batch)
        n = rewards.shape[0] // 2
        r_c, r_r = rewards[:n], rewards[n:]
        if rewards.dim() == 2:
            weights = batch.get("member_weights", torch.ones_like(r_c))  # evaluation: every pair
            loss = ensemble_bradley_terry(r_c, r_r, weights, batch["margin"], center_coef)
            r_c, r_r = r_c.mean(-1), r_r.mean(-1)
        else:
            loss = bradley_terry(r_c, r_r, batch["margin"], center_coef)
        diff = (r_c - r_r).detach()
        return loss, {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    return fn


def reward_group_loss_fn(center_coef: float = 0.0):
    """loss_fn for ``training.train`` over ``reward_model.group_collate`` batches: every response
    scored once, the Bradley–Terry loss of each comparison, averaged within its group and then over
    groups (InstructGPT: each prompt's K(K−1)/2 comparisons weigh as one item). An ensemble's
    members each weigh the groups by their bootstrap counts.

    L = (1/M) Σ_m Σ_g w_gm · mean_{(i,j) ∈ g} [−log σ(r_im − r_jm)] / Σ_g w_gm  +  c · mean(r²)
    """
    def fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = model(batch)
        r = rewards if rewards.dim() == 2 else rewards.unsqueeze(-1)  # (N, M)
        d = r[batch["chosen_index"]] - r[batch["rejected_index"]]  # (C, M)
        group = batch["comparison_group"]
        n_groups = int(group.max()) + 1
        count = torch.zeros(n_groups, device=d.device).index_add_(0, group, torch.ones_like(group, dtype=d.dtype))
        per_group = torch.zeros(n_groups, r.shape[1], device=d.device, dtype=d.dtype).index_add_(
            0, group, -F.logsigmoid(d)) / count.unsqueeze(-1)
        w = batch.get("member_weights", torch.ones_like(per_group))
        loss = ((per_group * w).sum(0) / w.sum(0).clamp(min=1e-8)).mean()
        if center_coef:
            loss = loss + center_coef * (r ** 2).mean()
        diff = d.mean(-1).detach()
        return loss, {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
    return fn


# --------------------------------------------------------------------------------------------------
# Preference losses (DPO family). Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
# --------------------------------------------------------------------------------------------------
def dpo_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (and cDPO with label smoothing ε), per pair.

    L = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)
    """
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
            - label_smoothing * F.logsigmoid(-beta * delta))


def ipo(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO, per pair: L = (Δ − 1/(2β))², with Δ from log-probs averaged per response token."""
    return (delta - 1 / (2 * beta)) ** 2


def hinge(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinge (SLiC), per pair: L = max(0, 1 − βΔ)."""
    return torch.relu(1 - beta * delta)


PAIR_LOSSES = dict(zip(PAIR_LOSS_NAMES, (dpo_sigmoid, ipo, hinge), strict=True))
AVERAGED_LOGPS = {"ipo"}  # losses defined on per-token averaged log-probs


def preference_loss_fn(name: str, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0):
    """loss_fn for ``training.train`` over batches of ``policy.policy_collate``.

    One forward scores chosen and rejected (chosen rows first); reference log-probs come with the
    batch (from the cache). Adds ``sft_weight`` × the NLL of the chosen responses when non-zero.
    Metrics use TRL's names: rewards/chosen = β·(log π − log π_ref) of the chosen responses, etc.,
    from the same log-ratios as the loss: per-token averaged for ``ipo`` (so rewards/margins is
    β·Δ of the loss and rewards/accuracies counts Δ > 0). TRL 1.16 logs summed log-ratios for ipo
    while its loss averages; older TRL averaged both. ``logps/*`` are summed log-probs throughout.
    """
    if name not in PAIR_LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(PAIR_LOSSES)}")
    pair_loss = PAIR_LOSSES[name]

    def fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp, n_tokens = model(batch)
        ref = batch["ref_logps"].to(logp.dtype)
        b = logp.shape[0] // 2
        if name in AVERAGED_LOGPS:
            scale = n_tokens.clamp(min=1).to(logp.dtype)
            ratio = logp / scale - ref / scale
        else:
            ratio = logp - ref
        delta = ratio[:b] - ratio[b:]
        loss = pair_loss(delta, beta, label_smoothing).mean()
        if sft_weight:
            loss = loss + sft_weight * token_mean(-logp[:b].sum(), n_tokens[:b].sum(), batch)
        rewards = beta * ratio.detach()
        r_c, r_r = rewards[:b], rewards[b:]
        return loss, {
            "rewards/chosen": float(r_c.mean()), "rewards/rejected": float(r_r.mean()),
            "rewards/accuracies": float((r_c > r_r).float().mean()),
            "rewards/margins": float((r_c - r_r).mean()),
            "logps/chosen": float(logp[:b].detach().mean()),
            "logps/rejected": float(logp[b:].detach().mean()),
        }
    return fn


# --------------------------------------------------------------------------------------------------
# RPO (arXiv 2502.00203; NeMo-Aligner rpo_* losses): match the policy's implicit reward margin to
# the reward model's. a_k = β·[log π(y_k|x) − log π_ref(y_k|x)], b_k = η·r*(x, y_k).
# --------------------------------------------------------------------------------------------------
def rpo_pair(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """K = 2, per pair, with a = a_1 − a_2 and b = b_1 − b_2 (log-sigmoid forms: finite when σ saturates).

    bwd_kl: KL(Bern(σ(b)) ‖ Bern(σ(a))) = σ(b)[log σ(b) − log σ(a)] + σ(−b)[log σ(−b) − log σ(−a)]
    fwd_kl: KL(Bern(σ(a)) ‖ Bern(σ(b)))
    sq:     (a − b)²
    """
    if distance == "sq":
        return (a - b) ** 2
    la, lna, lb, lnb = F.logsigmoid(a), F.logsigmoid(-a), F.logsigmoid(b), F.logsigmoid(-b)
    if distance == "bwd_kl":
        return lb.exp() * (lb - la) + lnb.exp() * (lnb - lna)
    if distance == "fwd_kl":
        return la.exp() * (la - lb) + lna.exp() * (lna - lnb)
    raise ValueError(f"unknown RPO distance {distance!r}; valid: {RPO_DISTANCES}")


def rpo_group(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """K ≥ 2 responses per prompt, per group; a, b have shape (B, K).

    bwd_kl: Σ_k q^b_k (log q^b_k − log q^a_k), q^a = softmax(a), q^b = softmax(b)
    fwd_kl: Σ_k q^a_k (log q^a_k − log q^b_k)
    sq (sqloo): ½ Σ_k (â_k − b̂_k)², â_k = a_k − mean_{j≠k} a_j (same for b)
    At K = 2 each equals ``rpo_pair`` on a_1 − a_2, b_1 − b_2.
    """
    if distance == "sq":
        k = a.shape[-1]
        a_hat = a - (a.sum(-1, keepdim=True) - a) / (k - 1)
        b_hat = b - (b.sum(-1, keepdim=True) - b) / (k - 1)
        return 0.5 * ((a_hat - b_hat) ** 2).sum(-1)
    lqa, lqb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    if distance == "bwd_kl":
        return (lqb.exp() * (lqb - lqa)).sum(-1)
    if distance == "fwd_kl":
        return (lqa.exp() * (lqa - lqb)).sum(-1)
    raise ValueError(f"unknown RPO distance {distance!r}; valid: {RPO_DISTANCES}")


def reward_aware_loss_fn(distance: str, beta: float, eta: float, average_logps: bool = False,
                      sft_weight: float = 0.0):
    """RPO loss_fn for ``training.train`` over batches of ``policy.group_collate``.

    a_k = β·[log π(y_k|x) − log π_ref(y_k|x)] (summed over response tokens, or averaged with
    ``average_logps``), b_k = η·r*(x, y_k); K = 2 uses ``rpo_pair``, K > 2 ``rpo_group``.
    ``sft_weight`` adds w · NLL (per token) of each group's best response by target reward, as
    ``preference_loss_fn`` does for the chosen response. Metrics use
    the DPO names with chosen/rejected = the best/worst response by target reward, plus
    ``target_margin`` (mean b_best − b_worst) and ``ranking_agreement`` (share of response pairs
    the policy's implicit reward orders like the reward model).
    """
    if distance not in RPO_DISTANCES:
        raise ValueError(f"unknown RPO distance {distance!r}; valid: {RPO_DISTANCES}")

    def fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logp, n_tokens = model(batch)
        k = int(batch["group_size"])
        ref = batch["ref_logps"].to(logp.dtype)
        scale = n_tokens.clamp(min=1).to(logp.dtype) if average_logps else 1.0
        a = (beta * (logp - ref) / scale).view(-1, k)
        b = (eta * batch["targets"].to(logp.dtype)).view(-1, k)
        per_group = rpo_pair(a[:, 0] - a[:, 1], b[:, 0] - b[:, 1], distance) if k == 2 \
            else rpo_group(a, b, distance)
        with torch.no_grad():
            rows = torch.arange(a.shape[0])
            best, worst = b.argmax(-1), b.argmin(-1)
            reward = (beta * (logp - ref)).detach().view(-1, k)
            lp = logp.detach().view(-1, k)
            r_c, r_r = reward[rows, best], reward[rows, worst]
            da, db = a.unsqueeze(-1) - a.unsqueeze(-2), b.unsqueeze(-1) - b.unsqueeze(-2)
            ordered = db != 0
            agree = ((da * db > 0) & ordered).sum() / ordered.sum().clamp(min=1)
        loss = per_group.mean()
        if sft_weight:
            top = b.argmax(-1) + torch.arange(a.shape[0], device=b.device) * k
            loss = loss + sft_weight * token_mean(-logp[top].sum(), n_tokens[top].sum(), batch)
        return loss, {
            "rewards/chosen": float(r_c.mean()), "rewards/rejected": float(r_r.mean()),
            "rewards/accuracies": float((r_c > r_r).float().mean()),
            "rewards/margins": float((r_c - r_r).mean()),
            "logps/chosen": float(lp[rows, best].mean()), "logps/rejected": float(lp[rows, worst].mean()),
            "target_margin": float((b[rows, best] - b[rows, worst]).mean()),
            "ranking_agreement": float(agree),
        }
    return fn
