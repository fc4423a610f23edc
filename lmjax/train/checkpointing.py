"""Orbax checkpoints of a training run: `DIR/checkpoints/<step>/`.

Each step directory holds three items: `state` (params, optimizer state, step and rng: the whole
`TrainState`, saved as sharded arrays), `data` (the train iterator's JSON state, so a resumed run
reads exactly the batches the uninterrupted one would have) and `config` (the run's config as JSON,
so a checkpoint says what model it holds).

Why a kill -9 cannot break resume: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and
renames it (or, on object stores, writes `commit_success.txt`) only once every item is complete; an
unfinished step is invisible to `all_steps()` and its leftovers are deleted when the next manager
opens (`cleanup_tmp_directories`).

Why a flaky read cannot rewind a run: `restore_latest` retries I/O errors, and skips a committed
step only when it is provably corrupt (a missing, truncated or undecodable file); such a step is
moved to `DIR/corrupt_checkpoints/` so that its number can be saved again. Any other failure stops
the run with the step and the error named, moving nothing. On several hosts the processes agree
after every step they try, so all of them restore the same one.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lmjax import cli

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"

log = logging.getLogger(__name__)


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


def restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> Restored:
    """Read `step` onto `target` (abstract state) in this process alone: one attempt, errors raised as they come."""
    items = _read(manager, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
    ))
    return Restored(step=step, state=items["state"], data_state=items["data"], config=items["config"])


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The config stored with `step` (without loading its arrays), or None if it cannot be read."""
    try:
        return _read(manager, step, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # noqa: BLE001 - restore_latest reports unreadable steps
        return None


def _read(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> Any:
    """Restore `args` from `step` without orbax's closing barrier.

    `CheckpointManager.restore` calls `Checkpointer.restore`, which reads and then waits for all
    processes at `sync_global_processes("Checkpointer:restore")`, a device all-gather
    (`multihost_utils.sync_global_devices`). A process whose read raised never gets
    there; it goes on to `restore_latest`'s own all-gather instead, and the two collectives do not
    match (two CPU processes both abort in gloo; other backends may hang). A checkpointer whose
    only active process is this one skips that barrier, and the handlers it runs have no
    collective of their own when restoring (orbax's single-replica broadcast is not used here), so
    each process reads alone and `restore_latest` brings them together once each has an outcome.
    """
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=alone) as reader:
        return reader.restore(manager.directory / str(step), args=args)


class CheckpointReadError(cli.UserError):
    """Restoring stopped rather than rewind the run: nothing was moved and no older step was used."""


class Outcome(enum.IntEnum):
    """What one process's reads of a step came to; the processes exchange these as numbers."""

    OK = 0
    CORRUPT = 1  # provably incomplete or undecodable: skipped (and set aside)
    TRANSIENT = 2  # still an I/O error after the retries: stop, a later start reads it again
    FAILED = 3  # anything else, e.g. a target whose shapes are not the saved ones: stop


# Status codes as tensorstore writes them at the head of its errors (they all arrive as ValueError),
# and HTTP statuses as GCS clients quote them. Retrying is the safe guess for either.
_TRANSIENT_MESSAGE = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b"
    r"|(?i:\b(?:HTTP|status|response code)\D{0,20}\b(?:408|429|50[0-4])\b)"
    r"|(?i:\b(?:408|429|50[0-4]) (?:Request Timeout|Too Many Requests|Internal Server Error|Bad Gateway"
    r"|Service Unavailable|Gateway Timeout))"
)
# A file of a committed step that is missing, truncated (byte range out of range) or undecodable.
_CORRUPT_MESSAGE = re.compile(
    r"\b(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE)\b|Error decoding|not found in the checkpoint|incomplete checkpoint"
)
_NOT_TRANSIENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def classify(error: BaseException) -> Outcome:
    """TRANSIENT, CORRUPT or FAILED for an exception raised by a restore (its causes included).

    Transient wins: retrying (and then stopping) never loses a checkpoint, moving one aside would.
    """
    chain = list(_causes(error))
    if any(_is_transient(e) for e in chain):
        return Outcome.TRANSIENT
    if any(isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError))
           or _CORRUPT_MESSAGE.search(str(e)) for e in chain):
        return Outcome.CORRUPT
    return Outcome.FAILED


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and not isinstance(error, _NOT_TRANSIENT_OS_ERRORS):
        return True
    return bool(_TRANSIENT_MESSAGE.search(str(error)))


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, what it was raised from or during, and the members of exception groups."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def restore_latest(
    manager: ocp.CheckpointManager,
    target: Any,
    *,
    move_corrupt: bool = True,
    read_attempts: int = 5,
    retry_delay_s: float = 2.0,
) -> Restored | None:
    """The newest checkpoint that loads onto `target` (abstract state), or None if there is none.

    Each process reads the newest step, retrying I/O errors `read_attempts` times (waiting
    `retry_delay_s`, doubled each time); then the processes compare outcomes, so that all of them
    take the same step:
    - all read it: restored. Older steps found corrupt on the way are moved to
      DIR/corrupt_checkpoints/ (with `move_corrupt`, by process 0), so those step numbers can be saved again.
    - any found it corrupt (and none had another problem): every process tries the next older step.
    - any still had I/O errors, or an error that proves nothing (a target that does not match the
      saved shapes is a config mismatch): every process raises `CheckpointReadError` and nothing is
      moved, so a transient outage or a config error never rewinds a run.
    Also raises, moving nothing, when every committed step is corrupt.
    """
    corrupt: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        outcome, result = _read_with_retries(manager, step, target, read_attempts, retry_delay_s)
        outcomes = _gather_outcomes(step, outcome)
        if all(o == Outcome.OK for o in outcomes):
            _report_and_set_aside(manager, corrupt, step, move_corrupt)
            return result
        if any(o in (Outcome.TRANSIENT, Outcome.FAILED) for o in outcomes):
            raise _read_error(manager, step, outcome, result, outcomes, read_attempts)
        reason = _describe(result) if outcome == Outcome.CORRUPT else _elsewhere(outcomes, Outcome.CORRUPT)
        log.warning("checkpoint step %d is corrupt (%s); trying the previous one", step, reason)
        corrupt.append((step, reason))
    if corrupt:
        step, reason = corrupt[0]
        raise CheckpointReadError(
            f"no checkpoint in {manager.directory} can be restored: every step is corrupt, the newest "
            f"(step {step}) with {reason}. Nothing was moved."
        )
    return None


