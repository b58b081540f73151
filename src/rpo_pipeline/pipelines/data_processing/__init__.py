"""data_processing: ingest, validate, split by prompt, build the base model, format, tokenize."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
