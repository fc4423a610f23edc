"""The sweep launcher: the tpu-vm backend against a fake gcloud, bad input, collect, and a local sweep."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest

from launch import collect, local, sweep as sweep_cli, tpu_vm
from lmjax.scaling import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD = os.path.join(REPO, "tests", "fake_gcloud")
TINY = os.path.join(REPO, "configs", "sweeps", "tiny_test.py")
TPU_FLAGS = ["--backend=tpu-vm", "--project=my-proj", "--zone=us-west4-a", "--sweep_dir=gs://my-bucket/sweeps/tiny",
             "--repo_url=https://example.com/lmjax.git", "--poll_seconds=0", "--accelerator_type=v5litepod-16"]


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    """The fake gcloud on PATH; returns a function reading back the argv of every call."""
    monkeypatch.setenv("PATH", FAKE_GCLOUD + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
    monkeypatch.delenv("FAKE_GCLOUD_PREEMPT_ONCE", raising=False)

    def calls():
        path = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return calls


def _verbs(calls):
    """Each call as a short verb: cat, create, describe, ssh-install, ssh-train, delete."""
    out = []
    for argv in calls:
        if argv[:2] == ["storage", "cat"]:
            out.append("cat")
        elif argv[2] == "queued-resources":
            out.append(argv[3])
        else:
            command = next(a for a in argv if a.startswith("--command="))
            out.append("ssh-train" if "lmjax.main" in command else "ssh-install")
    return out


ONE_RUN = ["cat", "describe", "create", "describe", "describe", "ssh-install", "ssh-train", "delete"]


def test_tpu_vm_creates_runs_on_all_workers_and_deletes_each_slice(gcloud):
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    calls = gcloud()
    assert _verbs(calls) == ONE_RUN * 2
    sweep = sweeps.load_sweep(TINY)
    for run, (cat, _, create, _, _, install, train, delete) in zip(sweep.runs, [calls[:8], calls[8:]]):
        node = tpu_vm.node_name(sweep, run)
        assert cat == ["storage", "cat", f"gs://my-bucket/sweeps/tiny/{run.name}/summary.json"]
        assert create == ["compute", "tpus", "queued-resources", "create", node, f"--node-id={node}",
                          "--project=my-proj", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
                          "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
        for ssh in (install, train):
            assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", node] and "--worker=all" in ssh
        assert "pip install -q -e '.[tpu,gcs]'" in install[-1]  # gcsfs: the run writes its files to gs://
        assert f"--workdir=gs://my-bucket/sweeps/tiny/{run.name}" in train[-1]
        assert f"--config.name={run.name}" in train[-1]
        assert delete[:5] == ["compute", "tpus", "queued-resources", "delete", node] and "--force" in delete


def test_tpu_vm_requeues_a_preempted_run_on_a_new_slice(gcloud, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT_ONCE", "1")
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    preempted = ["cat", "describe", "create", "describe", "describe", "ssh-install", "ssh-train", "describe",
                 "delete", "create", "describe", "describe", "ssh-install", "ssh-train", "delete"]
    calls = gcloud()
    assert _verbs(calls) == preempted + ONE_RUN
    trains = [c[-1] for c in calls[:len(preempted)] if "lmjax.main" in c[-1]]
    assert len(trains) == 2 and trains[0] == trains[1]  # the same command, so the run resumes


def test_tpu_vm_reuses_a_slice_left_by_an_interrupted_launcher(gcloud, tmp_path):
    sweep = sweeps.load_sweep(TINY)
    nodes = [tpu_vm.node_name(sweep, r) for r in sweep.runs]
    (tmp_path / "state.json").write_text(json.dumps({nodes[0]: ["ACTIVE"]}))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    assert _verbs(gcloud()) == ["cat", "describe", "describe", "ssh-install", "ssh-train", "delete"] + ONE_RUN


def test_a_run_can_ask_for_its_own_slice_type():
    opts = tpu_vm.TpuOptions(project="p", zone="z", accelerator_type="v5litepod-16", spot=False)
    assert tpu_vm.gcloud_argv("create", opts, "n", accelerator="v4-32") == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "n", "--node-id=n", "--project=p", "--zone=z",
        "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base"]


def test_dry_run_without_a_project_prints_placeholders_and_calls_nothing(gcloud, capsys, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=tpu-vm", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert gcloud() == []
    assert "gcloud compute tpus queued-resources create" in out and "'--project=<PROJECT>'" in out
    assert "--worker=all" in out and "gs://<BUCKET>/sweeps/tiny_test/kaplan_N12K" in out


def test_real_tpu_launch_without_a_project_is_refused(gcloud, capsys, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=tpu-vm", "--zone=z", "--sweep_dir=gs://b/s"]) == 2
    assert "--project" in capsys.readouterr().err and gcloud() == []


def test_preflight_refuses_runs_that_do_not_fit(gcloud, capsys, monkeypatch):
    report = types.SimpleNamespace(fits=False, message="needs 20.1 GiB per chip, v5e has 16 GiB")
    fake_aot = types.SimpleNamespace(check_fits=lambda config, topology, num_slices=1: report)
    monkeypatch.setitem(sys.modules, "lmjax.aot", fake_aot)
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS, "--preflight"]) == 1
    captured = capsys.readouterr()
    assert "refused by --preflight: needs 20.1 GiB" in captured.out and "kaplan_N12K" in captured.err
    assert "create" not in _verbs(gcloud())


def test_unknown_backend_is_a_clear_error(capsys):
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=slurm"]) == 2
    assert "unknown --backend='slurm'" in capsys.readouterr().err


def test_sweep_file_without_get_sweep_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad_sweep.py"
    bad.write_text("RUNS = []\n")
    assert sweep_cli.main([f"--sweep={bad}", "--backend=local", "--dry_run"]) == 2
    assert "defines no get_sweep()" in capsys.readouterr().err


def test_runs_that_cannot_fit_their_budget_are_refused_with_the_run_name():
    base = sweeps.load_config("configs/gpt_small.py")
    with pytest.raises(ValueError, match=r"run isoflop_C1e9_N1M: .* steps .* at least 10"):
        sweeps.isoflop(base, budgets=[1e9], sizes=[1e6])
    with pytest.raises(ValueError, match=r"run kaplan_N100: no shape .* smallest shape has"):
        sweeps.kaplan(base, sizes=[100], tokens=1e9)


@pytest.mark.parametrize("path", [TINY, os.path.join(REPO, "configs", "sweeps", "cpu_isoflop.py")])
def test_sweep_files_override_only_keys_the_base_config_has(path):
    sweep = sweeps.load_sweep(path)
    for run in sweep.runs:
        config = sweeps.load_config(sweep.base_config, {**sweep.overrides, **run.overrides})
        assert config.train.steps == run.overrides["train.steps"]
    with pytest.raises(KeyError, match="override model.nope: .* has no such key"):
        sweeps.load_config(sweep.base_config, {"model.nope": 1})


def test_cpu_isoflop_sweep_is_three_budgets_of_four_or_five_sizes():
    sweep = sweeps.load_sweep(os.path.join(REPO, "configs", "sweeps", "cpu_isoflop.py"))
    budgets = sorted({r.budget for r in sweep.runs})
    assert len(budgets) == 3 and all(sum(r.budget == c for r in sweep.runs) in (4, 5) for c in budgets)
    assert all(abs(r.flops / r.budget - 1) < 0.02 for r in sweep.runs)


def test_local_dry_run_prints_one_main_command_per_run(capsys, tmp_path):
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=local", "--dry_run", f"--sweep_dir={tmp_path}"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "lmjax.main" in l]
    assert len(lines) == 2
    assert f"--workdir={tmp_path}/kaplan_N12K" in lines[0] and "--config=configs/gpt_small.py" in lines[0]
    assert "--config.train.steps=4" in lines[0]
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_local_backend_skips_finished_runs_resumes_failed_ones_and_lists_failures(tmp_path, monkeypatch, capsys):
    sweep = sweeps.load_sweep(TINY)
    monkeypatch.setenv("FAKE_MAIN_FAIL", "kaplan_N40K")
    assert local.run_sweep(sweep, str(tmp_path), parallel=2, main="tests.fixtures.fake_main") == ["kaplan_N40K"]
    first = capsys.readouterr().out
    assert "kaplan_N12K: done in" in first and "kaplan_N40K: FAILED (exit 1)" in first
    assert "simulated crash" in (tmp_path / "kaplan_N40K" / "train.log").read_text()
    monkeypatch.setenv("FAKE_MAIN_FAIL", "")
    assert local.run_sweep(sweep, str(tmp_path), main="tests.fixtures.fake_main") == []
    second = capsys.readouterr().out
    assert "kaplan_N12K: finished already, skipped (val_loss 2.1000)" in second
    assert "kaplan_N40K: resuming" in second and "kaplan_N40K: done in" in second
    assert (tmp_path / "kaplan_N12K" / "starts.txt").read_text().count("start") == 1
    assert (tmp_path / "kaplan_N40K" / "starts.txt").read_text().count("start") == 2


def test_collect_reports_a_missing_summary_without_failing(tmp_path, capsys):
    manifest = {"name": "s", "base_config": "x", "overrides": {}, "runs": [
        {"name": "a", "overrides": {}, "n_params": 1000, "tokens": 5000, "budget": 3e7},
        {"name": "b", "overrides": {}, "n_params": 2000, "tokens": 2500, "budget": 3e7}]}
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(
        {"completed": True, "non_embedding_params": 1100, "tokens_seen": 5120, "final_val_loss": 3.5, "steps": 10}))
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 5, "loss": 4.0}\n{"step": 10, "loss": 3.6, "val_loss": 3.5}\n{"st')
    (tmp_path / "b").mkdir()
    assert collect.main([f"--sweep_dir={tmp_path}"]) == 0
    assert "no summary.json for 1 run(s)" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["name"], r["status"]) for r in rows] == [("a", "finished"), ("b", "missing")]
    assert float(rows[0]["flops"]) == 6 * 1100 * 5120
    runs = json.load(open(tmp_path / "results.json"))["runs"]
    assert runs[0]["curve"] == [{"step": 5, "loss": 4.0}, {"step": 10, "loss": 3.6, "val_loss": 3.5}]


def test_collect_counts_n_the_way_the_sweep_planned_it(tmp_path):
    """A sweep with count="total" plans N as every parameter; collect reads param_count for it, not
    the non-embedding count, so C = 6 N D means the same in the plan and in the fits."""
    base = sweeps.load_config("configs/gpt_small.py", {"data.vocab_size": 1024, "data.seq_len": 128, "train.batch_size": 8})
    opts = sweeps.RunOptions(num_layers=2, head_dim=8, count="total", min_steps=5)
    (run,) = sweeps.isoflop(base, [1e10], [62e3], opts)
    assert run.count == "total" and run.n_params == 62336 and run.overrides["model.embed_dim"] == 32
    manifest = {"name": "s", "base_config": "x", "overrides": {}, "runs": [dataclasses.asdict(run)]}
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "summary.json").write_text(json.dumps(
        {"completed": True, "non_embedding_params": 25472, "param_count": 62336, "tokens_seen": run.tokens,
         "final_val_loss": 3.5}))
    (row,) = collect.collect(str(tmp_path))
    assert row["n_params"] == 62336 and row["non_embedding_params"] == 25472
    assert row["flops"] == 6 * 62336 * run.tokens


def test_collect_turns_wsd_decay_points_into_rows(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps(
        {"completed": True, "non_embedding_params": 100, "tokens_seen": 4000, "final_val_loss": 3.0,
         "wsd_points": [{"step": 10, "tokens": 1000, "val_loss": 3.4}, {"step": 20, "tokens": 2000, "val_loss": 3.2}]}))
    rows = collect.collect(str(tmp_path))
    assert [(r["name"], r["tokens"], r["final_val_loss"]) for r in rows] == [
        ("r", 4000, 3.0), ("r@10", 1000, 3.4), ("r@20", 2000, 3.2)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "lmjax", "main.py")), reason="needs the trainer (lmjax/main.py)")
def test_tiny_local_sweep_runs_skips_when_rerun_and_collects(tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    cmd = [sys.executable, "-m", "launch.sweep", f"--sweep={TINY}", "--backend=local", f"--sweep_dir={sweep_dir}",
           "--parallel=2"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    logs = "".join(open(os.path.join(sweep_dir, d, "train.log")).read()[-2000:] for d in ("kaplan_N12K", "kaplan_N40K")
                   if os.path.exists(os.path.join(sweep_dir, d, "train.log")))
    assert first.returncode == 0, first.stdout + first.stderr + logs
    assert first.stdout.count(": done in") == 2
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("finished already, skipped") == 2
    collected = subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={TINY}", f"--sweep_dir={sweep_dir}",
                                "collect"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stderr
    rows = list(csv.DictReader(open(os.path.join(sweep_dir, "results.csv"))))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(float(r["final_val_loss"]) > 0 and int(r["steps"]) == 4 for r in rows)
