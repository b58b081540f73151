"""fsspec paths for the project's datasets, as kedro-datasets resolves them."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io import DatasetError
from kedro.io.core import get_protocol_and_path

from rpo_pipeline.atomic import atomic_file


def _protocol(filepath: str) -> str:
    return fsspec.core.split_protocol(str(filepath))[0] or "file"


def _local(filepath: str) -> str:
    """A local path or ``file://`` URL as kedro-datasets keeps it (relative paths stay relative)."""
    return get_protocol_and_path(str(filepath))[1]


class FsPath:
    """``filepath`` (a local path or an fsspec URL such as ``s3://bucket/key``) on its filesystem.

    Local writes go to a temporary sibling that is renamed over the target (atomic on POSIX); an
    object store's put of one object is all or nothing by itself.
    """

    def __init__(self, filepath: str, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None) -> None:
        options = {**(credentials or {}), **(fs_args or {})}
        self.protocol = _protocol(filepath)
        if self.protocol == "file":
            path = _local(filepath)
            self.fs = fsspec.filesystem("file", **options)
        else:
            self.fs, path = fsspec.core.url_to_fs(str(filepath), **options)
        self.path = PurePosixPath(path)

    @property
    def local(self) -> bool:
        return self.protocol == "file"

    def url(self, path: PurePosixPath | str | None = None) -> str:
        p = str(self.path if path is None else path)
        return p if self.local else self.fs.unstrip_protocol(p)

    def exists(self, path: PurePosixPath | str | None = None) -> bool:
        return self.fs.exists(str(self.path if path is None else path))

    def read_bytes(self, path: PurePosixPath | str | None = None) -> bytes:
        return self.fs.cat_file(str(self.path if path is None else path))

    def write_bytes(self, data: bytes, path: PurePosixPath | str | None = None) -> None:
        target = str(self.path if path is None else path)
        if self.local:
            with atomic_file(target) as tmp:
                tmp.write_bytes(data)
        else:
            self.fs.pipe_file(target, data)


def local_path(filepath: str, dataset: str) -> PurePosixPath:
    """``filepath`` (a path or a ``file://`` URL) as a local path; other protocols are refused."""
    protocol = _protocol(filepath)
    if protocol != "file":
        raise DatasetError(f"{dataset}: {filepath}: a save_pretrained directory must be on the local "
                           f"filesystem (got protocol '{protocol}'); sync it to or from object "
                           "storage outside the run")
    return PurePosixPath(_local(filepath))


def read_only(dataset: Any) -> DatasetError:
    return DatasetError(f"{type(dataset).__name__} is read-only: nothing can be saved to it")
