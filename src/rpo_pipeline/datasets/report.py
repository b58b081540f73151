"""Report tables: Parquet, a CSV copy, an MLflow table, a kedro-viz preview."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import pandas as pd
from kedro.io import AbstractDataset

from rpo_pipeline.datasets._fs import FsPath

if TYPE_CHECKING:
    from kedro_datasets._typing import TablePreview  # kedro-viz reads the annotation's name


class ReportTableDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A report table: Parquet at ``filepath``, a CSV copy beside it (same stem) for reading by
    eye, and in the active MLflow run, with ``mlflow_artifact_file``, an MLflow table
    (``mlflow.log_table``, shown as a table in the UI and charted by its compare view) and, with
    ``mlflow_csv_artifact_path``, the CSV copy as a file artifact under that path. kedro-viz
    previews its first rows (``metadata: kedro-viz: preview_args: {nrows: N}``).

    Example (YAML)::

        evaluation.samples_table:
          type: rpo_pipeline.datasets.ReportTableDataset
          filepath: data/08_reporting/evaluation_samples.parquet
          mlflow_artifact_file: evaluation/samples_table.json

    Example (Python)::

        >>> ds = ReportTableDataset(filepath=str(tmp_path / "metrics.parquet"))
        >>> ds.save(pd.DataFrame({"policy": ["dpo"], "kl": [0.5123456]}))
        >>> (tmp_path / "metrics.csv").read_text()
        'policy,kl\\ndpo,0.5123456\\n'
        >>> ds.preview(nrows=1)["data"]
        [['dpo', 0.5123]]
    """

    def __init__(self, *, filepath: str, mlflow_artifact_file: str | None = None,
                 mlflow_csv_artifact_path: str | None = None,
                 credentials: dict[str, Any] | None = None, fs_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._file = FsPath(filepath, credentials, fs_args)
        self._csv = self._file.path.with_suffix(".csv")
        self._artifact_file = mlflow_artifact_file
        self._csv_artifact_path = mlflow_csv_artifact_path
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self._file.read_bytes()))

    def save(self, data: pd.DataFrame) -> None:
        buf = io.BytesIO()
        data.to_parquet(buf, index=False)
        self._file.write_bytes(buf.getvalue())
        self._file.write_bytes(data.to_csv(index=False).encode(), self._csv)
        import mlflow  # heavy; only when the table is logged

        if mlflow.active_run() is not None:
            if self._artifact_file is not None:
                mlflow.log_table(data=data, artifact_file=self._artifact_file)
            if self._csv_artifact_path is not None:
                mlflow.log_text(data.to_csv(index=False), f"{self._csv_artifact_path}/{self._csv.name}")

    def preview(self, nrows: int = 5, decimals: int = 4) -> TablePreview:
        """kedro-viz's table preview: the first ``nrows`` rows, pandas' ``split`` orient, floats
        rounded to ``decimals`` places so that the side panel shows more than one column."""
        return self.load().head(nrows).round(decimals).to_dict(orient="split")

    def _exists(self) -> bool:
        return self._file.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._file.url(), "mlflow_artifact_file": self._artifact_file,
                "mlflow_csv_artifact_path": self._csv_artifact_path}
