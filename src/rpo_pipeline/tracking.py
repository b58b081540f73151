"""Metric payloads for kedro-mlflow's ``MlflowMetricsHistoryDataset``.

Nodes return plain dicts built here; the catalog entry (with ``prefix: <pipeline>``) logs them as
``<pipeline>.<name>``. No node calls ``mlflow`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MetricsPayload = dict[str, list[dict[str, float | int]]]
# a precision that ran (training.TrainResult.precision) as a number MLflow can chart
PRECISION_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}


def scalars(values: Mapping[str, float], step: int = 0) -> MetricsPayload:
    """One value per metric, at ``step``."""
    return {k: [{"value": float(v), "step": step}] for k, v in values.items()}


def histories(values: Mapping[str, Sequence[float]], steps: Sequence[int] | None = None
              ) -> MetricsPayload:
    """A value per step for each metric (steps default to 0, 1, 2, ...)."""
    out: MetricsPayload = {}
    for k, series in values.items():
        idx = steps if steps is not None else range(len(series))
        out[k] = [{"value": float(v), "step": int(s)} for s, v in zip(idx, series, strict=True)]
    return out
