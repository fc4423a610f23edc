"""Where a run stands, read from its workdir: the one rule shared by the launchers and `collect`."""

from __future__ import annotations

import json
import os

from lmjax import fileio

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
MANIFEST = "sweep.json"  # the sweep's runs, written by the launcher into the sweep dir


def read_summary(workdir: str) -> dict | None:
    """The run's summary.json, or None when absent or unreadable (a run killed while writing it)."""
    try:
        text = fileio.read_text(os.path.join(workdir, SUMMARY))
        return json.loads(text) if text is not None else None
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(workdir: str) -> bool:
    """Trained to the end: summary.json exists and says completed."""
    summary = read_summary(workdir)
    return bool(summary and summary.get("completed"))


def read_metrics(workdir: str) -> list[dict]:
    """The per-step records of metrics.jsonl; a torn last line (killed mid-write) is dropped."""
    records = []
    try:
        text = fileio.read_text(os.path.join(workdir, METRICS)) or ""
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
