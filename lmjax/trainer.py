"""The training loop and the two read-only jobs (`evaluate`, `generate_text`) that `lmjax.main` runs.

`train(config, workdir)` trains or resumes: it restores the newest good checkpoint in
`DIR/checkpoints` (state, rng and data position), so re-running the same command continues the run
and a run killed at any moment and resumed logs exactly the losses of an uninterrupted one.
Everything that can be wrong with the config is checked before the first file is written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from ml_collections import config_dict

from lmjax import checkpointing, data, hardware, metrics, model, sharding
from lmjax import train as train_lib
from lmjax.data import pipeline as pipeline_lib

TOKENIZER_FILE = "tokenizer.model"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


# --- configuration ------------------------------------------------------------------------------

CHOICES = {
    "model.position": ("learned", "sinusoidal", "rope", "alibi", "none"),
    "model.rope_scaling": ("none", "linear", "ntk"),
    "model.mlp": ("gelu", "gelu_tanh", "relu", "swiglu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.attention": ("einsum", "dot_product"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "data.tokenizer": ("sentencepiece", "byte", "char"),
    "data.spm_model_type": ("bpe", "unigram"),
    "data.packing": ("concat", "segments"),
    "data.doc_split": ("file", "blank_line"),
    "data.text_split": ("hash", "tail"),
    "optim.name": ("adamw", "adafactor", "lion", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
}
# Model keys that change how the parameters are used, not what they are: free to differ from the
# checkpoint's (e.g. evaluate in bfloat16 a model trained in float32).
RUNTIME_MODEL_KEYS = ("dropout", "dtype", "attention", "remat")
AT_LEAST_ONE = (
    "model.num_layers", "model.embed_dim", "model.num_heads", "model.num_kv_heads", "model.max_len",
    "data.seq_len", "train.steps", "train.batch_size", "train.microbatches", "train.log_every",
    "checkpoint.every_steps", "checkpoint.max_to_keep", "eval.every_steps",
)
AT_LEAST_ZERO = (
    "optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip", "train.z_loss",
    "eval.steps", "eval.num_samples", "eval.sample_tokens", "eval.sample_temperature", "data.grain_workers",
)


def _get(config: config_dict.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check_config(config: config_dict.ConfigDict) -> None:
    """Raise ValueError naming the first key whose value cannot work (the valid values included)."""
    for key, valid in CHOICES.items():
        if _get(config, key) not in valid:
            raise ValueError(f"config.{key}={_get(config, key)!r} is not valid; choose one of: {', '.join(valid)}")
    for key in AT_LEAST_ONE:
        if _get(config, key) < 1:
            raise ValueError(f"config.{key}={_get(config, key)} must be >= 1")
    for key in AT_LEAST_ZERO:
        if _get(config, key) < 0:
            raise ValueError(f"config.{key}={_get(config, key)} must be >= 0")
    if config.optim.warmup_steps > config.train.steps:
        raise ValueError(f"config.optim.warmup_steps={config.optim.warmup_steps} exceeds config.train.steps={config.train.steps}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ValueError(f"config.model.dropout={config.model.dropout} must be in [0, 1)")
    if config.model.vocab_size is not None and config.model.vocab_size < 1:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} must be >= 1 (or unset)")
    if config.model.position == "learned" and config.data.seq_len > config.model.max_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len={config.model.max_len}, "
            "the size of the learned position table"
        )
    source_kinds = ("pystdlib", "text:", "tfds:", "prepared:")
    if not config.data.source.startswith(source_kinds):
        raise ValueError(f"config.data.source={config.data.source!r}: expected pystdlib, text:<glob>, tfds:<name> or prepared:<dir>")


def fill_vocab_size(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> None:
    """model.vocab_size defaults to the tokenizer's; a smaller explicit value would drop token ids."""
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids (data.tokenizer={config.data.tokenizer!r}); leave it unset "
            f"to use the tokenizer's size or set it >= {tokenizer.vocab_size}"
        )


