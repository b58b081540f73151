"""Kedro datasets the project needs and kedro-datasets does not have."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kedro.io import AbstractDataset
from kedro.utils import load_obj

from rpo_pipeline.atomic import atomic_dir, atomic_file
from rpo_pipeline.fingerprint import FINGERPRINT_FILE, HISTORY_FILE, CacheHit, Fingerprinted, hash_dir
from rpo_pipeline.preference_data import read_preference_files

if TYPE_CHECKING:
    from kedro_datasets._typing import TablePreview  # kedro-viz reads the annotation's name

PARQUET_FINGERPRINT_KEY = b"rpo_pipeline.fingerprint"
log = logging.getLogger(__name__)


class PreferenceFileDataset(AbstractDataset[None, pd.DataFrame]):
    """Read-only preference data: jsonl / json / parquet / csv, gzip or not, a path or a glob.

    Rows carry ``_source_file`` and ``_source_row`` so that validation errors name the input.

    Example::

        raw_preferences:
          type: rpo_pipeline.datasets.PreferenceFileDataset
          filepath: ../shared/data/hh_rlhf/*.jsonl.gz
    """

    def __init__(self, filepath: str, file_format: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._filepath = filepath
        self._file_format = file_format
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return read_preference_files(self._filepath, self._file_format)

    def save(self, data: pd.DataFrame) -> None:
        raise NotImplementedError(f"{type(self).__name__} is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "file_format": self._file_format}


@dataclass(frozen=True)
class PretrainedHandle:
    """A ``save_pretrained`` directory, loaded only on demand.

    Stages that may skip work (caches) fingerprint the files without loading the model, and stages
    that need several copies (a 4-bit model to train and another to score) load each fresh.
    """

    path: Path
    load_class: str = "transformers.AutoModelForCausalLM"
    load_args: dict[str, Any] = field(default_factory=dict)

    def load(self, **overrides: Any) -> Any:
        cls = load_obj(self.load_class)
        return cls.from_pretrained(str(self.path), **{**self.load_args, **overrides})

    def content_hash(self) -> str:
        """Digest of the directory's files (the stored fingerprint file excluded)."""
        return hash_dir(self.path)

    def stored_fingerprint(self) -> str | None:
        return read_stored_fingerprint(self.path)

    def training_history(self) -> dict[str, list[dict[str, float]]]:
        """The metrics its training logged (``training_history.json``), or {} if none saved."""
        f = self.path / HISTORY_FILE
        return json.loads(f.read_text()) if f.is_file() else {}


class PretrainedDirDataset(AbstractDataset[Any, PretrainedHandle]):
    """A ``save_pretrained`` directory (model, tokenizer, peft adapter, ...).

    ``save`` takes an object with ``save_pretrained``, or ``Fingerprinted(obj, fp)`` to store the
    fingerprint of its inputs with it, or ``CacheHit(fp)`` when the stored directory already has
    that fingerprint (nothing is written). Writes go to a temporary sibling directory that is
    swapped in, so an interrupted save leaves the previous directory or none, never a half-written
    one. An object with a ``training_history`` attribute (a metrics payload) also gets it written
    to ``training_history.json``, like transformers' ``trainer_state.json``, for the evaluation
    plots. ``load`` returns a ``PretrainedHandle``: ``handle.load()`` calls
    ``<load_class>.from_pretrained(filepath, **load_args)``. With ``mlflow_artifact_path`` the saved
    directory is also logged to the active MLflow run under that path.

    Example::

        base_model:
          type: rpo_pipeline.datasets.PretrainedDirDataset
          filepath: data/06_models/base_model
          load_class: transformers.AutoModelForCausalLM
    """

    def __init__(self, filepath: str, load_class: str = "transformers.AutoModelForCausalLM",
                 load_args: dict[str, Any] | None = None, save_args: dict[str, Any] | None = None,
                 mlflow_artifact_path: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(filepath)
        self._mlflow_artifact_path = mlflow_artifact_path
        self._load_class = load_class
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})  # transformers 5 always writes safetensors
        self.metadata = metadata

    def load(self) -> PretrainedHandle:
        if not self._exists():
            raise FileNotFoundError(f"{self._path}: no saved model here; run the stage that makes it")
        return PretrainedHandle(self._path, self._load_class, self._load_args)

    def save(self, data: Any) -> None:
        if isinstance(data, CacheHit):
            _check_cache_hit(self._path, data)
            return
        fp = data.fingerprint if isinstance(data, Fingerprinted) else None
        obj = data.value if isinstance(data, Fingerprinted) else data
        with atomic_dir(self._path) as tmp:
            obj.save_pretrained(str(tmp), **self._save_args)
            if fp is not None:
                (tmp / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fp}))
            history = getattr(obj, "training_history", None)
            if history:
                (tmp / HISTORY_FILE).write_text(json.dumps(history))
        if self._mlflow_artifact_path is not None:
            _log_dir_to_active_mlflow_run(self._path, self._mlflow_artifact_path)

    def _exists(self) -> bool:
        return self._path.is_dir() and any(self._path.iterdir())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "load_class": self._load_class}


def _log_dir_to_active_mlflow_run(path: Path, artifact_path: str) -> None:
    """Copy a saved directory into the active MLflow run's artifacts (kedro-mlflow's
    MlflowArtifactDataset logs single files only). No active run: nothing to do."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(path), artifact_path)


class FingerprintedParquetDataset(AbstractDataset[Any, pd.DataFrame]):
    """A Parquet table stored with the fingerprint of the inputs that produced it.

    ``save`` takes ``Fingerprinted(df, fp)`` (the fingerprint goes into the file's metadata),
    ``CacheHit(fp)`` (the stored file already matches: nothing is written) or a plain DataFrame.
    The file is written to a temporary sibling and renamed over the old one (atomic on POSIX): an
    interrupted write leaves the old table or none.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(filepath)
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(self._path)

    def save(self, data: Any) -> None:
        if isinstance(data, CacheHit):
            _check_cache_hit(self._path, data)
            return
        df = data.value if isinstance(data, Fingerprinted) else data
        table = pa.Table.from_pandas(df, preserve_index=False)
        if isinstance(data, Fingerprinted):
            meta = dict(table.schema.metadata or {})
            meta[PARQUET_FINGERPRINT_KEY] = data.fingerprint.encode()
            table = table.replace_schema_metadata(meta)
        with atomic_file(self._path) as tmp:
            pq.write_table(table, tmp)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}


def _check_cache_hit(path: Path, hit: CacheHit) -> None:
    """A stage claims the stored value is current: it must carry that fingerprint."""
    stored = read_stored_fingerprint(path)
    if stored != hit.fingerprint:
        raise ValueError(f"{path}: cache hit claimed for {hit.fingerprint} but the stored "
                         f"fingerprint is {stored}")


def read_stored_fingerprint(path: str | Path) -> str | None:
    """The fingerprint stored with a model directory or a Parquet table, or None.

    Nothing stored yet is the normal first run (None, silently). A stored fingerprint that cannot
    be read (a damaged ``fingerprint.json``, an unreadable Parquet footer) logs a warning with the
    reason, and the stage recomputes.
    """
    p = Path(path)
    try:
        if p.is_dir():
            f = p / FINGERPRINT_FILE
            if not f.exists():
                if any(p.iterdir()):
                    log.warning("%s has no %s: recomputing it", p, FINGERPRINT_FILE)
                return None
            value = json.loads(f.read_text())["fingerprint"]
            if not isinstance(value, str) or not value:
                raise ValueError(f"'fingerprint' is {value!r}, expected a non-empty string")
            return value
        if p.is_file():
            meta = pq.read_schema(p).metadata or {}
            value = meta.get(PARQUET_FINGERPRINT_KEY)
            if value is None:
                log.warning("%s has no stored fingerprint in its metadata: recomputing it", p)
                return None
            return value.decode()
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, pa.ArrowException) as e:
        log.warning("%s: cannot read the stored fingerprint (%s: %s); recomputing it", p,
                    type(e).__name__, e)
        return None
    return None


class StoredFingerprintDataset(AbstractDataset[None, str | None]):
    """Read-only: the fingerprint stored with a cache entry (model directory or Parquet file).

    Loads None when nothing (valid) is stored, so a stage can compare it with the fingerprint of
    its current inputs and skip work on a match.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(filepath)
        self.metadata = metadata

    def load(self) -> str | None:
        return read_stored_fingerprint(self._path)

    def save(self, data: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}


class ReportTableDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """A report table: Parquet at ``filepath``, a CSV copy beside it (same stem) for reading by
    eye, and in the active MLflow run, with ``mlflow_artifact_file``, an MLflow table
    (``mlflow.log_table``, shown as a table in the UI and charted by its compare view) and, with
    ``mlflow_csv_artifact_path``, the CSV copy as a file artifact under that path. kedro-viz
    previews its first rows (``metadata: kedro-viz: preview_args: {nrows: N}``).

    Example::

        evaluation.samples_table:
          type: rpo_pipeline.datasets.ReportTableDataset
          filepath: data/08_reporting/evaluation_samples.parquet
          mlflow_artifact_file: evaluation/samples_table.json
    """

    def __init__(self, filepath: str, mlflow_artifact_file: str | None = None,
                 mlflow_csv_artifact_path: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(filepath)
        self._artifact_file = mlflow_artifact_file
        self._csv_artifact_path = mlflow_csv_artifact_path
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(self._path)

    def save(self, data: pd.DataFrame) -> None:
        with atomic_file(self._path) as tmp:
            data.to_parquet(tmp, index=False)
        with atomic_file(self._path.with_suffix(".csv")) as tmp:
            data.to_csv(tmp, index=False)
        import mlflow

        if mlflow.active_run() is not None:
            if self._artifact_file is not None:
                mlflow.log_table(data=data, artifact_file=self._artifact_file)
            if self._csv_artifact_path is not None:
                mlflow.log_artifact(str(self._path.with_suffix(".csv")), self._csv_artifact_path)

    def preview(self, nrows: int = 5) -> TablePreview:
        """kedro-viz's table preview: the first ``nrows`` rows, pandas' ``split`` orient."""
        return self.load().head(nrows).to_dict(orient="split")

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "mlflow_artifact_file": self._artifact_file,
                "mlflow_csv_artifact_path": self._csv_artifact_path}
