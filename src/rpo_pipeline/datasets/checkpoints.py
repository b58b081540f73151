"""Where a training stage keeps its resumable checkpoints: ``CheckpointDirDataset``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from rpo_pipeline.datasets._fs import local_path, read_only

STATE_FILE = "trainer_state.json"  # training.CHECKPOINT_STATE


@dataclass(frozen=True)
class CheckpointDir:
    """A stage's checkpoint folder: ``last/`` is the newest checkpoint (``training.train`` writes
    and swaps it in atomically every ``train.checkpoint_every`` steps)."""

    path: Path

    def _state(self) -> dict[str, Any]:
        """The last checkpoint's ``trainer_state.json`` ({} without a checkpoint)."""
        state = self.path / "last" / STATE_FILE
        return json.loads(state.read_text()) if state.is_file() else {}

    def provenance(self) -> dict[str, Any] | None:
        """What the last checkpoint records of the run that wrote it (start model, data and the
        parameters that change the result, ``jobs.provenance``); None without a checkpoint."""
        return self._state().get("provenance")

    def step(self) -> int:
        """The step of the last checkpoint (0: none)."""
        return int(self._state().get("step", 0))


class CheckpointDirDataset(AbstractDataset[None, CheckpointDir]):
    """A training stage's checkpoint folder, declared in the catalog so that each pipeline (and
    each namespace, such as ``generated``) keeps its own. ``load`` gives a ``CheckpointDir``,
    whether or not a checkpoint exists yet; the training loop writes into it, each checkpoint with
    the fingerprint of its run, and ``resume`` continues only from a checkpoint whose fingerprint
    matches. Read-only for Kedro: ``save`` is refused.

    Example (YAML)::

        "{method}.checkpoints":
          type: rpo_pipeline.datasets.CheckpointDirDataset
          filepath: data/06_models/checkpoints/{method}

    Example (Python)::

        >>> ds = CheckpointDirDataset(filepath=str(tmp_path / "ckpt"))
        >>> ds.load().step()
        0
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(local_path(filepath, type(self).__name__))
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}

    def load(self) -> CheckpointDir:
        return CheckpointDir(self._path)

    def save(self, data: None) -> None:
        raise read_only(self)

    def _exists(self) -> bool:
        return True  # a stage without checkpoints yet starts from step 0
