"""``save_pretrained`` directories (models, tokenizers, adapters), loaded only on demand."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro.utils import load_obj

from rpo_pipeline.atomic import atomic_dir
from rpo_pipeline.datasets._fs import FsPath, local_path
from rpo_pipeline.datasets.fingerprinted import check_cache_hit
from rpo_pipeline.fingerprint import FINGERPRINT_FILE, CacheHit, Fingerprinted, file_record, hash_dir


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


class PretrainedDirDataset(AbstractDataset[Any, PretrainedHandle]):
    """A ``save_pretrained`` directory (model, tokenizer, peft adapter, ...) on the local disk.

    ``save`` takes an object with ``save_pretrained``, or ``Fingerprinted(obj, fp)`` to store the
    fingerprint of its inputs with it, or ``CacheHit(fp)`` when the stored directory already has
    that fingerprint (nothing is written). Writes go to a temporary sibling directory that is
    swapped in, so an interrupted save leaves the previous directory or none, never a half-written
    one. ``load`` returns a ``PretrainedHandle``: ``handle.load()`` calls
    ``<load_class>.from_pretrained(filepath, **load_args)``. With ``mlflow_artifact_path`` the saved
    directory is also logged to the active MLflow run under that path. ``filepath`` may be a
    ``file://`` URL; other fsspec protocols are refused (``from_pretrained`` reads local files).

    Example (YAML)::

        base_model:
          type: rpo_pipeline.datasets.PretrainedDirDataset
          filepath: data/06_models/base_model
          load_class: transformers.AutoModelForCausalLM

    Example (Python)::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> ds = PretrainedDirDataset(filepath=str(tmp_path / "lm"))
        >>> ds.save(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)))
        >>> ds.load().load().config.n_layer
        1
    """

    def __init__(self, *, filepath: str, load_class: str = "transformers.AutoModelForCausalLM",
                 load_args: dict[str, Any] | None = None, save_args: dict[str, Any] | None = None,
                 mlflow_artifact_path: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(local_path(filepath, type(self).__name__))
        self._mlflow_artifact_path = mlflow_artifact_path
        self._load_class = load_class
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})  # transformers 5 always writes safetensors
        self.metadata = metadata

    def load(self) -> PretrainedHandle:
        if not self._exists():
            raise DatasetError(f"{self._path}: no saved model here; run the stage that makes it")
        return PretrainedHandle(self._path, self._load_class, self._load_args)

    def save(self, data: Any) -> None:
        if isinstance(data, CacheHit):
            check_cache_hit(FsPath(str(self._path)), data)
            return
        fp = data.fingerprint if isinstance(data, Fingerprinted) else None
        obj = data.value if isinstance(data, Fingerprinted) else data
        with atomic_dir(self._path) as tmp:
            obj.save_pretrained(str(tmp), **self._save_args)
            if fp is not None:
                (tmp / FINGERPRINT_FILE).write_text(json.dumps(
                    {"fingerprint": fp, "files": file_record(tmp)}))
        if self._mlflow_artifact_path is not None:
            _log_dir_to_active_mlflow_run(self._path, self._mlflow_artifact_path)

    def _exists(self) -> bool:
        return self._path.is_dir() and any(self._path.iterdir())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "load_class": self._load_class}


def _log_dir_to_active_mlflow_run(path: Path, artifact_path: str) -> None:
    """Copy a saved directory into the active MLflow run's artifacts (kedro-mlflow's
    MlflowArtifactDataset logs single files only). No active run: nothing to do."""
    import mlflow  # heavy; only when a directory is logged

    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(path), artifact_path)


class PretrainedDirsDataset(AbstractDataset[dict[str, Any], dict[str, PretrainedHandle]]):
    """Several ``save_pretrained`` directories under one folder, by name (e.g. a policy's
    intermediate checkpoints by step: ``<filepath>/<name>``).

    ``save`` takes a dict of objects with ``save_pretrained`` and replaces the folder atomically
    (all of them or the previous set, never a mix); ``load`` returns a dict of
    ``PretrainedHandle`` by name, in natural order (numbers as numbers). An empty dict saves an
    empty folder.

    Example (YAML)::

        dpo.curve_policies:
          type: rpo_pipeline.datasets.PretrainedDirsDataset
          filepath: data/06_models/curve_policies/dpo

    Example (Python)::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> ds = PretrainedDirsDataset(filepath=str(tmp_path / "steps"))
        >>> lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
        >>> ds.save({"10": lm, "5": lm})
        >>> list(ds.load())
        ['5', '10']
    """

    def __init__(self, *, filepath: str, load_class: str = "transformers.AutoModelForCausalLM",
                 load_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(local_path(filepath, type(self).__name__))
        self._load_class = load_class
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    def load(self) -> dict[str, PretrainedHandle]:
        if not self._path.is_dir():
            raise DatasetError(f"{self._path}: no saved models here; run the stage that makes them")
        names = sorted((d.name for d in self._path.iterdir() if d.is_dir()),
                       key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
        return {n: PretrainedHandle(self._path / n, self._load_class, self._load_args) for n in names}

    def save(self, data: dict[str, Any]) -> None:
        with atomic_dir(self._path) as tmp:
            for name, obj in data.items():
                obj.save_pretrained(str(tmp / str(name)))

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "load_class": self._load_class}
