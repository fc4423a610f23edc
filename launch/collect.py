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
import json
import os
import sys

from launch import status

COLUMNS = ("name", "status", "budget", "non_embedding_params", "param_count", "tokens", "flops",
           "final_val_loss", "final_train_loss", "steps", "train_flops", "wall_time_s")


def _row(name: str, planned: dict, summary: dict | None) -> dict:
    row = {"name": name, "budget": planned.get("budget"),
           "non_embedding_params": planned.get("n_params"), "tokens": planned.get("tokens")}
    if summary is None:
        return {**row, "status": "missing"}
    n = summary.get("non_embedding_params", row["non_embedding_params"])
    d = summary.get("tokens_seen", row["tokens"])
    row.update({"status": "finished" if summary.get("completed") else "incomplete",
                "non_embedding_params": n, "tokens": d, "flops": 6.0 * n * d if n and d else None,
                **{k: summary.get(k) for k in ("param_count", "final_val_loss", "final_train_loss", "steps",
                                               "train_flops", "wall_time_s")}})
    return row


def _wsd_rows(row: dict, summary: dict | None) -> list[dict]:
    rows = []
    for point in (summary or {}).get("wsd_points", []):
        n, d = row["non_embedding_params"], point["tokens"]
        rows.append({**row, "name": f"{row['name']}@{point['step']}", "status": "wsd", "tokens": d,
                     "flops": 6.0 * n * d, "steps": point["step"], "final_val_loss": point["val_loss"],
                     "final_train_loss": None, "budget": None})
    return rows


def collect(sweep_dir: str) -> list[dict]:
    """Rows for every planned run (sweep.json) and every other run directory found; with curves."""
    planned = {}
    manifest = os.path.join(sweep_dir, status.MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            planned = {r["name"]: r for r in json.load(f)["runs"]}
    found = sorted(d for d in os.listdir(sweep_dir) if os.path.isdir(os.path.join(sweep_dir, d)))
    rows = []
    for name in list(planned) + [d for d in found if d not in planned]:
        workdir = os.path.join(sweep_dir, name)
        summary = status.read_summary(workdir)
        row = _row(name, planned.get(name, {}), summary)
        curve = [{k: r[k] for k in ("step", "loss", "val_loss") if k in r} for r in status.read_metrics(workdir)]
        rows.append({**row, "curve": curve})
        rows.extend({**r, "curve": []} for r in _wsd_rows(row, summary))
    return rows


def write(rows: list[dict], sweep_dir: str) -> tuple[str, str]:
    csv_path, json_path = os.path.join(sweep_dir, "results.csv"), os.path.join(sweep_dir, "results.json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as f:
        json.dump({"runs": rows}, f, indent=1)
    return csv_path, json_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.collect", description=__doc__.splitlines()[0])
    p.add_argument("--sweep_dir", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(args.sweep_dir):
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
