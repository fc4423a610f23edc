"""The training loop and the two read-only jobs (`evaluate`, `generate_text`) that `lmjax.main` runs.

`train(config, workdir)` trains or resumes: it restores the newest good checkpoint in
`DIR/checkpoints` (state, rng and data position), so re-running the same command continues the run
and a run killed at any moment and resumed logs exactly the losses of an uninterrupted one.
Everything that can be wrong with the config is checked (`lmjax.config_checks`) before the first
file is written. Evaluation and sampling live in `lmjax.evaluation`, SIGTERM handling in
`lmjax.preemption`, and the WSD decay-point branches (`optim.wsd_decay_points`) in `lmjax.wsd`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from etils import epath
from ml_collections import config_dict

from lmjax import checkpointing, data, fileio, hardware, metrics, model, preemption, sharding
from lmjax import train as train_lib
from lmjax.config_checks import RUNTIME_MODEL_KEYS, check_config, config_json, fill_vocab_size
from lmjax.evaluation import eval_batches, evaluate_params, log_samples, sample_texts, unigram_entropy
from lmjax.wsd import DecayBranches

TOKENIZER_FILE = "tokenizer.model"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


def _pin_tokenizer(config: config_dict.ConfigDict, workdir: str) -> None:
    """A run keeps using the SentencePiece model it started with (saved as DIR/tokenizer.model),
    even if the cache is cleared or `data.source` points elsewhere for an evaluation."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_path and epath.Path(path).exists():
        config.data.tokenizer_path = path


# --- setup shared by the three jobs -------------------------------------------------------------


class Setup:
    """What every job needs: the completed config, tokenizer, mesh, rules, model and state layout."""

    def __init__(self, config: config_dict.ConfigDict, workdir: str):
        check_config(config)
        sharding.maybe_initialize_distributed()
        self.config = config = copy.deepcopy(config)
        _pin_tokenizer(config, workdir)
        self.tokenizer = data.build_tokenizer(config.data, verbose=jax.process_index() == 0)
        fill_vocab_size(config, self.tokenizer)
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.rules(config.mesh)
        self.model = model.Transformer(config.model)
        self.abstract_state, self.state_shardings = train_lib.abstract_train_state(config, self.model, self.mesh)

    def restore(self, workdir: str, *, read_only: bool) -> checkpointing.Restored | None:
        """The newest good checkpoint, after checking it holds this config's model."""
        manager = checkpointing.make_manager(workdir, self.config.checkpoint, read_only=read_only)
        try:
            for step in sorted(manager.all_steps(), reverse=True)[:1]:
                self.check_same_model(manager, step)
            return checkpointing.restore_latest(manager, self.abstract_state, move_corrupt=not read_only)
        finally:
            manager.close()

    def check_same_model(self, manager: Any, step: int) -> None:
        """A clear error instead of orbax's shape mismatch when the config describes another model."""
        saved = checkpointing.saved_config(manager, step)
        if saved is None:
            return  # unreadable: restore_latest reports it
        current = config_json(self.config)["model"]
        diffs = [
            f"model.{key}: checkpoint {saved['model'].get(key)!r}, config {value!r}"
            for key, value in current.items()
            if key not in RUNTIME_MODEL_KEYS and saved["model"].get(key) != value
        ]
        if diffs:
            raise ValueError(f"the checkpoint in {manager.directory} holds a different model: " + "; ".join(diffs))


def _require_checkpoint(workdir: str) -> None:
    if not checkpointing.committed_steps(workdir):
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR)}: train first "
            f"(--mode=train with the same --config and --workdir)"
        )


def evaluate(config: config_dict.ConfigDict, workdir: str) -> dict:
    """Loss, perplexity and bits/byte of the newest checkpoint on `eval.steps` validation batches."""
    _require_checkpoint(workdir)
    setup = Setup(config, workdir)
    restored = setup.restore(workdir, read_only=True)
    eval_step = train_lib.make_eval_step(setup.config, setup.model, setup.mesh, setup.state_shardings)
    batches, bytes_per_token = eval_batches(setup.config, setup.tokenizer)
    result = evaluate_params(eval_step, restored.state.params, batches, bytes_per_token, setup.mesh, setup.rules)
    return {"step": restored.step, **result}


