"""Project hooks: fail fast on configuration errors, before any node runs."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl

from rpo_pipeline.losses import PAIR_LOSSES

POLICY_METHODS = ("dpo",)


class ValidateParameters:
    """Check choices that would otherwise fail only when their node starts (minutes into a run)."""

    @hook_impl
    def after_context_created(self, context) -> None:
        params = context.params
        for method in POLICY_METHODS:
            loss = (params.get(method) or {}).get("loss")
            if loss is not None and loss not in PAIR_LOSSES:
                raise ValueError(f"{method}.loss: unknown loss {loss!r}; valid: {sorted(PAIR_LOSSES)}")
