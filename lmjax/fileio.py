"""Run files on a local disk or in a bucket (`gs://...`), through `etils.epath` as orbax does.

A TPU-VM sweep keeps every workdir in a bucket, so summary.json, metrics.jsonl and the tokenizer
must go where the checkpoints go. Buckets need `pip install -e '.[gcs]'` (gcsfs, which epath uses
for gs:// when TensorFlow is absent). Writes are atomic: a local file is written beside its target
and renamed over it; a bucket object only appears once its upload completes.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """A URL such as gs://bucket/dir rather than a local path."""
    return "://" in os.fspath(path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old contents or the new, never half."""
    target = epath.Path(path)
    if is_remote(path):
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.write_bytes if isinstance(data, bytes) else target.write_text)(data)
        return
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def read_text(path: str | os.PathLike) -> str | None:
    """The file's text, or None when it does not exist."""
    target = epath.Path(path)
    return target.read_text() if target.exists() else None
