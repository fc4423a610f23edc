"""Restoring the newest checkpoint: retries for flaky reads, skipping only provably corrupt steps, and
every process of a multi-host run restoring the same step.

A small pytree stands in for the train state: two steps are saved once per module with
`make_manager` + `save`, and each test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.train import checkpointing
from lmjax.train.checkpointing import Outcome

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = types.SimpleNamespace(max_to_keep=5, async_save=False)
STEPS = (1, 2)


def state(step: int) -> dict:
    return {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(5, dtype=jnp.int32) + step}


TARGET = jax.eval_shape(lambda: state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("saved"))
    manager = checkpointing.make_manager(workdir, CKPT)
    for step in STEPS:
        checkpointing.save(manager, step, state(step), data_state={"position": step}, config={"step": step})
    manager.wait_until_finished()
    manager.close()
    return workdir


@pytest.fixture
def workdir(saved, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(saved, copy)
    return copy


@pytest.fixture
def manager(workdir):
    manager = checkpointing.make_manager(workdir, CKPT)
    yield manager
    manager.close()


@pytest.fixture
def reads(monkeypatch):
    """Counts the steps each read attempt asked for; `fail[step]` (an exception) makes that step's reads raise
    it, `fail_once[step]` only the first one."""
    real = checkpointing.restore_step
    log = types.SimpleNamespace(steps=[], fail={}, fail_once={})

    def restore_step(manager, step, target):
        log.steps.append(step)
        if step in log.fail_once:
            raise log.fail_once.pop(step)
        if step in log.fail:
            raise log.fail[step]
        return real(manager, step, target)

    monkeypatch.setattr(checkpointing, "restore_step", restore_step)
    return log


@pytest.fixture
def processes(monkeypatch):
    """Fakes the other process of a two-process run: `others` is what it reports for each step."""
    fake = types.SimpleNamespace(others={}, reported=[])

    def gather(step, outcome):
        fake.reported.append((step, outcome))
        return [outcome, fake.others.get(step, Outcome.OK)]

    monkeypatch.setattr(checkpointing, "_gather_outcomes", gather)
    return fake


def layout(workdir: str) -> dict[str, list[str]]:
    """The step directories and set-aside steps of a workdir."""
    return {sub: sorted(os.listdir(os.path.join(workdir, sub))) if os.path.isdir(os.path.join(workdir, sub)) else []
            for sub in (checkpointing.CHECKPOINT_SUBDIR, checkpointing.CORRUPT_SUBDIR)}


def assert_holds(restored: checkpointing.Restored, step: int) -> None:
    assert restored.step == step
    assert restored.data_state == {"position": step} and restored.config == {"step": step}
    for name, expected in state(step).items():
        np.testing.assert_array_equal(np.asarray(restored.state[name]), np.asarray(expected))


def garble_arrays(workdir: str, step: int) -> None:
    """Overwrite the array data files of `step` (what a disk or a half-finished copy does to them)."""
    for root, _, files in os.walk(os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR, str(step), "state")):
        if os.path.basename(root) == "d":
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")


def test_the_newest_step_is_restored(manager):
    assert_holds(checkpointing.restore_latest(manager, TARGET), 2)


def test_a_transient_read_error_is_retried_and_the_newest_step_restored(workdir, manager, reads):
    before = layout(workdir)
    reads.fail_once[2] = ConnectionResetError(104, "Connection reset by peer")
    restored = checkpointing.restore_latest(manager, TARGET, retry_delay_s=0)
    assert_holds(restored, 2)
    assert reads.steps == [2, 2]
    assert layout(workdir) == before


def test_a_persistent_transient_error_names_the_step_and_moves_nothing(workdir, manager, reads):
    before = layout(workdir)
    reads.fail[2] = ValueError('UNAVAILABLE: Error reading "b/.zarray" in OCDBT database at "gs://bucket/run/'
                               'checkpoints/2/state/": HTTP response code: 503')
    with pytest.raises(checkpointing.CheckpointReadError, match=r"step 2 .* after 3 attempts: ValueError: UNAVAILABLE"):
        checkpointing.restore_latest(manager, TARGET, read_attempts=3, retry_delay_s=0)
    assert reads.steps == [2, 2, 2]  # the older step is never tried: that would rewind the run
    assert layout(workdir) == before


def remove_array_metadata(workdir: str, step: int) -> None:
    os.remove(os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR, str(step), "state", "_METADATA"))


def garble_data_state(workdir: str, step: int) -> None:
    with open(os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR, str(step), "data", "metadata"), "w") as f:
        f.write("{")


@pytest.mark.parametrize("corrupt", [garble_arrays, remove_array_metadata, garble_data_state])
def test_a_corrupt_step_is_set_aside_and_the_previous_one_restored(workdir, manager, reads, corrupt, capsys):
    corrupt(workdir, 2)
    restored = checkpointing.restore_latest(manager, TARGET, retry_delay_s=0)
    assert_holds(restored, 1)
    assert reads.steps == [2, 1]  # corruption is not retried
    found = layout(workdir)
    assert found["checkpoints"] == ["1"] and [name.split("-")[0] for name in found["corrupt_checkpoints"]] == ["2"]
    assert list(manager.all_steps()) == [1]  # so step 2 can be saved again
    assert "skipped corrupt checkpoint step 2" in capsys.readouterr().out


def test_a_read_only_restore_skips_a_corrupt_step_without_moving_it(workdir, manager):
    garble_arrays(workdir, 2)
    before = layout(workdir)
    assert_holds(checkpointing.restore_latest(manager, TARGET, move_corrupt=False), 1)
    assert layout(workdir) == before


def test_when_every_step_is_corrupt_nothing_is_moved(workdir, manager):
    for step in STEPS:
        garble_arrays(workdir, step)
    before = layout(workdir)
    with pytest.raises(checkpointing.CheckpointReadError, match=r"every step is corrupt, the newest \(step 2\)"):
        checkpointing.restore_latest(manager, TARGET)
    assert layout(workdir) == before


def test_a_target_that_does_not_match_the_saved_shapes_raises_without_moving(workdir, manager, reads):
    before = layout(workdir)
    other_model = jax.eval_shape(lambda: {"w": jnp.zeros((8, 3)), "b": jnp.zeros(5, jnp.int32)})
    with pytest.raises(checkpointing.CheckpointReadError, match=r"step 2 .*not compatible with the stored shape"):
        checkpointing.restore_latest(manager, other_model, retry_delay_s=0)
    assert reads.steps == [2]
    assert layout(workdir) == before


def test_an_uncommitted_step_is_ignored(workdir, reads):
    checkpoints = os.path.join(workdir, "checkpoints")
    unfinished = os.path.join(checkpoints, "3.orbax-checkpoint-tmp-1796000000")
    shutil.copytree(os.path.join(checkpoints, "2"), unfinished)
    os.remove(os.path.join(unfinished, "commit_success.txt"))
    manager = checkpointing.make_manager(workdir, CKPT, read_only=True)
    try:
        assert_holds(checkpointing.restore_latest(manager, TARGET), 2)
    finally:
        manager.close()
    assert reads.steps == [2]
    assert layout(workdir)["corrupt_checkpoints"] == []


def test_when_another_process_finds_the_newest_step_corrupt_both_take_the_older_one(
        workdir, manager, reads, processes, monkeypatch):
    with monkeypatch.context() as process_1:  # its own read of step 2 fails with a decode error
        process_1.setattr(jax, "process_index", lambda: 1)
        reads.fail[2] = ValueError('DATA_LOSS: Error reading "w/0.0" in OCDBT database: Error decoding b-tree node')
        processes.others[2] = Outcome.OK
        assert_holds(checkpointing.restore_latest(manager, TARGET, retry_delay_s=0), 1)
        assert layout(workdir)["corrupt_checkpoints"] == []  # process 0 moves it, not process 1
    # Process 0: step 2 reads fine here, but process 1 reported it corrupt.
    reads.fail.clear()
    processes.others[2] = Outcome.CORRUPT
    assert_holds(checkpointing.restore_latest(manager, TARGET, retry_delay_s=0), 1)
    assert [name.split("-")[0] for name in layout(workdir)["corrupt_checkpoints"]] == ["2"]
    assert processes.reported == [(2, Outcome.CORRUPT), (1, Outcome.OK), (2, Outcome.OK), (1, Outcome.OK)]


def test_an_io_error_on_another_process_makes_every_process_raise(workdir, manager, reads, processes):
    processes.others[2] = Outcome.TRANSIENT
    before = layout(workdir)
    with pytest.raises(checkpointing.CheckpointReadError, match=r"step 2 .*transient on process\(es\) \[1\]"):
        checkpointing.restore_latest(manager, TARGET, retry_delay_s=0)
    assert reads.steps == [2]
    assert layout(workdir) == before


@pytest.mark.parametrize("error, outcome", [
    (ConnectionResetError(104, "Connection reset by peer"), Outcome.TRANSIENT),
    (TimeoutError("read timed out"), Outcome.TRANSIENT),
    (OSError(5, "Input/output error"), Outcome.TRANSIENT),
    (ValueError("DEADLINE_EXCEEDED: Error reading local file"), Outcome.TRANSIENT),
    (ValueError("Error reading gs://b/run/checkpoints/7/state: HTTP response code: 429"), Outcome.TRANSIENT),
    (RuntimeError("503 Service Unavailable"), Outcome.TRANSIENT),
    (ValueError('OUT_OF_RANGE: Requested byte range [0, 250) is not valid for value of size 7'), Outcome.CORRUPT),
    (ValueError("DATA_LOSS: Error reading gs://b/run/checkpoints/503/state/d/1a2b"), Outcome.CORRUPT),
    (ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata at "b/.zarray" does not exist'), Outcome.CORRUPT),
    (ValueError("Error opening \"zarr\" driver: Error decoding b-tree node: ZSTD_decompressStream() failed"),
     Outcome.CORRUPT),
    (FileNotFoundError("Metadata file (named _METADATA) does not exist"), Outcome.CORRUPT),
    (json.JSONDecodeError("Expecting value", "{", 1), Outcome.CORRUPT),
    (KeyError('Item "state" was not found in the checkpoint. Available items: [\'data\']'), Outcome.CORRUPT),
    (ValueError("Requested shape: (8, 3) is not compatible with the stored shape: (4, 3)."), Outcome.FAILED),
    (ValueError("Structure mismatch: Target path ('c',) not found in metadata_tree."), Outcome.FAILED),
    (PermissionError(13, "Permission denied"), Outcome.FAILED),
])
def test_errors_are_classified_as_transient_corrupt_or_neither(error, outcome):
    assert checkpointing.classify(error) == outcome


def test_an_error_raised_while_handling_an_io_error_counts_as_transient():
    try:
        try:
            raise ConnectionError("connection closed")
        except ConnectionError as inner:
            raise ValueError("Error reading checkpoint") from inner
    except ValueError as e:
        assert checkpointing.classify(e) == Outcome.TRANSIENT


@pytest.mark.slow
def test_two_real_processes_agree_when_only_one_finds_the_newest_step_corrupt(workdir):
    """With real collectives: process 1 cannot decode step 2, process 0 can; neither waits on the other."""
    child = textwrap.dedent("""
        import sys, types
        import numpy as np
        from lmjax import distributed
        distributed.initialize()
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from lmjax.train import checkpointing

        replicated = NamedSharding(Mesh(np.array(jax.devices()), ("hosts",)), PartitionSpec())
        target = {"w": jax.ShapeDtypeStruct((4, 3), np.float32, sharding=replicated),
                  "b": jax.ShapeDtypeStruct((5,), np.int32, sharding=replicated)}
        if jax.process_index() == 1:
            real = checkpointing.restore_step
            def restore_step(manager, step, target):
                if step == 2:
                    raise ValueError("DATA_LOSS: Error decoding b-tree node")
                return real(manager, step, target)
            checkpointing.restore_step = restore_step
        manager = checkpointing.make_manager(sys.argv[1], types.SimpleNamespace(max_to_keep=5, async_save=False))
        restored = checkpointing.restore_latest(manager, target, retry_delay_s=0)
        print("restored step", restored.step, float(np.asarray(restored.state["w"].addressable_data(0))[0, 0]))
        manager.close()
    """)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    pair = []
    for process_id in (0, 1):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id), PYTHONPATH=REPO)
        pair.append(subprocess.Popen([sys.executable, "-c", child, workdir], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=180)[0] for p in pair]
    for p, output in zip(pair, outputs):
        assert p.returncode == 0, output[-3000:]
        assert "restored step 1 1.0" in output, output[-3000:]
    assert layout(workdir)["checkpoints"] == ["1"]
    assert [name.split("-")[0] for name in layout(workdir)["corrupt_checkpoints"]] == ["2"]
