"""The training loop: `train(config, workdir)` trains, or resumes, a run.

It restores the newest good checkpoint in `DIR/checkpoints` (state, rng and data position), so
re-running the same command continues the run, and a run killed at any moment and resumed logs
exactly the losses of an uninterrupted one. Everything that can be checked is checked before the
first file is written and before the first step (the config, the tokenizer against the vocabulary,
the mesh against every parameter, the logged sample against the context), so a run never fails
after it has trained. Nothing non-finite is ever saved: a NaN/inf loss stops the run, keeping the
last good checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from lmjax import cli, cpu_dots, data, hardware, host_memory, model, sharding
from lmjax import config as config_lib
from lmjax.infer import sampling
from lmjax.train import checkpointing, distill, metrics, preemption, pruning, validation, wsd
from lmjax.train import step as step_lib
from lmjax.train.mfu import mfu
from lmjax.train.workdir import Setup


class NonFiniteLossError(cli.UserError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


class Throughput:
    """Steps per second of training alone: restarted after compilation, evaluation, sampling, decay
    branches and the blocking part of saving, so none of them counts as training time."""

    def __init__(self) -> None:
        self.since_step: int | None = None
        self.since_time = 0.0
        self.steps_per_sec: float | None = None

    def restart(self, step: int) -> None:
        self.since_step, self.since_time = step, time.time()

    def update(self, step: int) -> float | None:
        if self.since_step is not None and step > self.since_step:
            self.steps_per_sec = (step - self.since_step) / (time.time() - self.since_time)
        return self.steps_per_sec


def sample_length(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> int:
    """Tokens per logged sample: `eval.sample_tokens`, clamped (with a warning) so that prompt and
    sample fit a learned position table; checked before the first step, not after the last."""
    wanted = int(config.eval.sample_tokens)
    if not config.eval.num_samples or config.model.position != "learned":
        return wanted
    prompt = len(sampling.prompt_ids(tokenizer, config.eval.sample_prompt))
    room = int(config.model.max_len) - prompt
    if room < 1:
        raise ValueError(f"config.eval.sample_prompt={config.eval.sample_prompt!r} is {prompt} tokens, which "
                         f"leaves no room in config.model.max_len={config.model.max_len}: shorten it or set "
                         "config.eval.num_samples=0")
    if wanted > room:
        if jax.process_index() == 0:
            print(f"warning: logged samples cut to {room} tokens: config.eval.sample_tokens={wanted} plus the "
                  f"{prompt}-token prompt exceeds config.model.max_len={config.model.max_len}", flush=True)
        return room
    return wanted


class Trainer:
    """One run. `__init__` builds and checks everything and writes nothing; `run()` trains."""

    def __init__(self, config: config_dict.ConfigDict, workdir: str):
        self.wall_start = time.time()
        host_memory.one_heap_for_large_steps(host_memory.logits_bytes(config))  # these two before Setup starts JAX
        cpu_dots.choose_dot_library()
        self.setup = setup = Setup(config, workdir)
        self.config = config = setup.config
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        self.total = int(config.train.steps)
        self.tokens_per_step = int(config.train.batch_size) * int(config.data.seq_len)
        self.flops_per_token = model.flops_per_token(config.model, int(config.data.seq_len))
        self.peak_flops = _peak_flops_per_device()
        self.sample_tokens = sample_length(config, setup.tokenizer)
        self.train_data = data.make_pipeline(config.data, setup.tokenizer, "train", config.train.batch_size,
                                             seed=config.train.seed, rows=setup.batch_rows(config.train.batch_size))
        self.val_set = validation.validation_set(
            config, setup.tokenizer, setup.batch_rows(validation.eval_batch_size(config)))
        self.pruned = pruning.pruned_start(setup)  # (params, masks) when fine-tuning a pruned run
        loss_sums_fn = distill.trainer_loss_sums_fn(setup)
        if self.pruned:
            loss_sums_fn = pruning.masked_loss_sums_fn(
                loss_sums_fn or step_lib.lm_loss_sums_fn(config, setup.model), self.pruned[1])
        self.train_step = step_lib.make_train_step(config, setup.model, setup.mesh, setup.state_shardings,
                                                   loss_sums_fn)
        self.eval_step = step_lib.make_eval_step(config, setup.model, setup.mesh, setup.state_shardings)
        self.throughput = Throughput()
        self.last_log: dict = {}
        self.last_eval: dict = {}
        self.samples: list[str] = []
        self.all_finite = jnp.bool_(True)  # ANDed on device every step: checking costs no sync per step
        self.checked_step = 0
        self.previous_wall = 0.0  # wall time of the sessions before a resume

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to `train.steps` (or until SIGTERM); returns the summary."""
        self.setup.save_tokenizer()  # every check has passed: from here on files are written
        state, step, previous_wall = self._restore_or_init()
        if step >= self.total:
            print(f"{self.workdir} is already trained to step {step} (train.steps={self.total}); nothing to do")
            return metrics.read_summary(self.workdir) or {}
        self.previous_wall = previous_wall
        self.checked_step = step
        self.manager = checkpointing.make_manager(self.workdir, self.config.checkpoint)
        self.writer = metrics.MetricsWriter(self.workdir, step, enabled=self.is_main)
        branches = wsd.DecayBranches(self.setup, step, self.val_set, self.eval_step)
        self._print_start(step)
        with preemption.stop_on_sigterm() as sigterm:
            while step < self.total:
                if branches.run_due(step, state, self.train_data):
                    self.throughput.restart(step)
                batch = sharding.shard_batch(next(self.train_data), self.setup.mesh, self.setup.rules)
                state, step_metrics = self.train_step(state, batch)
                self.all_finite = self.all_finite & step_metrics["is_finite"]
                step += 1
                if self.throughput.since_step is None:
                    self._first_step_done(step, step_metrics)
                evaluate = self.val_set is not None and (step % self.config.eval.every_steps == 0 or step == self.total)
                if evaluate or step % self.config.train.log_every == 0 or step == self.total:
                    self._log(step, state, step_metrics, evaluate)
                stop = preemption.preempted(sigterm, step)
                if stop or step % self.config.checkpoint.every_steps == 0 or step == self.total:
                    self._save(step, state)
                if stop:
                    if self.is_main:
                        print(f"SIGTERM: saved a checkpoint at step {step}; exiting", flush=True)
                    break
        self.manager.wait_until_finished()
        self.manager.close()
        self.writer.close()
        summary = self._summary(step, branches.summary)
        if self.is_main:
            metrics.write_summary(self.workdir, summary)
            print(final_report(summary), flush=True)
        return summary

    # --- its pieces ------------------------------------------------------------------------------

    def _restore_or_init(self) -> tuple[Any, int, float]:
        """(state, step, wall time of earlier sessions) from the newest good checkpoint, or a fresh state."""
        restored = self.setup.restore(read_only=False)
        if restored is None:
            state, shardings = step_lib.create_train_state(self.config, self.setup.model, self.setup.mesh)
            if self.pruned:
                state = state.replace(params=jax.device_put(self.pruned[0], shardings.params))
                print(f"fine-tuning {self.config.prune.from_workdir} pruned by {self.config.prune.method}: "
                      f"{pruning.sparsity_of(state.params):.1%} of the block weights are zero", flush=True)
            return state, 0, 0.0
        self.train_data.set_state(restored.data_state["pipeline"])
        print(f"resumed from checkpoint step {restored.step} in {self.workdir}", flush=True)
        return restored.state, restored.step, float(restored.data_state.get("wall_time_s", 0.0))

    def _print_start(self, step: int) -> None:
        if self.is_main:
            devices = jax.devices()
            print(f"{self.config.name}: {model.param_count(self.config.model):,} parameters, vocab "
                  f"{self.config.model.vocab_size}, {self.tokens_per_step:,} tokens/step, steps {step}->{self.total}, "
                  f"{len(devices)} {devices[0].platform} device(s)", flush=True)

    def _first_step_done(self, step: int, step_metrics: dict) -> None:
        """The first step compiled the program: throughput is timed from here on."""
        jax.block_until_ready(step_metrics)
        self.throughput.restart(step)
        if self.is_main:
            print(f"first step (compilation included) done {time.time() - self.wall_start:.1f}s after start",
                  flush=True)

    def _log(self, step: int, state: Any, step_metrics: dict, evaluate: bool) -> None:
        """A metrics record (and console line); with `evaluate`, validation and samples too."""
        self._check_finite(step)
        steps_per_sec = self.throughput.update(step)
        record = {key: float(step_metrics[key]) for key in ("loss", "lr", "grad_norm")}
        record.update({key: np.asarray(value).tolist() for key, value in step_metrics.items() if key.startswith("moe_")})
        record.update(self._speed(steps_per_sec))
        if evaluate:
            self.last_eval = validation.evaluate_params(self.eval_step, state.params, self.val_set,
                                                        self.setup.mesh, self.setup.rules)
            record.update(self.last_eval)
        self.writer.write(step, record)
        if self.is_main:
            eta = (self.total - step) / steps_per_sec if steps_per_sec else None
            print(metrics.format_progress(step, self.total, record, self.wall_time(), eta), flush=True)
        if evaluate and self.config.eval.num_samples:
            self.samples = self._log_samples(step, state.params)
        self.last_log = record
        self.throughput.restart(step)

    def _speed(self, steps_per_sec: float | None) -> dict:
        """tokens/s, achieved model GFLOP/s (always) and MFU against the device's stable peak."""
        if not steps_per_sec:
            return {"tokens_per_sec": None, "gflops_per_sec": None, "mfu": None}
        tokens_per_sec = steps_per_sec * self.tokens_per_step
        return {
            "tokens_per_sec": tokens_per_sec,
            "gflops_per_sec": tokens_per_sec * self.flops_per_token / 1e9,
            "mfu": mfu(tokens_per_sec, self.flops_per_token, peak_flops_per_device=self.peak_flops)
            if self.peak_flops else None,
        }

    def _log_samples(self, step: int, params: Any) -> list[str]:
        """`eval.num_samples` continuations of `eval.sample_prompt`, printed and sent to TensorBoard.
        Every process takes part (the params may be sharded across hosts); process 0 prints."""
        prompt = self.config.eval.sample_prompt
        prompts = [prompt] * self.config.eval.num_samples
        texts = sampling.sample_texts(self.config, params, self.setup.tokenizer, prompts, self.sample_tokens,
                                      temperature=self.config.eval.sample_temperature, seed=step)
        samples = [prompt + text for text in texts]
        for i, sample in enumerate(samples):
            self.writer.write_text(step, f"sample_{i}", sample)
            if self.is_main:
                print(f"--- sample {i} at step {step}:\n{sample}", flush=True)
        return samples

    def _save(self, step: int, state: Any) -> None:
        self._check_finite(step)
        checkpointing.save(self.manager, step, state, config=config_lib.to_json(self.config),
                           data_state={"pipeline": self.train_data.get_state(), "wall_time_s": self.wall_time()})
        self.throughput.restart(step)

    def _check_finite(self, step: int) -> None:
        """Raise if any step since the last check had a NaN/inf loss or gradient (never save those)."""
        if bool(self.all_finite):
            self.checked_step = step
            return
        self.manager.wait_until_finished()
        good = self.manager.latest_step()
        self.writer.close()
        kept = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was written"
        raise NonFiniteLossError(
            f"the training loss became NaN/inf between step {self.checked_step + 1} and step {step}; stopping "
            f"({kept} in {checkpointing.checkpoint_dir(self.workdir)}). Lower optim.lr, raise optim.warmup_steps "
            "or set optim.clip."
        )

    def wall_time(self) -> float:
        """Seconds of training wall time, over every session of this run."""
        return self.previous_wall + time.time() - self.wall_start

    def _summary(self, step: int, wsd_points: list[dict]) -> dict:
        config = self.config
        return {
            "name": config.name,
            "param_count": model.param_count(config.model),
            "non_embedding_params": model.param_count(config.model, non_embedding=True),
            "tokens_seen": step * self.tokens_per_step,
            "train_flops": step * self.tokens_per_step * self.flops_per_token,
            "final_train_loss": self.last_log.get("loss"),
            "final_val_loss": self.last_eval.get("val_loss"),
            "final_val_ppl": self.last_eval.get("val_ppl"),
            "final_val_bpb": self.last_eval.get("val_bpb"),
            "val_tokens": self.last_eval.get("val_tokens"),
            "unigram_entropy": validation.unigram_entropy(config, self.setup.tokenizer) if step >= self.total else None,
            "sample": self.samples[0] if self.samples else None,
            "wall_time_s": self.wall_time(),
            "steps": step,
            "completed": step >= self.total,
            "wsd_points": wsd_points,
            "config": config_lib.to_json(config),
        }


