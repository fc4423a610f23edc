"""The sweep launcher: the tpu-vm backend against a fake gcloud, bad input, collect, and a local sweep."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest

from launch import collect, local, slice_pool, sweep as sweep_cli, tpu_vm
from lmjax import config as config_lib
from lmjax.scaling import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD = os.path.join(REPO, "tests", "fake_gcloud")
TINY = os.path.join(REPO, "configs", "sweeps", "tiny_test.py")
TPU_FLAGS = ["--backend=tpu-vm", "--project=my-proj", "--zone=us-west4-a", "--sweep_dir=gs://my-bucket/sweeps/tiny",
             "--repo_url=https://example.com/lmjax.git", "--poll_seconds=0", "--accelerator_type=v5litepod-16"]


class FakeCloud:
    """What the fake gcloud saw and holds: its calls, slices, trainer starts and bucket."""

    def __init__(self, root):
        self.root = root
        self.sweep = sweeps.load_sweep(TINY)

    def calls(self) -> list[list[str]]:
        path = self.root / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def state(self) -> dict:
        path = self.root / "state.json"
        if not path.exists():
            return {"nodes": {}, "created": [], "deleted": [], "starts": []}
        return json.loads(path.read_text())

    def node(self, run_name: str) -> str:
        return tpu_vm.node_name(self.sweep, next(r for r in self.sweep.runs if r.name == run_name))

    def summary(self, run_name: str) -> dict | None:
        path = self.root / "bucket" / "my-bucket" / "sweeps" / "tiny" / run_name / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def starts(self, run_name: str) -> list[bool]:
        """For each start of the run's trainer: whether it found a checkpoint to resume from."""
        return [s["resumed"] for s in self.state()["starts"] if s["workdir"].endswith("/" + run_name)]

    def ssh_commands(self, kind: str) -> list[list[str]]:
        """The ssh calls of one kind: install, launch (the trainer) or status (the launcher's polls)."""
        def kind_of(command):
            return "launch" if "lmjax.main" in command else "install" if "pip install" in command else "status"
        return [c for c in self.calls() if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and kind_of(c[-1]) == kind]

    def assert_no_slice_left(self):
        state = self.state()
        assert state["nodes"] == {} and sorted(state["created"]) == sorted(state["deleted"])


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake gcloud first on PATH (run by this interpreter), with no failure scenario set."""
    monkeypatch.setenv("PATH", os.pathsep.join([FAKE_GCLOUD, os.path.dirname(sys.executable), os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
    for scenario in ("PREEMPT", "MAINTENANCE", "CRASH", "DROP_POLL", "NEVER_ACTIVE"):
        monkeypatch.delenv(f"FAKE_GCLOUD_{scenario}", raising=False)
    return FakeCloud(tmp_path)


RUN_A, RUN_B = "kaplan_N12K", "kaplan_N40K"


def test_tpu_vm_runs_each_run_to_a_completed_summary_and_deletes_its_slice(fake):
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS, "--parallel=2"]) == 0
    for run in (RUN_A, RUN_B):
        assert fake.summary(run)["completed"] and fake.starts(run) == [False]
        (launch,) = [c for c in fake.ssh_commands("launch") if c[4] == fake.node(run)]
        assert "--worker=all" in launch  # every host of the slice runs the trainer
        assert f"--workdir=gs://my-bucket/sweeps/tiny/{run}" in launch[-1] and f"--config.name={run}" in launch[-1]
    assert sorted(fake.state()["created"]) == sorted([fake.node(RUN_A), fake.node(RUN_B)])
    fake.assert_no_slice_left()
    creates = [c for c in fake.calls() if c[3:4] == ["create"]]
    assert all("--spot" in c and "--runtime-version=v2-alpha-tpuv5-lite" in c for c in creates)
    installs = fake.ssh_commands("install")
    assert installs and all("--worker=all" in c and "'.[tpu,gcs]'" in c[-1] for c in installs)  # gcsfs for gs://


def test_a_preempted_run_is_requeued_on_a_new_slice_and_resumes(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT", fake.node(RUN_A))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    assert fake.state()["created"].count(fake.node(RUN_A)) == 2
    assert fake.starts(RUN_A) == [False, True]  # the second trainer found the first one's checkpoint
    assert fake.summary(RUN_A) == {"name": RUN_A, "resumed": True, "completed": True, "steps": 4}
    out = capsys.readouterr().out
    preempted, completed = out.index(f"{RUN_A}: slice SUSPENDED; re-queueing"), out.index(f"{RUN_A}: completed")
    assert preempted < completed and out.count(f"{RUN_A}: completed") == 1  # its exit 0 was not taken for done
    assert fake.summary(RUN_B)["completed"]
    fake.assert_no_slice_left()


def test_a_run_stopped_on_a_healthy_slice_restarts_there_and_resumes(fake, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_MAINTENANCE", fake.node(RUN_A))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    assert fake.state()["created"].count(fake.node(RUN_A)) == 1
    assert fake.starts(RUN_A) == [False, True] and fake.summary(RUN_A)["completed"]
    fake.assert_no_slice_left()


def test_max_attempts_bounds_the_slices_a_run_gets(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT", fake.node(RUN_A))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS, "--max_attempts=1"]) == 1
    captured = capsys.readouterr()
    assert f"{RUN_A}: gave up after 1 attempts" in captured.out and f"runs failed: {RUN_A}" in captured.err
    assert fake.summary(RUN_A)["completed"] is False and fake.summary(RUN_B)["completed"]
    fake.assert_no_slice_left()


def test_a_crashed_run_fails_without_a_retry_and_the_other_run_completes(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GCLOUD_CRASH", fake.node(RUN_A))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 1
    captured = capsys.readouterr()
    assert f"{RUN_A}: trainer crashed (exit 1)" in captured.out and f"runs failed: {RUN_A}" in captured.err
    assert fake.starts(RUN_A) == [False] and fake.state()["created"].count(fake.node(RUN_A)) == 1
    assert fake.summary(RUN_A) is None and fake.summary(RUN_B)["completed"]
    fake.assert_no_slice_left()


def test_a_dropped_status_poll_does_not_fail_the_run(fake, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_DROP_POLL", fake.node(RUN_A))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    assert fake.state()["dropped"] == [fake.node(RUN_A)]
    assert fake.starts(RUN_A) == [False] and fake.summary(RUN_A)["completed"]
    polls = fake.ssh_commands("status")
    assert len(polls) >= 2 and all("--worker=0" in c for c in polls)  # polls ask one worker, not all
    fake.assert_no_slice_left()


def test_a_slice_that_never_becomes_active_fails_at_the_timeout_and_is_deleted(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GCLOUD_NEVER_ACTIVE", f"{fake.node(RUN_A)},{fake.node(RUN_B)}")
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS, "--active_timeout_s=0"]) == 1
    captured = capsys.readouterr()
    assert f"{RUN_A}: no capacity" in captured.out and f"runs failed: {RUN_A}, {RUN_B}" in captured.err
    assert fake.state()["starts"] == [] and len(fake.state()["created"]) == 2
    fake.assert_no_slice_left()


def test_a_run_completed_already_is_skipped_without_a_slice(fake):
    done = fake.root / "bucket" / "my-bucket" / "sweeps" / "tiny" / RUN_A
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"completed": True}))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    assert fake.state()["created"] == [fake.node(RUN_B)] and fake.starts(RUN_A) == []
    fake.assert_no_slice_left()


def test_a_rerun_launcher_attaches_to_the_trainer_running_on_its_slice(fake):
    """A launcher interrupted mid-run left a slice up with the trainer running: a second launcher
    must wait for that trainer, not start another beside it."""
    workdir = f"gs://my-bucket/sweeps/tiny/{RUN_A}"
    running = {"workdir": workdir, "resumed": False, "polls": 0, "rc": None}
    (fake.root / "state.json").write_text(json.dumps(
        {"nodes": {fake.node(RUN_A): {"states": ["ACTIVE"], "training": running}},
         "starts": [{"node": fake.node(RUN_A), "workdir": workdir, "resumed": False}]}))
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS]) == 0
    assert fake.state()["created"] == [fake.node(RUN_B)] and fake.starts(RUN_A) == [False]
    assert [c[4] for c in fake.ssh_commands("install")] == [fake.node(RUN_B)]  # no reinstall under a running trainer
    assert fake.summary(RUN_A)["completed"]
    assert fake.state()["nodes"] == {} and fake.node(RUN_A) in fake.state()["deleted"]


def test_the_trainer_outlives_its_launch_and_reports_its_exit_status(tmp_path):
    """The launch and status commands in a real shell, as a worker runs them: the trainer keeps
    running after the launching shell exits, a second launch does not start another, and its
    arguments arrive intact through both levels of quoting."""
    home = tmp_path / "home"
    trainer = home / "lmjax" / "lmjax"
    trainer.mkdir(parents=True)
    (trainer / "__init__.py").write_text("")
    (trainer / "main.py").write_text(
        "import os, sys, time\n"
        "open(os.path.expanduser('~/argv.txt'), 'a').write(repr(sys.argv[1:]) + '\\n')\n"
        "while not os.path.exists(os.path.expanduser('~/release')):\n"
        "    time.sleep(0.02)\n"
        "sys.exit(3)\n")
    sweep = sweeps.load_sweep(TINY)
    run = sweep.runs[0]
    opts = tpu_vm.TpuOptions(sweep_dir="gs://b/s", python=sys.executable)
    env = {**os.environ, "HOME": str(home)}

    def on_worker(command):
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30).stdout

    try:
        on_worker(tpu_vm.launch_command(opts, sweep, run))
        assert on_worker(tpu_vm.launch_command(opts, sweep, run)).strip() == f"{run.name}: running already"
        assert on_worker(tpu_vm.status_command(run)).strip() == "running"
    finally:
        (home / "release").write_text("")  # the trainer exits, also when an assertion failed
    for _ in range(500):
        status = on_worker(tpu_vm.status_command(run)).strip()
        if status != "running":
            break
        time.sleep(0.02)
    assert status == "3"
    (argv,) = (home / "argv.txt").read_text().splitlines()
    assert "'--config.data.source=text:lmjax/*.py'" in argv and f"'--workdir=gs://b/s/{run.name}'" in argv


def test_a_run_can_ask_for_its_own_slice_type(fake):
    run = dataclasses.replace(fake.sweep.runs[0], accelerator="v4-32")
    sweep = sweeps.Sweep(fake.sweep.name, fake.sweep.base_config, [run], fake.sweep.overrides)
    opts = tpu_vm.TpuOptions(project="p", zone="z", accelerator_type="v5litepod-16", spot=False,
                             sweep_dir="gs://my-bucket/sweeps/tiny", repo_url="u", poll_seconds=0)
    assert tpu_vm.run_sweep(sweep, opts) == []
    (create,) = [c for c in fake.calls() if c[3:4] == ["create"]]
    assert "--accelerator-type=v4-32" in create and "--runtime-version=tpu-ubuntu2204-base" in create
    assert "--spot" not in create


def test_dry_run_without_a_project_prints_placeholders_and_calls_nothing(fake, capsys, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=tpu-vm", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert fake.calls() == []
    assert "gcloud compute tpus queued-resources create" in out and "'--project=<PROJECT>'" in out
    assert "--worker=all" in out and "gs://<BUCKET>/sweeps/tiny_test/kaplan_N12K" in out


def test_real_tpu_launch_without_a_project_is_refused(fake, capsys, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=tpu-vm", "--zone=z", "--sweep_dir=gs://b/s"]) == 2
    assert "--project" in capsys.readouterr().err and fake.calls() == []


def test_bad_tpu_vm_flags_are_one_error_line(fake, capsys):
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS, "--max_attempts=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max_attempts must be at least 1") and err.count("\n") == 1
    assert fake.calls() == []


def test_preflight_refuses_runs_that_do_not_fit(fake, capsys, monkeypatch):
    report = types.SimpleNamespace(fits=False, message="needs 20.1 GiB per chip, v5e has 16 GiB")
    fake_aot = types.SimpleNamespace(check_fits=lambda config, topology, num_slices=1: report)
    monkeypatch.setitem(sys.modules, "lmjax.aot", fake_aot)
    assert sweep_cli.main([f"--sweep={TINY}", *TPU_FLAGS, "--preflight"]) == 1
    captured = capsys.readouterr()
    assert "refused by --preflight: needs 20.1 GiB" in captured.out and "kaplan_N12K" in captured.err
    assert fake.state()["created"] == []


def test_unknown_backend_is_a_clear_error(capsys):
    assert sweep_cli.main([f"--sweep={TINY}", "--backend=slurm"]) == 2
    assert "unknown --backend='slurm'" in capsys.readouterr().err


def test_sweep_file_without_get_sweep_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad_sweep.py"
    bad.write_text("RUNS = []\n")
    assert sweep_cli.main([f"--sweep={bad}", "--backend=local", "--dry_run"]) == 2
    assert "defines no get_sweep()" in capsys.readouterr().err


def test_runs_that_cannot_fit_their_budget_are_refused_with_the_run_name():
    base = config_lib.load("configs/gpt_small.py")
    with pytest.raises(ValueError, match=r"run isoflop_C1e9_N1M: .* steps .* at least 10"):
        sweeps.isoflop(base, budgets=[1e9], sizes=[1e6])
    with pytest.raises(ValueError, match=r"run kaplan_N100: no shape .* smallest shape has"):
        sweeps.kaplan(base, sizes=[100], tokens=1e9)


@pytest.mark.parametrize("path", [TINY, os.path.join(REPO, "configs", "sweeps", "cpu_isoflop.py"),
                                  os.path.join(REPO, "configs", "sweeps", "cpu_extrapolate.py")])
def test_sweep_files_override_only_keys_the_base_config_has(path):
    sweep = sweeps.load_sweep(path)
    for run in sweep.runs:
        config = config_lib.load(sweep.base_config, {**sweep.overrides, **run.overrides})
        assert config.train.steps == run.overrides["train.steps"]
    with pytest.raises(ValueError, match="unknown config key config.model.nope"):
        config_lib.load(sweep.base_config, {"model.nope": 1})


def test_cpu_isoflop_sweep_is_three_budgets_of_four_or_five_sizes():
    sweep = sweeps.load_sweep(os.path.join(REPO, "configs", "sweeps", "cpu_isoflop.py"))
    budgets = sorted({r.budget for r in sweep.runs})
    assert len(budgets) == 3 and all(sum(r.budget == c for r in sweep.runs) in (4, 5) for c in budgets)
    assert all(abs(r.flops / r.budget - 1) < 0.02 for r in sweep.runs)


def test_cpu_extrapolate_adds_three_sizes_at_ten_times_the_demos_largest_budget():
    demo = sweeps.load_sweep(os.path.join(REPO, "configs", "sweeps", "cpu_isoflop.py"))
    sweep = sweeps.load_sweep(os.path.join(REPO, "configs", "sweeps", "cpu_extrapolate.py"))
    assert sweep.runs[:len(demo.runs)] == demo.runs and sweep.overrides == demo.overrides  # the same runs, resumable
    extra = sweep.runs[len(demo.runs):]
    assert [r.budget for r in extra] == [10 * max(r.budget for r in demo.runs)] * 3
    assert [r.n_params for r in extra] == [334464, 544256, 803200]
    assert all(abs(r.flops / r.budget - 1) < 0.01 and r.overrides["model.num_layers"] == 2 for r in extra)


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
    base = config_lib.load("configs/gpt_small.py", {"data.vocab_size": 1024, "data.seq_len": 128, "train.batch_size": 8})
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


POOL_SWEEP = '''
import dataclasses
from lmjax.scaling import sweeps

def get_sweep():
    tiny = sweeps.load_sweep({tiny!r})
    runs = [dataclasses.replace(tiny.runs[0], name=f"r{{i}}", accelerator={accelerators!r}[i]) for i in range(5)]
    return sweeps.Sweep("tiny", tiny.base_config, runs, tiny.overrides)
'''


@pytest.fixture
def pool_sweep(tmp_path):
    """A sweep file of 5 tiny runs (r0..r4); `accelerators` gives each its slice type (None: the default)."""
    def write(accelerators=(None,) * 5):
        path = tmp_path / "pool_sweep.py"
        path.write_text(POOL_SWEEP.format(tiny=TINY, accelerators=list(accelerators)))
        return str(path), sweeps.load_sweep(str(path))
    return write


def slice_calls(fake, node):
    """The life of one slice, as the kinds of gcloud calls that change it: create, install, launch <run>, delete."""
    kinds = []
    for c in fake.calls():
        if node not in c:
            continue
        if c[3:4] in (["create"], ["delete"]):
            kinds.append(c[3])
        elif c[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "pip install" in c[-1]:
            kinds.append("install")
        elif c[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "lmjax.main" in c[-1]:
            kinds.append("launch " + next(a for a in c[-1].split() if a.startswith("--workdir=")).rsplit("/", 1)[1])
    return kinds


def test_slice_pool_runs_five_runs_on_two_slices_created_and_deleted_once(fake, pool_sweep):
    path, sweep = pool_sweep()
    assert sweep_cli.main([f"--sweep={path}", *TPU_FLAGS, "--slices=2"]) == 0
    nodes = [slice_pool.node_name(sweep, "v5litepod-16", i) for i in range(2)]
    assert sorted(fake.state()["created"]) == sorted(nodes) and sorted(fake.state()["deleted"]) == sorted(nodes)
    launched = []
    for node in nodes:
        life = slice_calls(fake, node)
        assert life[:2] == ["create", "install"] and life[-1] == "delete" and len(life) >= 4
        assert all(kind.startswith("launch ") for kind in life[2:-1])
        launched += [kind.split()[1] for kind in life[2:-1]]
    assert sorted(launched) == [f"r{i}" for i in range(5)]  # every run started once, on one of the two slices
    for i in range(5):
        assert fake.starts(f"r{i}") == [False] and fake.summary(f"r{i}")["completed"]
    fake.assert_no_slice_left()


def test_slice_pool_requeues_a_preempted_run_which_resumes_and_completes_once(fake, pool_sweep, monkeypatch, capsys):
    path, sweep = pool_sweep()
    preempted_node = slice_pool.node_name(sweep, "v5litepod-16", 0)
    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT", preempted_node)
    assert sweep_cli.main([f"--sweep={path}", *TPU_FLAGS, "--slices=2"]) == 0
    state = fake.state()
    assert state["created"].count(preempted_node) == 2 and len(state["created"]) == 3  # one new slice, not one per run
    (victim,) = [s["workdir"].rsplit("/", 1)[1] for s in state["starts"] if s["node"] == preempted_node][:1]
    assert fake.starts(victim) == [False, True]  # the second start found the first one's checkpoint
    assert f"{victim}: slice {preempted_node} lost; back in the queue" in capsys.readouterr().out
    for i in range(5):  # no run lost, none trained twice to completion
        assert fake.summary(f"r{i}")["completed"]
        assert fake.starts(f"r{i}") == ([False, True] if f"r{i}" == victim else [False])
    fake.assert_no_slice_left()


def test_slice_pool_gives_another_accelerator_type_its_own_pool_and_replaces_a_slice_left_up(fake, pool_sweep):
    path, sweep = pool_sweep((None, None, "v4-32", None, "v4-32"))
    v5, v4 = slice_pool.node_name(sweep, "v5litepod-16", 0), slice_pool.node_name(sweep, "v4-32", 0)
    # A launcher killed outright left the v5 slot's slice up, a trainer of another run still on it.
    stray = {"workdir": "gs://my-bucket/sweeps/tiny/r3", "resumed": False, "polls": 0, "rc": None}
    (fake.root / "state.json").write_text(json.dumps({"nodes": {v5: {"states": ["ACTIVE"], "training": stray}}}))
    assert sweep_cli.main([f"--sweep={path}", *TPU_FLAGS, "--slices=1"]) == 0
    assert slice_calls(fake, v5)[:2] == ["delete", "create"]  # replaced, not shared with the stray trainer
    assert sorted(fake.state()["created"]) == sorted([v5, v4])
    assert [k for k in slice_calls(fake, v4) if k.startswith("launch")] == ["launch r2", "launch r4"]
    assert [k for k in slice_calls(fake, v5) if k.startswith("launch")] == ["launch r0", "launch r1", "launch r3"]
    (create_v4,) = [c for c in fake.calls() if c[3:5] == ["create", v4]]
    assert "--accelerator-type=v4-32" in create_v4
    assert fake.state()["nodes"] == {} and sorted(fake.state()["deleted"]) == sorted([v5, v5, v4])


def test_slice_pool_deletes_every_slice_on_ctrl_c(fake, pool_sweep, monkeypatch, capsys):
    path, sweep = pool_sweep()

    def interrupt_once_training(threads):
        while '"starts": [\n  {' not in ((fake.root / "state.json").read_text() if (fake.root / "state.json").exists() else ""):
            time.sleep(0.05)  # the text, not json: the fake may be halfway through writing it
        raise KeyboardInterrupt
    monkeypatch.setattr(slice_pool, "_wait", interrupt_once_training)
    assert sweep_cli.main([f"--sweep={path}", *TPU_FLAGS, "--slices=2"]) == 130
    assert "every slice of the pool was deleted" in capsys.readouterr().err
    for _ in range(600):  # the slots see the stop and end (no slice requested after it), within a poll or two
        if not [t for t in threading.enumerate() if t.name.startswith("slot ")]:
            break
        time.sleep(0.05)
    state = fake.state()
    assert state["created"] and state["nodes"] == {} and sorted(state["created"]) == sorted(state["deleted"])


def test_slice_pool_dry_run_prints_the_plan_and_calls_nothing(fake, pool_sweep, capsys):
    path, _ = pool_sweep((None, None, "v4-32", None, None))
    assert sweep_cli.main([f"--sweep={path}", *TPU_FLAGS, "--slices=2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert fake.calls() == []
    assert "# pool v5litepod-16: 4 runs on 2 slice(s)" in out and "# pool v4-32: 1 runs on 1 slice(s)" in out
    assert "# runs, in queue order: r0, r1, r3, r4" in out and out.count("queued-resources create") == 2
