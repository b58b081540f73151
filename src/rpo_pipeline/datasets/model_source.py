"""A model named by a parameter (a local directory, a Hub id, a registered ``models:/`` URI),
resolved to what a run reads: ``ModelSourceDataset``."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from rpo_pipeline.atomic import atomic_dir, atomic_file
from rpo_pipeline.datasets._fs import local_path
from rpo_pipeline.sources import MODELS_URI, hub_revision, is_hub_id

log = logging.getLogger(__name__)
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class ModelSource:
    """``requested``: the parameter's value (None: no model); ``resolved``: what it stands for in
    this run (``models:/<name>/<version number>``, ``<hub id>@<revision>``, or ``requested``);
    ``path``: the local directory holding it, when the dataset downloaded it."""

    requested: str | None
    resolved: str | None
    path: str | None = None

    @property
    def name_or_path(self) -> str | None:
        """What ``from_pretrained`` reads: the local copy, else the value as given."""
        return self.path or self.requested


def _registered_version(client: Any, name: str, ref: str, uri: str) -> str:
    """``ref`` (a version number, an alias or ``latest``) as a version number."""
    import mlflow  # heavy; only for a models:/ URI

    if ref.isdigit():
        return ref
    if ref == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise DatasetError(f"{uri}: no registered model {name!r} in {mlflow.get_registry_uri()}")
        return str(max(int(v.version) for v in versions))
    return client.get_model_version_by_alias(name, ref).version


def _download_causal_lm(name: str, version: str, target: Path) -> None:
    """A registered policy's weights (or a reward model's backbone) with its tokenizer, as one
    directory ``from_pretrained`` reads, written atomically at ``target``."""
    import mlflow  # heavy; only for a models:/ URI

    uri = f"{MODELS_URI}{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
        art = {k: local / v["path"] for k, v in flavor.get("artifacts", {}).items()}
        weights = next((art[k] for k in ("policy", "backbone") if k in art), None)
        if weights is None or "tokenizer" not in art:
            raise DatasetError(f"{uri}: no causal LM with a tokenizer among its artifacts ({sorted(art)}); "
                               "a policy or a reward model logged by this project has them")
        with atomic_dir(target) as staging:
            shutil.copytree(art["tokenizer"], staging, dirs_exist_ok=True)
            shutil.copytree(weights, staging, dirs_exist_ok=True)


class ModelSourceDataset(AbstractDataset[Mapping[str, str | None], ModelSource]):
    """A model named by a parameter, resolved once per run and recorded.

    ``save({"name_or_path": value})`` resolves the value and writes ``<filepath>/source.json``:

    * ``models:/<name>/<version | alias | latest>`` (a policy or reward model this project
      registered): pinned to its version number, which is logged (a tag of the active MLflow run
      named after ``key``, and the log); its weights and tokenizer are downloaded once per version
      to ``<filepath>/<name>/v<version>``;
    * a Hugging Face Hub id: recorded with the revision it resolves to (the cached snapshot's
      commit, else the Hub's);
    * anything else (a local directory, ``builtin:tiny-gpt2``, ``sft``, ``base``, null): as given.

    ``load()`` returns a ``ModelSource``; ``.name_or_path`` is what ``from_pretrained`` reads.

    Example (YAML)::

        base_model_source:
          type: rpo_pipeline.datasets.ModelSourceDataset
          filepath: data/06_models/sources/base_model
          key: base_model.name_or_path

    Example (Python)::

        >>> ds = ModelSourceDataset(filepath=str(tmp_path / "src"), key="base_model.name_or_path")
        >>> ds.save({"name_or_path": "builtin:tiny-gpt2"})
        >>> ds.load().name_or_path
        'builtin:tiny-gpt2'
    """

    def __init__(self, *, filepath: str, key: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(local_path(filepath, type(self).__name__))
        self._key = key
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "key": self._key}

    def load(self) -> ModelSource:
        record = self._path / SOURCE_FILE
        if not record.is_file():
            raise DatasetError(f"{record}: no resolved model source here; run the node that resolves "
                               f"{self._key}")
        return ModelSource(**json.loads(record.read_text()))

    def save(self, data: Mapping[str, str | None]) -> None:
        source = self._resolve(data["name_or_path"])
        with atomic_file(self._path / SOURCE_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(source)))

    def _resolve(self, value: str | None) -> ModelSource:
        if value is None:
            return ModelSource(None, None)
        if value.startswith(MODELS_URI):
            return self._registered(value)
        if is_hub_id(value):
            revision = hub_revision(value)
            return ModelSource(value, f"{value}@{revision}" if revision else value)
        return ModelSource(value, value)

    def _registered(self, uri: str) -> ModelSource:
        import mlflow  # heavy; only for a models:/ URI

        name, _, ref = uri[len(MODELS_URI):].partition("/")
        if not name or not ref:
            raise DatasetError(f"{self._key} = {uri!r}: expected models:/<name>/<version | alias | latest>")
        version = _registered_version(mlflow.MlflowClient(), name, ref, uri)
        target = self._path / name / f"v{version}"
        if not (target / "config.json").is_file():
            _download_causal_lm(name, version, target)
        resolved = f"{MODELS_URI}{name}/{version}"
        log.info("%s = %s resolved to %s (%s)", self._key, uri, resolved, target)
        if mlflow.active_run() is not None:
            mlflow.set_tag(f"rpo_pipeline.source.{self._key}", resolved)
        return ModelSource(uri, resolved, str(target))
