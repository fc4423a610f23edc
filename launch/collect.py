"""`python -m launch.collect --sweep_dir=DIR`: one table of every run in a sweep directory.

Reads `DIR/sweep.json` (the runs the launcher was asked for) and each `DIR/<run>/summary.json` and
`metrics.jsonl`, and writes `DIR/results.csv` (one row per run, the columns fits need) and
`DIR/results.json` (the same rows plus each run's per-step curve). Runs without a summary.json are
listed as missing, reported, and left out of the fits; they never make the command fail.

A run trained with a WSD schedule may report several token budgets: summary.json's optional
`wsd_points` list ({"step", "tokens", "val_loss"} per decay point) becomes one extra row each,
named `<run>@<step>`, with its own tokens and compute.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

from etils import epath

from lmjax import fileio
from lmjax.train import metrics

MANIFEST = "sweep.json"  # the sweep's runs, written by the launcher into the sweep dir

COLUMNS = ("name", "status", "budget", "n_params", "non_embedding_params", "param_count", "tokens", "flops",
           "final_val_loss", "final_train_loss", "steps", "train_flops", "wall_time_s")


def _row(name: str, planned: dict, summary: dict | None) -> dict:
    """`n_params` is the N the sweep counts (planned `count`: non-embedding unless "total")."""
    count_key = "param_count" if planned.get("count") == "total" else "non_embedding_params"
    row = {"name": name, "budget": planned.get("budget"), "n_params": planned.get("n_params"),
           "tokens": planned.get("tokens")}
    if summary is None:
        return {**row, "status": "missing"}
    n = summary.get(count_key, row["n_params"])
    d = summary.get("tokens_seen", row["tokens"])
    row.update({"status": "finished" if summary.get("completed") else "incomplete",
                "n_params": n, "tokens": d, "flops": 6.0 * n * d if n and d else None,
                **{k: summary.get(k) for k in ("non_embedding_params", "param_count", "final_val_loss",
                                               "final_train_loss", "steps", "train_flops", "wall_time_s")}})
    return row


def _wsd_rows(row: dict, summary: dict | None) -> list[dict]:
    rows = []
    for point in (summary or {}).get("wsd_points", []):
        n, d = row["n_params"], point["tokens"]
        rows.append({**row, "name": f"{row['name']}@{point['step']}", "status": "wsd", "tokens": d,
                     "flops": 6.0 * n * d, "steps": point["step"], "final_val_loss": point["val_loss"],
                     "final_train_loss": None, "budget": None})
    return rows


def collect(sweep_dir: str) -> list[dict]:
    """Rows for every planned run (sweep.json) and every other directory holding a run's files; with curves."""
    planned = {}
    manifest = fileio.read_text(os.path.join(sweep_dir, MANIFEST))
    if manifest is not None:
        planned = {r["name"]: r for r in json.loads(manifest)["runs"]}
    found = sorted(p.name for p in epath.Path(sweep_dir).iterdir()  # run dirs, not plots/ and the like
                   if p.is_dir() and any((p / f).exists() for f in (metrics.SUMMARY_FILE, metrics.METRICS_FILE)))
    rows = []
    for name in list(planned) + [d for d in found if d not in planned]:
        workdir = os.path.join(sweep_dir, name)
        summary = metrics.read_summary(workdir)
        row = _row(name, planned.get(name, {}), summary)
        curve = [{k: r[k] for k in ("step", "loss", "val_loss") if k in r} for r in fileio.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))]
        rows.append({**row, "curve": curve})
        rows.extend({**r, "curve": []} for r in _wsd_rows(row, summary))
    return rows


def write(rows: list[dict], sweep_dir: str) -> tuple[str, str]:
    csv_path, json_path = os.path.join(sweep_dir, "results.csv"), os.path.join(sweep_dir, "results.json")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_atomic(csv_path, table.getvalue())
    fileio.write_atomic(json_path, json.dumps({"runs": rows}, indent=1))
    return csv_path, json_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.collect", description=__doc__.splitlines()[0])
    p.add_argument("--sweep_dir", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not epath.Path(args.sweep_dir).is_dir():
        print(f"error: --sweep_dir={args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    csv_path, json_path = write(rows, args.sweep_dir)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "incomplete", "missing", "wsd")}
    print(f"{len(rows)} rows: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" -> {csv_path}, {json_path}")
    missing = [r["name"] for r in rows if r["status"] == "missing"]
    if missing:
        print(f"warning: no summary.json for {len(missing)} run(s) (not run or still running): "
              f"{', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
