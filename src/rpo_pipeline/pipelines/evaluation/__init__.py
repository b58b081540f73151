"""evaluation: generations from the reference and the trained policies, judged and compared."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