def train(config: config_dict.ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints); returns the summary.

    Raises NonFiniteLossError when the loss turns NaN/inf (the last good checkpoint is kept).
    """
    return Trainer(config, workdir).run()


def _peak_flops_per_device() -> float | None:
    """Looked up once per run (a spec sheet, a CPU table entry, or a CPU's one-time cached measurement),
    so the MFU of any two runs on the same hardware compares as their achieved FLOP/s do."""
    device = jax.devices()[0]
    try:
        peak, source = hardware.peak_flops_and_source(device)
    except ValueError as e:  # a device missing from the table: train anyway, without MFU
        print(f"MFU not reported: {e}", flush=True)
        return None
    if jax.process_index() == 0:
        print(f"MFU relative to {peak / 1e9:,.0f} GFLOP/s per {device.platform} device ({source})", flush=True)
    return peak


def final_report(summary: dict) -> str:
    """The end-of-run lines: the validation loss against the no-context baseline, and a sample."""
    duration = metrics.format_duration(summary["wall_time_s"])
    lines = [f"done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {duration}"]
    if summary.get("final_val_loss") is not None:
        lines.append(f"final val loss {summary['final_val_loss']:.4f} nats/token "
                     f"(ppl {summary['final_val_ppl']:.2f}, {summary['final_val_bpb']:.3f} bits/byte, "
                     f"{summary['val_tokens']:,} validation tokens)")
    if summary.get("unigram_entropy") is not None:
        lines.append(f"unigram baseline {summary['unigram_entropy']:.4f} nats/token "
                     "(entropy of the train split's token frequencies)")
    if summary.get("sample") is not None:
        lines.append("sample:\n" + summary["sample"])
    return "\n".join(lines)