def generate_text(config: config_dict.ConfigDict, workdir: str, prompts: Sequence[str], **sampling: Any) -> list[str]:
    """Continuations of `prompts` from the newest checkpoint (see `sample_texts` for `sampling`)."""
    _require_checkpoint(workdir)
    setup = Setup(config, workdir)
    restored = setup.restore(workdir, read_only=True)
    return sample_texts(setup.config, restored.state.params, setup.tokenizer, prompts, **sampling)


# --- training -----------------------------------------------------------------------------------


def train(config: config_dict.ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints); returns the summary.

    Raises NonFiniteLossError when the loss turns NaN/inf (the last good checkpoint is kept).
    """
    wall_start = time.time()
    setup = Setup(config, workdir)
    config, tokenizer, mesh, rules = setup.config, setup.tokenizer, setup.mesh, setup.rules
    is_main = jax.process_index() == 0
    total = int(config.train.steps)
    tokens_per_step = int(config.train.batch_size) * int(config.data.seq_len)
    flops_per_token = model.flops_per_token(config.model, int(config.data.seq_len))
    peak_flops = _peak_flops_per_device()
    train_data = data.make_pipeline(config.data, tokenizer, "train", config.train.batch_size, seed=config.train.seed)
    val_batches, bytes_per_token = eval_batches(config, tokenizer)
    train_step = train_lib.make_train_step(config, setup.model, mesh, setup.state_shardings)
    eval_step = train_lib.make_eval_step(config, setup.model, mesh, setup.state_shardings)

    # The config has passed every check: from here on files are written.
    if is_main and hasattr(tokenizer, "save") and not config.data.tokenizer_path:
        tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))
    restored = setup.restore(workdir, read_only=False)
    if restored is None:
        state, _ = train_lib.create_train_state(config, setup.model, mesh)
        start_step, previous_wall = 0, 0.0
    else:
        state, start_step = restored.state, restored.step
        train_data.set_state(restored.data_state["pipeline"])
        previous_wall = float(restored.data_state.get("wall_time_s", 0.0))
        print(f"resumed from checkpoint step {start_step} in {workdir}", flush=True)
    if start_step >= total:
        print(f"{workdir} is already trained to step {start_step} (train.steps={total}); nothing to do")
        return _read_summary(workdir)
    manager = checkpointing.make_manager(workdir, config.checkpoint)
    writer = metrics.MetricsWriter(workdir, start_step, enabled=is_main)
    branches = DecayBranches(setup, workdir, start_step, val_batches, bytes_per_token, eval_step)
    if is_main:
        print(f"{config.name}: {model.param_count(config.model):,} parameters, vocab {config.model.vocab_size}, "
              f"{tokens_per_step:,} tokens/step, steps {start_step}->{total}, "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)

    def wall_time() -> float:
        return previous_wall + time.time() - wall_start

    def check_finite(step: int) -> None:
        """Raise if any step since the last check had a NaN/inf loss or gradient (never save those)."""
        if bool(all_finite):
            return
        manager.wait_until_finished()
        good = manager.latest_step()
        writer.close()
        kept = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was written"
        raise NonFiniteLossError(
            f"the training loss became NaN/inf between step {checked + 1} and step {step}; stopping "
            f"({kept} in {checkpointing.checkpoint_dir(workdir)}). Lower optim.lr, raise optim.warmup_steps "
            "or set optim.clip."
        )

    step, checked, last_log, last_eval, samples = start_step, start_step, {}, {}, []
    all_finite = jnp.bool_(True)  # ANDed on device every step: checking costs no sync per step
    timer_step, timer_start, steps_per_sec = step, None, None
    with preemption.stop_on_sigterm() as sigterm:
        while step < total:
            if branches.run_due(step, state, train_data) and timer_start is not None:
                timer_step, timer_start = step, time.time()  # nor is the time spent in decay branches
            batch = sharding.shard_batch(next(train_data), mesh, rules)
            state, step_metrics = train_step(state, batch)
            all_finite = all_finite & step_metrics["is_finite"]
            step += 1
            if timer_start is None:  # the first step compiles: time the steady state from here on
                jax.block_until_ready(step_metrics)
                timer_step, timer_start = step, time.time()
                if is_main:
                    print(f"first step (compilation included) done {timer_start - wall_start:.1f}s after start", flush=True)

            do_eval = step % config.eval.every_steps == 0 or step == total
            if do_eval or step % config.train.log_every == 0:
                check_finite(step)
                checked = step
                if step > timer_step:
                    steps_per_sec = (step - timer_step) / (time.time() - timer_start)
                record = {key: float(step_metrics[key]) for key in ("loss", "lr", "grad_norm")}
                record["tokens_per_sec"] = steps_per_sec * tokens_per_step if steps_per_sec else None
                record["mfu"] = None
                if steps_per_sec and peak_flops:
                    record["mfu"] = train_lib.mfu(record["tokens_per_sec"], flops_per_token, peak_flops_per_device=peak_flops)
                if do_eval:
                    last_eval = evaluate_params(eval_step, state.params, val_batches, bytes_per_token, mesh, rules)
                    record.update(last_eval)
                writer.write(step, record)
                if is_main:
                    eta = (total - step) / steps_per_sec if steps_per_sec else None
                    print(metrics.format_progress(step, total, record, wall_time(), eta), flush=True)
                if do_eval and config.eval.num_samples:
                    samples = log_samples(config, state.params, tokenizer, writer, step)
                last_log = record
                timer_step, timer_start = step, time.time()  # evaluation time is not training time

            preempted = preemption.preempted(sigterm, step)
            if preempted or step % config.checkpoint.every_steps == 0 or step == total:
                check_finite(step)
                checkpointing.save(manager, step, state, config=config_json(config),
                                   data_state={"pipeline": train_data.get_state(), "wall_time_s": wall_time()})
                timer_step, timer_start = step, time.time()  # nor is the (blocking part of) saving
            if preempted:
                if is_main:
                    print(f"SIGTERM: saved a checkpoint at step {step}; exiting", flush=True)
                break
    manager.wait_until_finished()
    manager.close()
    writer.close()

    summary = {
        "name": config.name,
        "param_count": model.param_count(config.model),
        "non_embedding_params": model.param_count(config.model, non_embedding=True),
        "tokens_seen": step * tokens_per_step,
        "train_flops": step * tokens_per_step * flops_per_token,
        "final_train_loss": last_log.get("loss"),
        "final_val_loss": last_eval.get("val_loss"),
        "final_val_ppl": last_eval.get("val_ppl"),
        "final_val_bpb": last_eval.get("val_bpb"),
        "unigram_entropy": unigram_entropy(config, tokenizer) if step >= total else None,
        "sample": samples[0] if samples else None,
        "wall_time_s": wall_time(),
        "steps": step,
        "completed": step >= total,
        "wsd_points": branches.summary,
        "config": config_json(config),
    }
    if is_main:
        metrics.write_summary(workdir, summary)
        print(final_report(summary), flush=True)
    return summary


def _peak_flops_per_device() -> float | None:
    """Looked up (or, on CPU, measured) once per run, so MFU figures of one run are comparable."""
    try:
        return hardware.peak_flops_per_device(jax.devices()[0])
    except ValueError as e:  # a device missing from the table: train anyway, without MFU
        print(f"MFU not reported: {e}", flush=True)
        return None


def _read_summary(workdir: str) -> dict:
    text = fileio.read_text(os.path.join(workdir, metrics.SUMMARY_FILE))
    return json.loads(text) if text is not None else {}


def final_report(summary: dict) -> str:
    """The end-of-run lines: the validation loss against the no-context baseline, and a sample."""
    duration = metrics.format_duration(summary["wall_time_s"])
    lines = [f"done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {duration}"]
    if summary.get("final_val_loss") is not None:
        lines.append(f"final val loss {summary['final_val_loss']:.4f} nats/token "
                     f"(ppl {summary['final_val_ppl']:.2f}, {summary['final_val_bpb']:.3f} bits/byte)")
    if summary.get("unigram_entropy") is not None:
        lines.append(f"unigram baseline {summary['unigram_entropy']:.4f} nats/token "
                     "(entropy of the train split's token frequencies)")
    if summary.get("sample") is not None:
        lines.append("sample:\n" + summary["sample"])
    return "\n".join(lines)
