"""rpo_online: online RPO as ``rpo_online.rounds`` unrolled rounds (Kedro DAGs have no loops),
each a namespaced instance ``rpo_online.round_<r>`` of one round template."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