def _read_with_retries(manager: ocp.CheckpointManager, step: int, target: Any, attempts: int,
                       delay_s: float) -> tuple[Outcome, Any]:
    """(OK, the Restored) or (what went wrong, the last exception), after retrying transient errors."""
    attempt = 1
    while True:
        try:
            return Outcome.OK, restore_step(manager, step, target)
        except Exception as e:  # noqa: BLE001 - classified below
            outcome = classify(e)
            if outcome != Outcome.TRANSIENT or attempt >= attempts:
                return outcome, e
            wait = delay_s * 2 ** (attempt - 1)
            log.warning("checkpoint step %d: read attempt %d of %d failed (%s); retrying in %.1f s",
                        step, attempt, attempts, _describe(e), wait)
            time.sleep(wait)
            attempt += 1


def _gather_outcomes(step: int, outcome: Outcome) -> list[Outcome]:
    """Every process's outcome for `step`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [outcome]
    rows = np.asarray(multihost_utils.process_allgather(np.array([step, int(outcome)], np.int32)))
    if set(rows[:, 0].tolist()) != {step}:
        raise CheckpointReadError(f"the processes list different checkpoint steps: they are trying {rows[:, 0].tolist()}")
    return [Outcome(int(o)) for o in rows[:, 1]]


def _read_error(manager: ocp.CheckpointManager, step: int, outcome: Outcome, error: Any,
                outcomes: list[Outcome], attempts: int) -> CheckpointReadError:
    where = f"checkpoint step {step} in {manager.directory}"
    if outcome == Outcome.TRANSIENT:
        message = f"{where} could not be read after {attempts} attempts: {_describe(error)}"
    elif outcome == Outcome.FAILED:
        message = f"{where} could not be restored ({_describe(error)}), and nothing shows the checkpoint is corrupt"
    else:
        failed = Outcome.TRANSIENT if Outcome.TRANSIENT in outcomes else Outcome.FAILED
        message = f"{where} could not be restored: {_elsewhere(outcomes, failed)}"
    exception = CheckpointReadError(f"{message}. Nothing was moved and no older step was tried.")
    if isinstance(error, BaseException):
        exception.__cause__ = error
    return exception


def _describe(error: BaseException) -> str:
    """The exception's type and the start of its message (tensorstore's carry a whole JSON spec)."""
    return f"{type(error).__name__}: {str(error)[:300]}"


def _elsewhere(outcomes: list[Outcome], kind: Outcome) -> str:
    processes = [i for i, o in enumerate(outcomes) if o == kind]
    return f"{kind.name.lower()} on process(es) {processes} (see their logs)"


def _report_and_set_aside(manager: ocp.CheckpointManager, corrupt: list[tuple[int, str]], step: int,
                          move_corrupt: bool) -> None:
    """Say which steps were skipped for `step`; with `move_corrupt`, process 0 moves them out of the
    way and every process waits for it before reloading the step list (a save must not see them)."""
    for bad_step, reason in corrupt:
        message = f"WARNING: skipped corrupt checkpoint step {bad_step} ({reason})"
        if move_corrupt and jax.process_index() == 0:
            message += f"; {_move_aside(manager, bad_step)}"
        print(message + f"; using step {step}", flush=True)
    if corrupt and move_corrupt:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lmjax_checkpoint_set_aside")
        manager.reload()


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Move a corrupt step to DIR/corrupt_checkpoints/, keeping it for inspection. A failed move
    leaves it where it is (the next start skips it again): raising here would strand the other
    processes at the barrier that follows."""
    source = manager.directory / str(step)
    destination = manager.directory.parent / CORRUPT_SUBDIR / f"{step}-{int(time.time())}"
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
    except Exception as e:  # noqa: BLE001 - see above
        return f"could not move it to {destination} ({_describe(e)})"
    return f"moved to {destination}"
