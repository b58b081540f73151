"""reference: SFT of the base model (π_ref = π_SFT) and the fingerprinted reference log-prob cache."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
