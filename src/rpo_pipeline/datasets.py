"""Kedro datasets the project needs and kedro-datasets does not have."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset
from kedro.utils import load_obj

from rpo_pipeline.preference_data import read_preference_files


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


class PretrainedDirDataset(AbstractDataset[Any, Any]):
    """A ``save_pretrained`` directory (model, tokenizer, peft adapter, ...).

    ``save`` calls ``obj.save_pretrained`` into a temporary sibling directory and swaps it in, so an
    interrupted save leaves the previous directory or none, never a half-written one. ``load`` calls
    ``<load_class>.from_pretrained(filepath, **load_args)``.

    Example::

        base_model:
          type: rpo_pipeline.datasets.PretrainedDirDataset
          filepath: data/06_models/base_model
          load_class: transformers.AutoModelForCausalLM
    """

    def __init__(self, filepath: str, load_class: str = "transformers.AutoModelForCausalLM",
                 load_args: dict[str, Any] | None = None, save_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(filepath)
        self._load_class = load_class
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})  # transformers 5 always writes safetensors
        self.metadata = metadata

    def load(self) -> Any:
        cls = load_obj(self._load_class)
        return cls.from_pretrained(str(self._path), **self._load_args)

    def save(self, data: Any) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            data.save_pretrained(str(tmp), **self._save_args)
            old = None
            if self._path.exists():
                old = self._path.with_name(f".{self._path.name}.old-{uuid.uuid4().hex[:8]}")
                self._path.rename(old)
            tmp.rename(self._path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _exists(self) -> bool:
        return self._path.is_dir() and any(self._path.iterdir())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path), "load_class": self._load_class}

