"""Where a run's numbers go: the console, TensorBoard event files, `DIR/metrics.jsonl`, `DIR/summary.json`.

metrics.jsonl holds one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_sec, mfu,
and val_loss/val_ppl/val_bpb at evaluation steps); it is what sweeps and plots read. A resumed run
first drops the lines after the step it resumed from, so the file reads as one uninterrupted run,
and TensorBoard is told the same through `purge_step`.

Only process 0 writes; the other processes of a multi-host run get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import tensorboardX

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def truncate_after(path: str, step: int) -> int:
    """Drop the lines of a metrics.jsonl whose step is beyond `step`; returns how many were dropped.

    Lines cut off mid-write by a kill (unparsable) are dropped too.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and record.get("step", math.inf) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


def read_metrics(workdir: str) -> list[dict]:
    """All records of DIR/metrics.jsonl, in order (for notebooks, tests and sweep collectors)."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard; `start_step` is the step the run resumed from."""

    def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        truncate_after(self.path, start_step)
        self.jsonl = open(self.path, "a")
        self.tensorboard = tensorboardX.SummaryWriter(
            os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None
        )

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tensorboard.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            self.enabled = False


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """DIR/summary.json, replaced atomically so a reader never sees half of it."""
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump({k: _plain(v) for k, v in summary.items()}, f, indent=2, default=str)
        f.write("\n")
    os.replace(f"{path}.tmp", path)


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
