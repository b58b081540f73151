"""policy_training: one template pipeline for preference training, instantiated per method
(namespaces ``dpo`` and ``rpo``) with that method's parameters."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
