"""generate_preferences: preference data sampled from π_SFT and scored by a judge."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
