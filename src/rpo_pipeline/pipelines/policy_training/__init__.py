"""policy_training: one template pipeline for preference training, instantiated per method
(namespace ``dpo`` now, ``rpo`` next) with that method's parameters."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
