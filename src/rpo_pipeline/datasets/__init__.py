"""Kedro datasets the project needs and kedro-datasets does not have.

Each follows kedro-datasets' conventions: keyword-only ``__init__``, fsspec paths (a local path or
a URL; ``save_pretrained`` directories are local), ``DatasetError`` for what cannot be done, and a
YAML and a Python example in its docstring (the Python ones run as doctests).
"""

from rpo_pipeline.datasets.checkpoints import CheckpointDir, CheckpointDirDataset
from rpo_pipeline.datasets.fingerprinted import (
    FingerprintedJSONDataset,
    FingerprintedParquetDataset,
    StoredFingerprintDataset,
    read_stored_fingerprint,
)
from rpo_pipeline.datasets.model_source import ModelSource, ModelSourceDataset
from rpo_pipeline.datasets.preference_file import (
    PreferenceFileDataset,
    read_preference_file,
    read_preference_files,
    write_jsonl,
)
from rpo_pipeline.datasets.pretrained import PretrainedDirDataset, PretrainedDirsDataset, PretrainedHandle
from rpo_pipeline.datasets.report import ReportTableDataset

__all__ = [
    "CheckpointDir",
    "CheckpointDirDataset",
    "FingerprintedJSONDataset",
    "FingerprintedParquetDataset",
    "ModelSource",
    "ModelSourceDataset",
    "PreferenceFileDataset",
    "PretrainedDirDataset",
    "PretrainedDirsDataset",
    "PretrainedHandle",
    "ReportTableDataset",
    "StoredFingerprintDataset",
    "read_preference_file",
    "read_preference_files",
    "read_stored_fingerprint",
    "write_jsonl",
]
