"""metrics.jsonl and summary.json: resumed runs read as one run, on a local disk and in a bucket.

Buckets cannot be reached from the test machine; the bucket code path (whole-file uploads, since
objects cannot be appended to) is run against a local folder by making `fileio.is_remote` say yes.
"""

from __future__ import annotations

import json
import os

import pytest

from lmjax import fileio
from lmjax.train import metrics


def write_steps(workdir, steps, start_step=0, **kwargs):
    writer = metrics.MetricsWriter(str(workdir), start_step=start_step, **kwargs)
    for step in steps:
        writer.write(step, {"loss": 10.0 - step / 100})
    return writer


def test_resume_drops_lines_after_the_restored_step_and_a_torn_last_line(tmp_path):
    write_steps(tmp_path, [10, 20, 30, 40]).close()
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 50, "lo')  # killed mid-write
    write_steps(tmp_path, [30, 40], start_step=20).close()  # resumed from the step-20 checkpoint
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [10, 20, 30, 40]


@pytest.fixture
def bucket_mode(monkeypatch):
    monkeypatch.setattr(fileio, "is_remote", lambda path: True)


def test_bucket_workdir_uploads_the_whole_file_on_cadence_and_at_close(tmp_path, bucket_mode):
    path = tmp_path / metrics.METRICS_FILE
    writer = write_steps(tmp_path, [10, 20], upload_every_s=3600)
    assert not path.exists()  # nothing uploaded before the cadence or a flush
    writer.flush()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    writer.upload_every_s = 0.0
    writer.write(30, {"loss": 1.0})  # cadence reached: uploaded at once
    assert len(path.read_text().splitlines()) == 3
    writer.upload_every_s = 3600
    writer.write(40, {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [10, 20, 30, 40]


def test_bucket_workdir_resume_keeps_earlier_lines_and_drops_later_ones(tmp_path, bucket_mode):
    write_steps(tmp_path, [10, 20, 30, 40]).close()
    write_steps(tmp_path, [30, 40, 50], start_step=20).close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [10, 20, 30, 40, 50]


def test_summary_is_replaced_whole_and_leaves_no_temporary_file(tmp_path):
    metrics.write_summary(str(tmp_path), {"steps": 1, "final_val_loss": float("nan")})
    metrics.write_summary(str(tmp_path), {"steps": 2, "final_val_loss": 3.5})
    assert json.loads((tmp_path / metrics.SUMMARY_FILE).read_text()) == {"steps": 2, "final_val_loss": 3.5}
    assert os.listdir(tmp_path) == [metrics.SUMMARY_FILE]


def test_read_metrics_of_a_workdir_without_metrics_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.read_metrics(str(tmp_path))


def test_one_jsonl_reader_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    assert fileio.read_jsonl(path) == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert fileio.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2}')  # parsable, but its writer never finished the line
    assert fileio.read_jsonl(path) == [{"step": 1}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="records.jsonl: line 2 is not JSON"):
        fileio.read_jsonl(path)


def test_run_completion_is_read_from_the_summary(tmp_path):
    assert metrics.read_summary(str(tmp_path)) is None and not metrics.is_complete(str(tmp_path))
    metrics.write_summary(str(tmp_path), {"steps": 5, "completed": False})  # a preempted run exits 0 like this
    assert metrics.read_summary(str(tmp_path))["steps"] == 5 and not metrics.is_complete(str(tmp_path))
    metrics.write_summary(str(tmp_path), {"steps": 9, "completed": True})
    assert metrics.is_complete(str(tmp_path))
