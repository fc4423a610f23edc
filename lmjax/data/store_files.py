"""The files of a token store, on a local disk or behind any fsspec URL (gs://, s3://, memory://).

A pod reads its store from a bucket, so the writer and the reader go through here instead of
`open`. Remote paths use fsspec (gcsfs for gs://, from the `gcs` extra): etils.epath, which the
rest of lmjax uses, knows only a few schemes and so cannot be tested offline. Local paths use the
os module directly, the reader's hot path being one seek and read per row.

Atomicity: a local file is written beside its target and renamed over it; an object store
publishes an object only when its upload completes, so a remote file is written in place.
"""

from __future__ import annotations

import os
import posixpath
from typing import BinaryIO


def is_remote(path: str) -> bool:
    return "://" in path


def _fs(path: str):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(path)
    return fs


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if is_remote(root) else os.path.join(root, *parts)


def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def size(path: str) -> int:
    """Bytes in the file; FileNotFoundError (an OSError) when it is absent."""
    return int(_fs(path).size(path)) if is_remote(path) else os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _fs(path).cat_file(path)
    with open(path, "rb") as f:
        return f.read()


def read_range(path: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a remote file: one ranged request."""
    return _fs(path).cat_file(path, start=start, end=stop)


def makedirs(path: str) -> None:
    if is_remote(path):
        _fs(path).makedirs(path, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Delete the file if it exists."""
    if is_remote(path):
        fs = _fs(path)
        if fs.exists(path):
            fs.rm_file(path)
    elif os.path.exists(path):
        os.remove(path)


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data`; a reader sees the old file or the new one, never half of one."""
    if is_remote(path):
        _fs(path).pipe_file(path, data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class AtomicWriter:
    """A file written in pieces that appears at `path` only once `commit` is called (a kill before
    leaves no file there, locally a `.tmp<pid>` file beside it that the next run overwrites)."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path if is_remote(path) else f"{path}.tmp{os.getpid()}"
        self.file: BinaryIO = _fs(path).open(path, "wb") if is_remote(path) else open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        if is_remote(self.path):
            self.file.close()  # the upload completes here
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
