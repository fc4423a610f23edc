"""Run files on a local disk or in a bucket (`gs://...`), through `etils.epath` as orbax does.

A TPU-VM sweep keeps every workdir in a bucket, so summary.json, metrics.jsonl and the tokenizer
must go where the checkpoints go. Buckets need `pip install -e '.[gcs]'` (gcsfs, which epath uses
for gs:// when TensorFlow is absent). Writes are atomic: a local file is written beside its target
and renamed over it; a bucket object only appears once its upload completes.
"""

from __future__ import annotations

import json
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file, in order; [] when it does not exist. A last line cut off
    by a kill (no newline, or not parsable) is dropped, so readers see only whole records."""
    text = read_text(path)
    if not text:
        return []
    lines = text.splitlines(keepends=True)
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{os.fspath(path)}: line {i + 1} is not JSON: {line[:80]!r}") from None
    if not lines[-1].endswith("\n") and records and len(records) == len(lines):
        records.pop()  # complete-looking JSON, but the writer had not finished the line
    return records


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> str:
    """Replace `path` with one JSON object per line (atomically, as write_atomic); returns the path."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return os.fspath(path)
