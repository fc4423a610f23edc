"""WSD decay points: one warmup-stable-decay run reports the loss of several shorter token budgets.

A WSD schedule of s steps equals any longer WSD run's schedule (same peak, warmup and
`decay_fraction`) up to its own decay start s - round(decay_fraction * s). So when the main run
reaches that step, a branch copies its state, trains the remaining decay steps with the length-s
schedule on a second data pipeline set to the main one's position, and evaluates on the same fixed
validation set: the result is what a separate run of `train.steps = s` would have reported, at the
cost of its decay steps only. The main run's state (the branch copies it, since the step donates
its input) and data order are untouched, so its metrics do not depend on the decay points.
The branch briefly holds a second copy of the train state.

Records go to `DIR/wsd_points.jsonl` as soon as each branch ends, so they survive a resume: one
resumed from a checkpoint at step c keeps the records of branches that started at or before c and
drops the others (they will be redone, like metrics.jsonl's lines after c); a branch killed midway
left no record and is redone when the main run reaches its start again.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_dict

from lmjax import data, fileio, sharding
from lmjax.train import step as step_lib
from lmjax.train.schedules import decay_start
from lmjax.train.validation import ValidationSet, evaluate_params

WSD_FILE = "wsd_points.jsonl"


def read_records(workdir: str) -> list[dict]:
    """The records in DIR/wsd_points.jsonl (a line cut off by a kill is skipped)."""
    return fileio.read_jsonl(epath.Path(workdir) / WSD_FILE)


class DecayBranches:
    """The decay points of one run: which branch is due at a step, running it, and its records.

    Every process runs the branches (the state may be sharded across hosts); process 0 writes.
    """

    def __init__(self, setup: Any, start_step: int, val_set: ValidationSet | None, eval_step: Any):
        self.setup = setup
        self.config: config_dict.ConfigDict = setup.config
        self.path = epath.Path(setup.workdir) / WSD_FILE
        self.val_set, self.eval_step = val_set, eval_step
        self.is_main = jax.process_index() == 0
        self.points = sorted({int(p) for p in self.config.optim.wsd_decay_points or ()})
        kept = [r for r in read_records(setup.workdir)
                if r["step"] in self.points and decay_start(self.config.optim, r["step"]) <= start_step]
        self.records = {r["step"]: r for r in kept}
        if jax.process_count() > 1 and self.points:  # all processes must agree on which branches to run
            done = np.array([p in self.records for p in self.points], np.int32)
            done = multihost_utils.broadcast_one_to_all(done)
            self.records = {p: self.records.get(p, {}) for p, d in zip(self.points, done) if d}
        if self.is_main and self.path.exists():
            self._write()
        self._pipeline = None
        # New buffers on the main state's shardings: the branch's train step donates its input.
        self._copy = jax.jit(lambda state: jax.tree.map(jnp.copy, state), out_shardings=setup.state_shardings)

    @property
    def summary(self) -> list[dict]:
        """The `wsd_points` of summary.json, by step."""
        return [self.records[p] for p in sorted(self.records)]

    def run_due(self, step: int, state: Any, train_data: Any) -> bool:
        """Run every unrecorded branch that starts at `step` (the state after `step` main steps and
        the pipeline about to yield batch `step + 1`); returns whether any ran."""
        due = [p for p in self.points if p not in self.records and decay_start(self.config.optim, p) == step]
        for point in due:
            self.records[point] = self._branch(point, step, state, train_data)
            if self.is_main:
                self._write()
        return bool(due)

    def _branch(self, point: int, step: int, state: Any, train_data: Any) -> dict:
        config, setup = self.config, self.setup
        branch_config = copy.deepcopy(config)
        branch_config.train.steps = point
        train_step = step_lib.make_train_step(branch_config, setup.model, setup.mesh, setup.state_shardings)
        if self._pipeline is None:
            self._pipeline = data.make_pipeline(config.data, setup.tokenizer, "train", config.train.batch_size,
                                                seed=config.train.seed, rows=setup.batch_rows(config.train.batch_size))
        self._pipeline.set_state(train_data.get_state())
        branch_state = self._copy(state)
        for _ in range(point - step):
            batch = sharding.shard_batch(next(self._pipeline), setup.mesh, setup.rules)
            branch_state, step_metrics = train_step(branch_state, batch)
        result = evaluate_params(self.eval_step, branch_state.params, self.val_set, setup.mesh, setup.rules)
        tokens = point * int(config.train.batch_size) * int(config.data.seq_len)
        record = {"step": point, "tokens": tokens, **result, "train_loss": float(step_metrics["loss"]),
                  "decay_start": step}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.is_main:
            print(f"wsd decay point: step {point} ({tokens:,} tokens, decayed from step {step}): "
                  f"val loss {result['val_loss']:.4f} ({result['val_bpb']:.3f} bpb)", flush=True)
        return record

    def _write(self) -> None:
        """Replace the file whole (through a temporary file), so a kill never loses older records."""
        tmp = self.path.parent / f"{WSD_FILE}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.summary))
        tmp.replace(self.path)
