"""Where a run's numbers go: the console, TensorBoard event files, `DIR/metrics.jsonl`, `DIR/summary.json`,
and how they are read back.

metrics.jsonl holds one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_sec, mfu,
and val_loss/val_ppl/val_bpb at evaluation steps); it is what sweeps and plots read. A resumed run
first drops the lines after the step it resumed from, so the file reads as one uninterrupted run,
and TensorBoard is told the same through `purge_step`.

Workdirs may be local or gs:// (see `lmjax.fileio`). Only process 0 writes; the other processes of a multi-host run get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import tensorboardX

from lmjax import fileio

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def truncate_after(path: str, step: int) -> int:
    """Drop the records of a metrics.jsonl whose step is beyond `step` (and a line torn by a kill);
    returns how many lines were dropped."""
    text = fileio.read_text(path)
    if text is None:
        return 0
    kept = [r for r in fileio.read_jsonl(path) if r.get("step", math.inf) <= step]
    lines = len(text.splitlines())
    if len(kept) != lines:
        fileio.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return lines - len(kept)


def read_metrics(workdir: str) -> list[dict]:
    """All records of DIR/metrics.jsonl, in order (for notebooks, tests and sweep collectors)."""
    path = os.path.join(workdir, METRICS_FILE)
    if fileio.read_text(path) is None:
        raise FileNotFoundError(f"{path} does not exist")
    return fileio.read_jsonl(path)


def read_summary(workdir: str) -> dict | None:
    """DIR/summary.json, or None when the run has not written one (or it cannot be parsed)."""
    try:
        text = fileio.read_text(os.path.join(workdir, SUMMARY_FILE))
        return json.loads(text) if text is not None else None
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(workdir: str) -> bool:
    """Trained to the end: summary.json exists and says so (a preempted run exits 0 without this)."""
    summary = read_summary(workdir)
    return bool(summary and summary.get("completed"))


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard; `start_step` is the step the run resumed from.

    A bucket object cannot be appended to, so in a gs:// workdir the lines are kept in memory and the
    whole file is uploaded at most every `upload_every_s` seconds, and at flush and close.
    """

    def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True, upload_every_s: float = 60.0):
        self.enabled = enabled
        if not enabled:
            return
        self.path = os.path.join(workdir, METRICS_FILE)
        self.remote = fileio.is_remote(workdir)
        self.upload_every_s = upload_every_s
        truncate_after(self.path, start_step)
        if self.remote:
            self.lines = (fileio.read_text(self.path) or "").splitlines(keepends=True)
            self.uploaded_at = time.monotonic()
        else:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(self.path, "a")
        self.tensorboard = tensorboardX.SummaryWriter(
            os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None
        )

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            if time.monotonic() - self.uploaded_at >= self.upload_every_s:
                self._upload()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)

    def _upload(self) -> None:
        fileio.write_atomic(self.path, "".join(self.lines))
        self.uploaded_at = time.monotonic()

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tensorboard.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            if self.remote:
                self._upload()
            else:
                self.jsonl.flush()
            self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if not self.remote:
                self.jsonl.close()
            self.tensorboard.close()
            self.enabled = False


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """DIR/summary.json, replaced atomically so a reader never sees half of it."""
    text = json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2, default=str) + "\n"
    fileio.write_atomic(os.path.join(workdir, SUMMARY_FILE), text)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_progress(step: int, total: int, values: Mapping[str, float], elapsed: float, eta: float | None) -> str:
    """One console line a person can follow: where the run is, how well and how fast it goes."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}", f"loss {values['loss']:.4f}"]
    if "val_loss" in values:
        parts.append(f"val {values['val_loss']:.4f} (ppl {values['val_ppl']:.1f}, {values['val_bpb']:.3f} bpb)")
    if values.get("tokens_per_sec") is not None:
        parts.append(f"{values['tokens_per_sec']:,.0f} tok/s")
    if values.get("gflops_per_sec") is not None:
        parts.append(f"{values['gflops_per_sec']:,.1f} GFLOP/s")
    if values.get("mfu") is not None:
        parts.append(f"MFU {100 * values['mfu']:.2f}%")
    parts.append(f"elapsed {format_duration(elapsed)}")
    parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
    return " | ".join(parts)


def _plain(value: Any) -> Any:
    """Python scalars for JSON (numpy/jax scalars are not serializable); non-finite floats become None."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
