"""The run loop every post-training mode shares, so that SFT, DPO, reward models and PPO checkpoint,
resume, log and summarise the same way: `Run.run()` restores the newest checkpoint or starts from
`--init_from`, steps, writes metrics.jsonl and TensorBoard (and a console line with the ETA),
evaluates on the mode's cadence, saves checkpoints, stops cleanly on SIGTERM and writes
summary.json. A mode brings its start (`_start`), its step (`_step`) and, if it has one, its
evaluation (`_evaluate_due`, `_evaluation`).

The pieces are pretraining's: `Setup` opens the workdir, `lmjax.train.checkpointing` saves and
restores, `lmjax.train.metrics` writes, `lmjax.train.preemption` catches SIGTERM. A checkpoint holds
the state, the batch stream's position and what else the mode needs to continue (`_data_state`),
so a resumed run takes exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import time
from typing import Any

import jax
from ml_collections import config_dict

from lmjax import cli, data
from lmjax import config as config_lib
from lmjax.posttrain import config as pt_config
from lmjax.posttrain import init as init_lib
from lmjax.posttrain.chat import ChatTemplate
from lmjax.train import checkpointing, metrics, preemption
from lmjax.train.trainer import Throughput
from lmjax.train.workdir import Setup


class Run:
    """One post-training run. `__init__` reads and checks everything and writes nothing; `run()` trains.

    A mode sets `self.stream` (a resumable `lmjax.data.pipeline.Pipeline`) in `_start`, and names the
    step metrics it logs, in order, in `logged`.
    """

    logged: tuple[str, ...] = ()

    def __init__(self, mode: str, config: config_dict.ConfigDict, init_from: str, workdir: str):
        self.wall_start = time.time()
        pt_config.check(config, mode)
        self.mode, self.init_from, self.workdir = mode, init_from, workdir
        config, self.source_config = pt_config.from_init(config, init_from)
        init_lib.require_kind(init_from, init_lib.LANGUAGE_MODEL, "--init_from",
                              "start from a pretraining, SFT or DPO run")
        self.setup = Setup(config, workdir)
        self.config = self.setup.config
        self.template = ChatTemplate(self.setup.tokenizer)
        self.is_main = jax.process_index() == 0
        self.total = int(self.config.train.steps)
        self.stream: data.Pipeline | None = None
        self.state: Any = None
        self.previous_wall = 0.0  # wall time of the sessions before a resume
        self.throughput = Throughput()
        self.last_log: dict = {}

    # --- what a mode provides --------------------------------------------------------------------

    def _start(self, restored: checkpointing.Restored | None) -> Any:
        """Build what the steps need (`self.stream` included); the step-0 state when `restored` is None."""
        raise NotImplementedError

    def _step(self, state: Any, step: int) -> tuple[Any, dict]:
        """Train step `step` + 1: (new state, its metrics, `is_finite` among them)."""
        raise NotImplementedError

    def _evaluate_due(self, step: int) -> bool:
        return False

    def _evaluation(self, state: Any, step: int, writer: metrics.MetricsWriter) -> dict[str, float]:
        """The evaluation record at `step` (also logs samples, if the mode takes any)."""
        raise NotImplementedError

    def _data_state(self) -> dict:
        """What a checkpoint keeps besides the state and the stream's position."""
        return {}

    def _describe(self, step: int) -> str:
        return f"{self.config.name} ({self.mode}) from {self.init_from}: steps {step}->{self.total}"

    def _summary_extra(self) -> dict:
        return {}

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to `train.steps` (or until SIGTERM); returns the summary."""
        config = self.config
        restored = self.setup.restore(read_only=False)
        state, step = self._start(restored), 0
        if restored is not None:
            state, step = restored.state, restored.step
            self.stream.set_state(restored.data_state["pipeline"])
            self.previous_wall = float(restored.data_state.get("wall_time_s", 0.0))
            print(f"resumed from checkpoint step {step} in {self.workdir}", flush=True)
        self.state = state
        if step >= self.total:
            print(f"{self.workdir} is already trained to step {step} (train.steps={self.total}); nothing to do")
            return metrics.read_summary(self.workdir) or {}
        manager = checkpointing.make_manager(self.workdir, config.checkpoint)
        writer = metrics.MetricsWriter(self.workdir, step, enabled=self.is_main)
        if self.is_main:
            print(self._describe(step), flush=True)
        if step == 0 and self._evaluate_due(0):
            self._log(0, state, None, writer, evaluate=True)
        with preemption.stop_on_sigterm() as sigterm:
            while step < self.total:
                state, step_metrics = self._step(state, step)
                step += 1
                evaluate = self._evaluate_due(step)
                if evaluate or step % config.train.log_every == 0 or step in (1, self.total):
                    self._log(step, state, step_metrics, writer, evaluate)
                stop = preemption.preempted(sigterm, step)
                if stop or step % config.checkpoint.every_steps == 0 or step == self.total:
                    self._check_finite(step_metrics, step)
                    checkpointing.save(manager, step, state, config=config_lib.to_json(config), data_state={
                        "pipeline": self.stream.get_state(), **self._data_state(), "wall_time_s": self.wall_time()})
                    self.throughput.restart(step)
                if stop:
                    print(f"SIGTERM: saved a checkpoint at step {step}; exiting", flush=True)
                    break
        manager.wait_until_finished()
        manager.close()
        writer.close()
        summary = {"name": config.name, "mode": self.mode, "init_from": self.init_from, "steps": step,
                   "completed": step >= self.total, "wall_time_s": self.wall_time(), "final": self.last_log,
                   **self._summary_extra(), "config": config_lib.to_json(config)}
        if self.is_main:
            metrics.write_summary(self.workdir, summary)
            print(f"done: {step} steps in {metrics.format_duration(self.wall_time())}", flush=True)
        self.state = state
        return summary

    # --- its pieces ------------------------------------------------------------------------------

    def _log(self, step: int, state: Any, step_metrics: dict | None, writer: metrics.MetricsWriter,
             evaluate: bool) -> None:
        """A metrics record and console line for `step`; with `evaluate`, the evaluation too."""
        steps_per_sec = self.throughput.update(step)
        record = {}
        if step_metrics is not None:
            self._check_finite(step_metrics, step)
            record = {key: float(step_metrics[key]) for key in self.logged if key in step_metrics}
        if evaluate:
            record.update(self._evaluation(state, step, writer))
        writer.write(step, record)
        if self.is_main:
            eta = (self.total - step) / steps_per_sec if steps_per_sec else None
            print(" | ".join([f"step {step}/{self.total}", *(f"{k} {v:.4g}" for k, v in record.items()),
                              f"elapsed {metrics.format_duration(self.wall_time())}",
                              f"ETA {metrics.format_duration(eta) if eta is not None else '?'}"]), flush=True)
        if step_metrics is not None:  # (not at step 0: the next interval would hold the step's compile)
            self.last_log = record
            self.throughput.restart(step)  # evaluation, sampling and the first step's compile are not step time

    def _check_finite(self, step_metrics: dict, step: int) -> None:
        if not bool(step_metrics["is_finite"]):
            raise cli.UserError(f"the {self.mode} loss became NaN/inf at step {step}; stopping without saving it. "
                                "Lower optim.lr or set optim.clip.")

    def wall_time(self) -> float:
        """Seconds of training wall time, over every session of this run."""
        return self.previous_wall + time.time() - self.wall_start
