"""reward_model: 4-bit NF4 backbone + LoRA + scalar head, Bradley–Terry training, scoring for RPO."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
