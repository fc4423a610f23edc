"""Orbax checkpoints of a training run: `DIR/checkpoints/<step>/`.

Each step directory holds three items: `state` (params, optimizer state, step and rng: the whole
`TrainState`, saved as sharded arrays), `data` (the train iterator's JSON state, so a resumed run
reads exactly the batches the uninterrupted one would have) and `config` (the run's config as JSON,
so a checkpoint says what model it holds).

Why a kill -9 cannot break resume: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and
renames it (or, on object stores, writes `commit_success.txt`) only once every item is complete; an
unfinished step is invisible to `all_steps()` and its leftovers are deleted when the next manager
opens (`cleanup_tmp_directories`). A committed step that still fails to load (a truncated or edited
file) is skipped with a warning in favour of the newest older one that loads, and moved to
`DIR/corrupt_checkpoints/` so the step can be written again. If no step loads, nothing is moved and
the first error is raised: that is a config or code mismatch, not corruption.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"


@dataclasses.dataclass
class Restored:
    """What `restore_latest` found: the state (on the requested shardings) and its JSON companions."""

    step: int
    state: Any
    data_state: dict
    config: dict


def checkpoint_dir(workdir: str) -> epath.Path:
    """DIR/checkpoints as an absolute path (orbax requires one); gs:// paths pass through."""
    directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
    return directory if str(directory).startswith("gs://") else directory.resolve()


def committed_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint, found without creating anything (for eval/generate checks)."""
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def make_manager(workdir: str, ckpt_cfg: Any, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager that keeps the newest `ckpt_cfg.max_to_keep` steps; saves run in a background thread
    when `ckpt_cfg.async_save` (the train step keeps going while the arrays are written)."""
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ckpt_cfg.max_to_keep),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
        )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, data_state: dict, config: dict) -> None:
    """Start writing `state` at `step` (returns before the write ends when saving asynchronously).

    A step that already exists (the final save right after a periodic one) is left as it is.
    """
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        ),
        force=True,
    )


def abstract_state(state_shapes: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s carrying the target shardings: orbax loads (and reshards) onto them."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings
    )


def restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> Restored:
    items = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ),
    )
    return Restored(step=step, state=items["state"], data_state=items["data"], config=items["config"])


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The config stored with `step` (without loading its arrays), or None if it cannot be read."""
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # noqa: BLE001 - restore_latest reports unreadable steps
        return None


def restore_latest(manager: ocp.CheckpointManager, target: Any, *, move_corrupt: bool = True) -> Restored | None:
    """The newest checkpoint that loads onto `target` (abstract state), or None if there is none.

    Newer steps that fail to load are reported and, with `move_corrupt`, moved out of the way.
    """
    failures: list[tuple[int, Exception]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore_step(manager, step, target)
        except Exception as e:  # noqa: BLE001 - any unreadable file means this step is unusable
            logging.warning("checkpoint step %d could not be restored (%s: %s)", step, type(e).__name__, e)
            failures.append((step, e))
            continue
        for bad_step, error in failures:
            reason = f"{type(error).__name__}: {str(error)[:200]}"
            message = f"WARNING: skipped corrupt checkpoint step {bad_step} ({reason})"
            if move_corrupt:
                message += f"; moved to {_move_aside(manager, bad_step)}"
            print(message + f"; using step {step}", flush=True)
        if failures and move_corrupt:
            manager.reload()
        return restored
    if failures:
        step, error = failures[0]
        raise RuntimeError(
            f"no checkpoint in {manager.directory} could be restored; newest (step {step}) failed with "
            f"{type(error).__name__}: {error}"
        ) from error
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Move a step that does not load to DIR/corrupt_checkpoints/, keeping it for inspection."""
    source = manager.directory / str(step)
    destination = manager.directory.parent / CORRUPT_SUBDIR / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"lmjax_move_corrupt_{step}")
    return str(destination)
