"""Project hooks: fail fast on configuration errors, before any node runs."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl

from rpo_pipeline.evaluation import GOLD_JUDGES
from rpo_pipeline.losses import PAIR_LOSSES, RPO_DISTANCES


class ValidateParameters:
    """Check choices that would otherwise fail only when their node starts (minutes into a run)."""

    @hook_impl
    def after_context_created(self, context) -> None:
        params = context.params
        loss = (params.get("dpo") or {}).get("loss")
        if loss is not None and loss not in PAIR_LOSSES:
            raise ValueError(f"dpo.loss: unknown loss {loss!r}; valid: {sorted(PAIR_LOSSES)}")
        distance = (params.get("rpo") or {}).get("distance")
        if distance is not None and distance not in RPO_DISTANCES:
            raise ValueError(f"rpo.distance: unknown distance {distance!r}; valid: {RPO_DISTANCES}")
        judge = (params.get("evaluation") or {}).get("gold_judge")
        if judge is not None and judge not in GOLD_JUDGES:
            raise ValueError(f"evaluation.gold_judge: unknown judge {judge!r}; valid: {list(GOLD_JUDGES)}")
