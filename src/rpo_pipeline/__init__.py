"""rpo-pipeline: Kedro pipelines that turn preference data into aligned language models."""

__version__ = "0.1.0"
