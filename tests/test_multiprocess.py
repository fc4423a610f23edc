"""Multi-host training, simulated: two JAX processes with two CPU devices each equal one with four.

The processes find each other through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(`lmjax.distributed.initialize`) and talk over gloo, as the hosts of a pod slice talk over the
interconnect. Each reads only the rows its devices hold (its half of every batch, or the whole batch
when a tensor axis spans both processes), process 0 alone writes
metrics.jsonl and summary.json, and both write their shards of each checkpoint into one workdir.
A SIGTERM to both (a preemption) stops them at the same step through JAX's preemption sync point;
restarted, they finish the run as if nothing had happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lmjax.data import prepare
from test_main import REPO, main_env, tiny_config, write_tiny_preset

STEPS = 40
DEVICES = "--xla_force_host_platform_device_count={}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(preset: str, workdir: str, process_id: int | None, port: int | None, devices: int,
          *overrides: str) -> subprocess.Popen:
    env = dict(main_env(), XLA_FLAGS=DEVICES.format(devices))
    if process_id is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, "-m", "lmjax.main", f"--config={preset}", f"--workdir={workdir}",
                             *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_pair(preset: str, workdir: str, *overrides: str) -> list[subprocess.Popen]:
    port = free_port()
    return [start(preset, workdir, i, port, 2, *overrides) for i in (0, 1)]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    """Same steps and learning rates; losses and gradient norms equal up to the order of reductions."""
    assert [(r["step"], r["lr"]) for r in a] == [(r["step"], r["lr"]) for r in b]
    for key in ("loss", "grad_norm", "val_loss"):
        x = [r.get(key) for r in a]
        y = [r.get(key) for r in b]
        assert [v is None for v in x] == [v is None for v in y], key
        assert max(abs(u - v) / abs(u) for u, v in zip(x, y) if u is not None) < 1e-5, key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("multiprocess"))
    preset = write_tiny_preset(directory, steps=STEPS)
    reference = os.path.join(directory, "one_process")
    finish([start(preset, reference, None, None, devices=4)])
    return directory, preset, reference


# A mesh whose tensor axis spans both processes (as tensor=8 spans the hosts of a v5e-16): the batch
# is not split at all, so both processes must feed the same, whole batch.
TENSOR_ACROSS_HOSTS = ("--config.mesh.data=1", "--config.mesh.tensor=4", "--config.model.num_heads=4",
                       "--config.model.num_kv_heads=4", "--config.model.vocab_size=260", "--config.train.steps=8",
                       "--config.eval.every_steps=4", "--config.eval.num_samples=0")


@pytest.mark.slow
def test_hosts_holding_the_same_rows_are_fed_the_same_rows(runs):
    directory, preset, _ = runs
    reference = os.path.join(directory, "tensor4_one_process")
    finish([start(preset, reference, None, None, 4, *TENSOR_ACROSS_HOSTS)])
    workdir = os.path.join(directory, "tensor4_two_processes")
    finish(start_pair(preset, workdir, *TENSOR_ACROSS_HOSTS))
    assert [r["step"] for r in records(workdir)] == list(range(1, 9))
    assert_same_run(records(reference), records(workdir))


@pytest.mark.slow
def test_preempted_processes_stop_at_one_step_and_resume_to_the_one_process_run(runs):
    """The two processes read the corpus from a token store (each its half of every batch, from the
    shards on disk), the one process from the store its first use of the text wrote: the same
    batches, so the same run, across a preemption."""
    directory, preset, reference = runs
    store_dir = os.path.join(directory, "store")
    prepare.prepare_store(tiny_config(directory).data, store_dir, shard_tokens=20_000, log=lambda s: None)
    from_store = f"--config.data.source=store:{store_dir}"
    workdir = os.path.join(directory, "preempted")
    pair = start_pair(preset, workdir, from_store)
    lines = []
    for line in pair[0].stdout:  # process 0 prints the progress lines
        lines.append(line)
        if re.match(r"step +10/", line):
            break
    for p in pair:
        p.send_signal(signal.SIGTERM)
    output = "".join(lines) + finish(pair)[0]
    stopped = re.findall(r"SIGTERM: saved a checkpoint at step (\d+)", output)
    assert stopped and 10 <= int(stopped[0]) < STEPS, output[-2000:]
    assert os.listdir(os.path.join(workdir, "checkpoints")).count(stopped[0]) == 1
    time.sleep(0.5)  # the coordinator's port is free again before the pair restarts
    outputs = finish(start_pair(preset, workdir, from_store))
    # Two processes with two devices each, stopped and resumed, trained exactly like one with four.
    assert "final val loss" in outputs[0]
    assert_same_run(records(reference), records(workdir))
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["completed"] and summary["steps"] == STEPS
    every_run = set(os.listdir(os.path.join(reference, "checkpoints")))
    assert every_run == {str(s) for s in range(4, STEPS + 1, 4)[-3:]}  # checkpoint.every_steps=4, max_to_keep=3
    newest = sorted({int(s) for s in every_run} | set(range(4, STEPS + 1, 4)) | {int(stopped[0])})[-3:]
    assert set(os.listdir(os.path.join(workdir, "checkpoints"))) == {str(s) for s in newest}