def config_json(config: config_dict.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _pin_tokenizer(config: config_dict.ConfigDict, workdir: str) -> None:
    """A run keeps using the SentencePiece model it started with (saved as DIR/tokenizer.model),
    even if the cache is cleared or `data.source` points elsewhere for an evaluation."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_path and os.path.isfile(path):
        config.data.tokenizer_path = path


def _preempted(sigterm: list[bool], step: int) -> bool:
    """Whether to save and stop after `step`. One process: our SIGTERM flag (read once, so a signal
    arriving later waits for the next step). Several: JAX's preemption sync point, which makes all
    hosts agree on the same step although each receives the signal at a different moment."""
    if jax.process_count() == 1:
        return sigterm[0]
    return multihost_utils.reached_preemption_sync_point(step)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[list[bool]]:
    """A flag set by SIGTERM (TPU VM preemption, `kill`): the loop checks it after every step."""
    flag = [False]
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.__setitem__(0, True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- evaluation and sampling --------------------------------------------------------------------


def eval_batches(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> tuple[list[dict], float]:
    """The fixed held-out set: the first `eval.steps` batches of an unshuffled validation pipeline."""
    batch_size = config.eval.batch_size or config.train.batch_size
    pipeline = data.make_pipeline(config.data, tokenizer, "validation", batch_size, shuffle=False)
    return [next(pipeline) for _ in range(config.eval.steps)], pipeline.bytes_per_token


def evaluate_params(eval_step: Any, params: Any, batches: Sequence[dict], bytes_per_token: float, mesh, rules) -> dict:
    """Validation loss (nats/token), perplexity, and bits per byte (tokenizer-independent)."""
    loss_sum = weight_sum = 0.0
    for batch in batches:
        sums = eval_step(params, sharding.shard_batch(batch, mesh, rules))
        loss_sum += float(sums["loss_sum"])
        weight_sum += float(sums["weight_sum"])
    loss = loss_sum / max(weight_sum, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": loss / math.log(2) / bytes_per_token}


def sample_texts(
    config: config_dict.ConfigDict,
    params: Any,
    tokenizer: data.Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompts` (new text only) through the model's KV-cache decoder.

    Each prompt is preceded by EOS: training documents start right after one, so the model reads
    the prompt as the start of a file.
    """
    start = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    ids = [start + tokenizer.encode(p) for p in prompts]
    new = model.generate(
        config.model, params, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        rng=jax.random.key(seed), eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
    )
    return [tokenizer.decode(tokens) for tokens in new]


def unigram_entropy(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> float:
    """Entropy (nats/token) of the train split's token frequencies: the loss of a model that ignores
    context, the baseline a language model must beat. Read from the pipeline's cached token array."""
    tokens = pipeline_lib.tokenize_split(config.data, "train", tokenizer)["tokens"]
    counts = np.bincount(tokens, minlength=tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


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
        os.makedirs(workdir, exist_ok=True)
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
    with _stop_on_sigterm() as sigterm:
        while step < total:
            batch = sharding.shard_batch(next(train_data), mesh, rules)
            state, step_metrics = train_step(state, batch)
            all_finite = all_finite & step_metrics["is_finite"]
            step += 1
            if timer_start is None:  # the first step compiles: time the steady state from here on
                jax.block_until_ready(step_metrics)
                timer_step, timer_start = step, time.time()
                print(f"first step (compilation included) done {timer_start - wall_start:.1f}s after start", flush=True)

            do_eval = step % config.eval.every_steps == 0 or step == total
            if do_eval or step % config.train.log_every == 0:
                check_finite(step)
                checked = step
                if step > timer_step:
                    steps_per_sec = (step - timer_step) / (time.time() - timer_start)
                record = {key: float(step_metrics[key]) for key in ("loss", "lr", "grad_norm")}
                record["tokens_per_sec"] = steps_per_sec * tokens_per_step if steps_per_sec else None
                record["mfu"] = (train_lib.mfu(record["tokens_per_sec"], flops_per_token, peak_flops_per_device=peak_flops)
                                 if steps_per_sec and peak_flops else None)
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

            preempted = _preempted(sigterm, step)
            if preempted or step % config.checkpoint.every_steps == 0 or step == total:
                check_finite(step)
                checkpointing.save(manager, step, state, config=config_json(config),
                                   data_state={"pipeline": train_data.get_state(), "wall_time_s": wall_time()})
                timer_step, timer_start = step, time.time()  # nor is the (blocking part of) saving
            if preempted:
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
    path = os.path.join(workdir, metrics.SUMMARY_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def log_samples(config: config_dict.ConfigDict, params: Any, tokenizer: data.Tokenizer,
                writer: metrics.MetricsWriter, step: int) -> list[str]:
    """`eval.num_samples` continuations of `eval.sample_prompt`, printed and sent to TensorBoard.

    Every process takes part (the params may be sharded across hosts); process 0 prints.
    """
    prompt = config.eval.sample_prompt
    texts = sample_texts(config, params, tokenizer, [prompt] * config.eval.num_samples, config.eval.sample_tokens,
                         temperature=config.eval.sample_temperature, seed=step)
    samples = [prompt + text for text in texts]
    for i, sample in enumerate(samples):
        writer.write_text(step, f"sample_{i}", sample)
        if jax.process_index() == 0:
            print(f"--- sample {i} at step {step}:\n{sample}", flush=True)
    return samples


def final_report(summary: dict) -> str:
    """The end-of-run lines: the validation loss against the no-context baseline, and a sample."""
    lines = [f"done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {metrics.format_duration(summary['wall_time_s'])}"]
    if summary.get("final_val_loss") is not None:
        lines.append(f"final val loss {summary['final_val_loss']:.4f} nats/token "
                     f"(ppl {summary['final_val_ppl']:.2f}, {summary['final_val_bpb']:.3f} bits/byte)")
    if summary.get("unigram_entropy") is not None:
        lines.append(f"unigram baseline {summary['unigram_entropy']:.4f} nats/token "
                     "(entropy of the train split's token frequencies)")
    if summary.get("sample") is not None:
        lines.append("sample:\n" + summary["sample"])
    return "\n".join(lines)
