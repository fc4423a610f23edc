"""lmjax against nanoGPT (PyTorch) on nanoGPT's README CPU run: train-step speed, and the loss at 2000 steps.

  pip install -e '.[bench]' --extra-index-url https://download.pytorch.org/whl/cpu   # torch 2.13.0, CPU build
  git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
  curl -o /tmp/input.txt https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
  python benchmarks/vs_pytorch.py --nanogpt_dir=/tmp/nanoGPT --data=/tmp/input.txt --cores=0
  python benchmarks/vs_pytorch.py --nanogpt_dir=/tmp/nanoGPT --data=/tmp/input.txt --cores=0,1 --train_iters=2000
  python benchmarks/vs_pytorch.py --nanogpt_dir=/tmp/nanoGPT --data=/tmp/input.txt --cores=0,1 --shape=gpt_small --steps=20

`--shape` sets the sizes both sides build, always with nanoGPT's architecture: the README run
(default), `gpt_small` (configs/gpt_small.py's 4 layers, d=192, 6 heads, context 128, batch 32,
a 4096-id vocabulary) or `10m` (benchmarks/train_step.py's ~10M: 6 layers, d=384); the last two
train on random ids (speed only).

The run compared is nanoGPT's `config/train_shakespeare_char.py` with the README's CPU flags
(`README_FLAGS` below: 4 layers, 4 heads, d=128, 64-character context, batch 12, dropout 0, float32)
and lmjax's `configs/shakespeare_char.py`, its equal. nanoGPT's code is imported from `--nanogpt_dir`
at run time: its `GPT`, `GPTConfig` and `configure_optimizers` (plain, unfused AdamW on CPU) for the
speed part, its `train.py` as a subprocess for the training part.

The process first pins itself to `--cores` (`os.sched_setaffinity`, inherited by the training
subprocesses), then imports PyTorch and JAX; torch gets `torch.set_num_threads(len(cores))`, and the
threads of XLA's CPU thread pool are counted and printed (XLA sizes it from the affinity mask).

Speed. Both sides train on the same random batches, drawn as nanoGPT's `get_batch` draws them
(12 random offsets into the training ids), lmjax's as inputs/targets/weights=1 arrays through the
jitted step the trainer runs (`lmjax.train.make_train_step`). nanoGPT's step is its loop body: set
the lr, forward, backward, clip to 1.0, `optimizer.step()`, `zero_grad(set_to_none=True)`. Each step
is timed to completion (lmjax: `block_until_ready`). After `--warmup` untimed steps each, the sides
alternate in blocks of `--block` steps, in alternating order, so load from elsewhere on the machine
hits both alike; tokens/s is 768 tokens over the median step. Model GFLOP/s uses the same analytic
count for both (`lmjax.model.flops_per_token`, each with its own vocabulary: 65 and 66).

Loss (`--train_iters=N`, N > 0). Each side trains from scratch with its own trainer: nanoGPT's
`train.py` (copied with `model.py` and `configurator.py` into a scratch directory, with the
train.bin / val.bin / meta.pkl its `data/shakespeare_char/prepare.py` would write from `--data`,
and `--always_save_checkpoint=True` so `ckpt.pt` holds the last evaluated step) and
`python -m lmjax.main --config=configs/shakespeare_char.py`. Both final models are then evaluated
here on the same data: the whole validation split (the last 10% of the characters) cut into
consecutive, non-overlapping windows of 64 targets. (nanoGPT's loop evaluates and saves at
iteration N, then takes one more step it never saves: its ckpt.pt holds the model after N updates,
as lmjax's does.) With N != 2000 both schedules are shortened to N.

PyTorch is needed only here (the `bench` extra), never by lmjax itself. Everything is written under
`--scratch` (a new /tmp directory by default), nothing into the repository, except the report that
`--out=FILE` asks for. Bad input (no nanoGPT checkout, no PyTorch, no data file, cores this process
may not use) is one `error:` line and a non-zero exit.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "configs", "shakespeare_char.py")

# nanoGPT's README CPU run: `python train.py config/train_shakespeare_char.py` with these flags,
# plus --max_iters and --lr_decay_iters (2000 there).
README_FLAGS = (
    "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
    "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
)
README_ITERS = 2000
BLOCK_SIZE, BATCH_SIZE, N_LAYER, N_HEAD, N_EMBD = 64, 12, 4, 4, 128
LEARNING_RATE, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.99), 0.1, 1.0
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", os.path.join("config", "train_shakespeare_char.py"))
NANOGPT_DATA = os.path.join("data", "shakespeare_char")
EVAL_ROWS = 64  # validation windows per evaluation batch (both sides)


class Shape(NamedTuple):
    """The sizes both sides build, with nanoGPT's architecture (configs/shakespeare_char.py's choices)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    vocab_size: int | None  # None: tiny Shakespeare's characters; else random ids below it


SHAPES = {
    "shakespeare_char": Shape(N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, BATCH_SIZE, None),
    "gpt_small": Shape(4, 6, 192, 128, 32, 4096),  # configs/gpt_small.py's sizes (the quickstart)
    "10m": Shape(6, 6, 384, 128, 32, 4096),  # the ~10M model of benchmarks/train_step.py
}


# ---------------------------------------------------------------------------------------------
# Data: what nanoGPT's shakespeare_char prepare.py writes, computed here from --data (no torch).


def char_vocab(text: str) -> list[str]:
    """The characters of `text`, sorted: character i has id i (nanoGPT's and lmjax's char ids)."""
    return sorted(set(text))


def split_text(text: str) -> tuple[str, str]:
    """(train, val): the first 90% of the characters and the rest."""
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def write_nanogpt_data(text: str, directory: str) -> dict[str, Any]:
    """Write the train.bin, val.bin (uint16 ids) and meta.pkl (vocab_size, itos, stoi) that nanoGPT's
    shakespeare_char preparation writes for `text` into `directory`; returns the ids and the meta."""
    chars = char_vocab(text)
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{len(chars)} distinct characters do not fit nanoGPT's uint16 ids")
    stoi = {c: i for i, c in enumerate(chars)}
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    os.makedirs(directory, exist_ok=True)
    ids = {}
    for name, part in zip(("train", "val"), split_text(text)):
        ids[name] = np.array([stoi[c] for c in part], dtype=np.uint16)
        ids[name].tofile(os.path.join(directory, f"{name}.bin"))
    with open(os.path.join(directory, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return {**ids, "meta": meta}


def random_batches(train_ids: np.ndarray, count: int, seed: int, batch_size: int = BATCH_SIZE,
                   block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """`count` batches drawn as nanoGPT's get_batch draws them: `batch_size` random offsets, inputs the
    `block_size` ids there, targets the next ones. Returns int64 arrays [count, B, L]."""
    offsets = np.random.default_rng(seed).integers(0, len(train_ids) - block_size, (count, batch_size))
    window = offsets[..., None] + np.arange(block_size)
    ids = train_ids.astype(np.int64)
    return ids[window], ids[window + 1]


def val_windows(val_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The validation split as consecutive, non-overlapping windows: [W, L] inputs and targets."""
    ids = val_ids.astype(np.int64)
    count = (len(ids) - 1) // BLOCK_SIZE
    return (ids[: count * BLOCK_SIZE].reshape(count, BLOCK_SIZE),
            ids[1 : count * BLOCK_SIZE + 1].reshape(count, BLOCK_SIZE))


# ---------------------------------------------------------------------------------------------
# Inputs, affinity, threads.


def parse_cores(spec: str) -> list[int]:
    """`--cores` ("0", "0,1"; empty: every core this process may use) as a sorted list, checked."""
    allowed = sorted(os.sched_getaffinity(0))
    if not spec.strip():
        return allowed
    try:
        cores = sorted({int(c) for c in spec.split(",") if c.strip()})
    except ValueError:
        raise ValueError(f"--cores={spec!r}: expected core numbers separated by commas, e.g. 0 or 0,1") from None
    if not cores or not set(cores) <= set(allowed):
        raise ValueError(f"--cores={spec!r}: this process may run on cores {','.join(map(str, allowed))}")
    return cores


def check_inputs(nanogpt_dir: str, data: str) -> None:
    """Fail before anything is imported or written when an input is missing."""
    missing = [f for f in NANOGPT_FILES if not os.path.isfile(os.path.join(nanogpt_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"--nanogpt_dir={nanogpt_dir!r} is not a nanoGPT checkout: {', '.join(missing)} not found "
            "(git clone https://github.com/karpathy/nanoGPT)"
        )
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data={data!r}: no such file (tiny Shakespeare's input.txt)")
    if importlib.util.find_spec("torch") is None:
        raise ValueError("PyTorch is not installed, and nanoGPT needs it: pip install -e '.[bench]'")


def thread_names() -> collections.Counter:
    """How many threads of this process carry each name."""
    names: collections.Counter = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names[f.read().strip()] += 1
        except OSError:  # the thread ended meanwhile
            pass
    return names


def load_nanogpt(nanogpt_dir: str) -> Any:
    """nanoGPT's model.py as a module (GPT, GPTConfig), imported from its own checkout."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(nanogpt_dir, "model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def git_state() -> str:
    """The commit and the uncommitted changes under lmjax/ that the lmjax figures were measured with
    (with a hash of the diff: it changes while someone works on lmjax)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    stat = git("diff", "--stat", "HEAD", "--", "lmjax/").strip().splitlines()
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "lmjax/").split()
    summary = "none"
    if stat:
        digest = hashlib.sha256(git("diff", "HEAD", "--", "lmjax/").encode()).hexdigest()[:12]
        summary = f"{stat[-1].strip()} (sha256 of `git diff HEAD -- lmjax/`: {digest})"
    lines = [f"git HEAD {head}; uncommitted changes under lmjax/: {summary}"]
    lines += [f"  {line.strip()}" for line in stat[:-1]]
    lines += [f"  untracked {path}" for path in untracked]
    return "\n".join(lines)


class Report:
    """Lines printed as they come, kept for `--out`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# ---------------------------------------------------------------------------------------------
# Speed.


def lmjax_config(data: str, overrides: dict[str, Any] | None = None) -> Any:
    from lmjax import config as config_lib

    config = config_lib.load(PRESET, {"data.source": f"text:{data}", **(overrides or {})})
    config_lib.check(config)
    return config


def nanogpt_model(nano: Any, vocab_size: int, shape: Shape = SHAPES["shakespeare_char"]) -> tuple[Any, Any]:
    """nanoGPT's GPT (the README CPU flags, at `shape`'s sizes) and its own AdamW, quietly (both print)."""
    import torch

    torch.manual_seed(1337)
    with contextlib.redirect_stdout(io.StringIO()):
        gpt = nano.GPT(nano.GPTConfig(block_size=shape.block_size, vocab_size=vocab_size, n_layer=shape.n_layer,
                                      n_head=shape.n_head, n_embd=shape.n_embd, dropout=0.0, bias=False))
        optimizer = gpt.configure_optimizers(WEIGHT_DECAY, LEARNING_RATE, BETAS, "cpu")
    return gpt, optimizer


def measure_speed(say: Report, nano: Any, data: dict[str, Any], data_path: str, cores: list[int],
                  steps: int, block: int, warmup: int, seed: int,
                  shape: Shape = SHAPES["shakespeare_char"]) -> dict[str, dict[str, float]]:
    """Median train-step time of each side on the same batches, alternating blocks of steps."""
    import jax
    import torch

    from lmjax import cpu_dots, hardware, host_memory, sharding, train
    from lmjax import model as model_lib

    vocab, train_ids, lmjax_vocab = data["meta"]["vocab_size"], data["train"], data["meta"]["vocab_size"] + 1
    # The trainer's settings (Trainer, Setup), taken here before either side runs: they hold for both.
    logits_bytes = 4 * shape.batch_size * shape.block_size * (shape.vocab_size or lmjax_vocab)
    say("one heap for every thread (both sides), lmjax's steps run inline (lmjax.host_memory): "
        f"{host_memory.one_heap_for_large_steps(logits_bytes)}")
    say(f"CPU dot library (lmjax.cpu_dots): {cpu_dots.choose_dot_library()}")
    say(f"freed host memory reused (lmjax.host_memory, both sides): {host_memory.reuse_freed_host_memory()}")
    if shape.vocab_size:  # a subword-sized vocabulary: random ids (speed only)
        vocab = lmjax_vocab = shape.vocab_size
        train_ids = np.random.default_rng(seed).integers(0, vocab, 1 << 20)
    xs, ys = random_batches(train_ids, warmup + steps, seed, shape.batch_size, shape.block_size)
    tokens = shape.batch_size * shape.block_size

    # nanoGPT: its loop body (the GradScaler train.py makes is disabled without CUDA: a no-op).
    gpt, optimizer = nanogpt_model(nano, vocab, shape)
    gpt.train()
    nano_parts: dict[str, list[float]] = {"forward": [], "backward": [], "clip + AdamW": []}

    def nanogpt_step(i: int) -> float:
        t0 = time.perf_counter()
        x, y = torch.from_numpy(xs[i]), torch.from_numpy(ys[i])
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE
        _, loss = gpt(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= warmup:
            for part, seconds in zip(nano_parts, (t1 - t0, t2 - t1, t3 - t2)):
                nano_parts[part].append(seconds)
        return t3 - t0

    # lmjax: the trainer's jitted step, state donated, on the same batches.
    config = lmjax_config(data_path, {  # char ids + EOS, as the tokenizer has; or the shape's vocabulary
        "model.vocab_size": lmjax_vocab, "model.num_layers": shape.n_layer, "model.num_heads": shape.n_head,
        "model.num_kv_heads": shape.n_head, "model.embed_dim": shape.n_embd, "data.seq_len": shape.block_size,
        "model.max_len": shape.block_size, "train.batch_size": shape.batch_size})
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
    model = model_lib.Transformer(config.model)
    state, shardings = train.create_train_state(config, model, mesh)
    train_step = train.make_train_step(config, model, mesh, shardings)
    eval_step = train.make_eval_step(config, model, mesh, shardings)
    weights = np.ones((shape.batch_size, shape.block_size), np.float32)

    def lmjax_batch(i: int) -> dict[str, np.ndarray]:
        return {"inputs": xs[i].astype(np.int32), "targets": ys[i].astype(np.int32), "weights": weights}

    def lmjax_step(i: int) -> float:
        nonlocal state
        t0 = time.perf_counter()
        state, metrics = train_step(state, sharding.shard_batch(lmjax_batch(i), mesh, rules))
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    compile_s = lmjax_step(0)
    eigen = thread_names().get("tf_XLAEigen", 0)
    say(f"threads: torch intra-op {torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()}); "
        f"XLA CPU client: {eigen} Eigen intra-op threads (named tf_XLAEigen), "
        f"{len(jax.devices())} device(s) {jax.devices()[0].device_kind}")
    say(f"lmjax step: first call (compilation) {compile_s:.1f} s")
    for i in range(warmup):
        nanogpt_step(i)
        if i:
            lmjax_step(i)

    sides: dict[str, Callable[[int], float]] = {"nanoGPT": nanogpt_step, "lmjax": lmjax_step}
    times: dict[str, list[float]] = {name: [] for name in sides}
    rounds = math.ceil(steps / block)
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            for k in range(r * block, min((r + 1) * block, steps)):
                times[name].append(sides[name](warmup + k))

    # lmjax's forward pass alone (the eval step), for the breakdown; a few reps.
    batch = sharding.shard_batch(lmjax_batch(warmup), mesh, rules)
    jax.block_until_ready(eval_step(state.params, batch))
    forward = []
    for _ in range(max(5, block)):
        t0 = time.perf_counter()
        jax.block_until_ready(eval_step(state.params, batch))
        forward.append(time.perf_counter() - t0)

    peak, peak_source = hardware.peak_flops_and_source(jax.devices()[0])
    peak *= len(jax.devices())
    results = {}
    for name, seconds in times.items():
        vocab_size = vocab if name == "nanoGPT" else lmjax_vocab
        flops = model_lib.flops_per_token(dict_config(config.model, vocab_size=vocab_size), shape.block_size)
        median = statistics.median(seconds)
        results[name] = {
            "step_ms": median * 1e3, "min_ms": min(seconds) * 1e3, "max_ms": max(seconds) * 1e3,
            "tokens_per_s": tokens / median, "gflops": tokens / median * flops / 1e9,
            "mfu": tokens / median * flops / peak, "flops_per_token": flops, "steps": len(seconds),
        }
    ratio = results["lmjax"]["tokens_per_s"] / results["nanoGPT"]["tokens_per_s"]
    results["lmjax"]["ratio"], results["nanoGPT"]["ratio"] = ratio, 1.0
    say(f"shape: {shape}")
    say(f"speed: {steps} timed steps per side after {warmup} warm-up steps, alternating blocks of {block}; "
        f"{tokens} tokens/step; peak {peak / 1e9:.0f} GFLOP/s ({peak_source}, lmjax.hardware)")
    for name, r in results.items():
        say(f"  {name:>7}: step {r['step_ms']:.1f} ms (median; min {r['min_ms']:.1f}, max {r['max_ms']:.1f}), "
            f"{r['tokens_per_s']:,.0f} tokens/s, model {r['gflops']:.2f} GFLOP/s "
            f"({r['flops_per_token'] / 1e6:.2f} MFLOP/token), MFU {r['mfu']:.1%}")
    parts = {part: statistics.median(s) * 1e3 for part, s in nano_parts.items()}
    say("  nanoGPT breakdown (medians): " + ", ".join(f"{p} {ms:.1f} ms" for p, ms in parts.items()))
    fwd = statistics.median(forward) * 1e3
    say(f"  lmjax breakdown (medians): forward alone (eval step) {fwd:.1f} ms, "
        f"so backward + clip + AdamW ~{results['lmjax']['step_ms'] - fwd:.1f} ms")
    say(f"  ratio lmjax / nanoGPT tokens/s: {ratio:.2f}")
    return results


def dict_config(model_cfg: Any, **changes: Any) -> Any:
    """A copy of a model config with some keys changed."""
    import copy

    out = copy.deepcopy(model_cfg)
    for key, value in changes.items():
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Loss at N iterations: each side's own trainer, then one evaluation of both.


def run_logged(cmd: Sequence[str], cwd: str, log: str, env: dict[str, str] | None = None) -> float:
    """Run `cmd` with its output in `log`; returns the wall time. A failure names the log."""
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(list(cmd), cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        from lmjax import cli

        with open(log) as f:
            tail = f.read()[-2000:]
        raise cli.UserError(f"{' '.join(cmd[:3])} exited with code {result.returncode}; log {log}:\n{tail}")
    return wall


def schedule_length(iters: int) -> dict[str, int]:
    """Warmup and evaluation intervals for a run of `iters` steps (the README's at 2000)."""
    return {"warmup": min(100, iters // 2), "nanogpt_eval": 250 if iters % 250 == 0 else iters,
            "lmjax_eval": min(500, iters)}


def lmjax_overrides(iters: int, scratch: str) -> dict[str, Any]:
    out: dict[str, Any] = {"data.cache_dir": os.path.join(scratch, "lmjax_cache")}
    if iters != README_ITERS:
        s = schedule_length(iters)
        out.update({"train.steps": iters, "optim.warmup_steps": s["warmup"], "eval.every_steps": s["lmjax_eval"],
                    "checkpoint.every_steps": s["lmjax_eval"]})
    return out


def train_nanogpt(say: Report, nanogpt_dir: str, text: str, scratch: str, iters: int) -> dict[str, Any]:
    """nanoGPT's train.py with the README flags in a scratch copy of its checkout."""
    root = os.path.join(scratch, "nanogpt")
    for name in NANOGPT_FILES:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        shutil.copy(os.path.join(nanogpt_dir, name), os.path.join(root, name))
    write_nanogpt_data(text, os.path.join(root, NANOGPT_DATA))
    out_dir, log = os.path.join(root, "out"), os.path.join(scratch, "nanogpt.log")
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *README_FLAGS,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={out_dir}", "--always_save_checkpoint=True"]
    if iters != README_ITERS:
        s = schedule_length(iters)
        cmd += [f"--warmup_iters={s['warmup']}", f"--eval_interval={s['nanogpt_eval']}"]
    say(f"training nanoGPT: (cd {root} && python {' '.join(cmd[1:])}) > {log}")
    wall = run_logged(cmd, root, log)
    with open(log) as f:
        text_log = f.read()
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", text_log)
    iter_ms = [float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", text_log)[1:]]
    return {"wall_s": wall, "ckpt": os.path.join(out_dir, "ckpt.pt"), "log": log,
            "own_val_loss": float(evals[-1][2]) if evals else None,
            "own_eval_step": int(evals[-1][0]) if evals else None,
            "median_iter_ms": statistics.median(iter_ms) if iter_ms else None}


def train_lmjax(say: Report, data: str, scratch: str, iters: int) -> dict[str, Any]:
    """`python -m lmjax.main` with the preset, in a scratch workdir."""
    workdir, log = os.path.join(scratch, "lmjax"), os.path.join(scratch, "lmjax.log")
    cmd = [sys.executable, "-m", "lmjax.main", f"--config={PRESET}", f"--config.data.source=text:{data}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in lmjax_overrides(iters, scratch).items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    say(f"training lmjax: (cd {REPO} && python {' '.join(cmd[1:])}) > {log}")
    wall = run_logged(cmd, REPO, log, env)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return {"wall_s": wall, "workdir": workdir, "log": log, "own_val_loss": summary.get("final_val_loss"),
            "trainer_wall_s": summary.get("wall_time_s")}


def eval_nanogpt(nano: Any, ckpt_path: str, x_WxL: np.ndarray, y_WxL: np.ndarray, iters: int) -> float:
    """Mean cross-entropy of nanoGPT's saved model over the windows."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt["iter_num"] != iters:
        raise ValueError(f"{ckpt_path} holds iteration {ckpt['iter_num']}, not {iters}")
    with contextlib.redirect_stdout(io.StringIO()):
        gpt = nano.GPT(nano.GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x_WxL), EVAL_ROWS):
            rows = slice(start, start + EVAL_ROWS)
            x, y = torch.from_numpy(x_WxL[rows]), torch.from_numpy(y_WxL[rows])
            _, loss = gpt(x, y)
            total += float(loss) * y.numel()
    return total / y_WxL.size


def eval_lmjax(config: Any, workdir: str, val_text: str, val_ids: np.ndarray, x_WxL: np.ndarray,
               y_WxL: np.ndarray, iters: int) -> float:
    """Mean cross-entropy of lmjax's newest checkpoint over the windows (after checking that its
    tokenizer gives the validation text the ids the windows were cut from)."""
    from lmjax import sharding
    from lmjax.train import step as step_lib
    from lmjax.train import workdir as workdir_lib

    setup = workdir_lib.Setup(config, workdir)
    if not np.array_equal(np.asarray(setup.tokenizer.encode(val_text)), val_ids):
        raise ValueError("lmjax's char tokenizer does not give the validation text nanoGPT's ids")
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
    try:
        restored = setup.restore(read_only=True)
    finally:
        logging.set_verbosity(level)
    if restored is None or restored.step != iters:
        raise ValueError(f"{workdir} holds no checkpoint of step {iters}")
    eval_step = step_lib.make_eval_step(setup.config, setup.model, setup.mesh, setup.state_shardings)
    loss_sum = weight_sum = 0.0
    for start in range(0, len(x_WxL), EVAL_ROWS):
        x, y = x_WxL[start : start + EVAL_ROWS], y_WxL[start : start + EVAL_ROWS]
        real = len(x)
        pad = ((0, EVAL_ROWS - real), (0, 0))
        batch = {"inputs": np.pad(x, pad).astype(np.int32), "targets": np.pad(y, pad).astype(np.int32),
                 "weights": np.pad(np.ones_like(y, np.float32), pad)}
        sums = eval_step(restored.state.params, sharding.shard_batch(batch, setup.mesh, setup.rules))
        loss_sum += float(sums["loss_sum"])
        weight_sum += float(sums["weight_sum"])
    return loss_sum / weight_sum


def fmt(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def compare_losses(say: Report, nano: Any, nanogpt_dir: str, text: str, data_path: str, data: dict[str, Any],
                   scratch: str, iters: int) -> dict[str, dict[str, Any]]:
    n = train_nanogpt(say, nanogpt_dir, text, scratch, iters)
    say(f"  nanoGPT: {n['wall_s']:.0f} s wall (process), median iteration {fmt(n['median_iter_ms'], '.1f')} ms, "
        f"its own val loss at step {n['own_eval_step']} (20 random batches): {fmt(n['own_val_loss'], '.4f')}")
    m = train_lmjax(say, data_path, scratch, iters)
    say(f"  lmjax: {m['wall_s']:.0f} s wall (process; trainer {fmt(m['trainer_wall_s'], '.0f')} s), its own val "
        f"loss at step {iters} (the whole split): {fmt(m['own_val_loss'], '.4f')}")
    x_WxL, y_WxL = val_windows(data["val"])
    n["val_loss"] = eval_nanogpt(nano, n["ckpt"], x_WxL, y_WxL, iters)
    config = lmjax_config(data_path, lmjax_overrides(iters, scratch))
    m["val_loss"] = eval_lmjax(config, m["workdir"], split_text(text)[1], data["val"], x_WxL, y_WxL, iters)
    say(f"val loss at step {iters}, both models on the same {len(x_WxL):,} windows of {BLOCK_SIZE} "
        f"({y_WxL.size:,} targets, the whole validation split):")
    say(f"  nanoGPT {n['val_loss']:.4f}, lmjax {m['val_loss']:.4f}, "
        f"lmjax - nanoGPT = {m['val_loss'] - n['val_loss']:+.4f} nats/char")
    return {"nanoGPT": n, "lmjax": m}


# ---------------------------------------------------------------------------------------------


def versions() -> str:
    import jax
    import torch

    return (f"Python {platform.python_version()}, torch {torch.__version__}, jax {jax.__version__}, "
            f"numpy {np.__version__}")


def table(cores: list[int], speed: dict[str, dict[str, float]], losses: dict[str, dict[str, Any]] | None,
          iters: int) -> list[str]:
    loss_head = f"val loss at {iters}" if losses else "val loss"
    lines = [f"| side | cores | tokens/s | step ms | model GFLOP/s | ratio | {loss_head} | training wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("nanoGPT", "lmjax"):
        s = speed[name]
        loss = f"{losses[name]['val_loss']:.4f}" if losses else "-"
        wall = f"{losses[name]['wall_s']:.0f}" if losses else "-"
        lines.append(f"| {name} | {','.join(map(str, cores))} | {s['tokens_per_s']:,.0f} | {s['step_ms']:.1f} | "
                     f"{s['gflops']:.2f} | {s['ratio']:.2f} | {loss} | {wall} |")
    return lines


def run(nanogpt_dir: str, data_path: str, cores: list[int], steps: int, block: int, warmup: int,
        train_iters: int, seed: int, scratch: str | None, out: str | None, shape: str = "shakespeare_char") -> None:
    import torch

    default_threads = torch.get_num_threads()
    torch.set_num_threads(len(cores))
    from lmjax import hardware

    say = Report()
    say(f"# benchmarks/vs_pytorch.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    say(f"command: {' '.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}")
    say(f"machine: {hardware.cpu_key()}, {os.cpu_count()} cores; pinned to cores {','.join(map(str, cores))} "
        f"(torch's default intra-op threads under this affinity: {default_threads}); "
        f"1-min load average before the run {os.getloadavg()[0]:.2f}")
    say(versions())
    say(git_state())
    with open(data_path, encoding="utf-8") as f:
        text = f.read()
    if scratch and os.path.isdir(scratch) and os.listdir(scratch):
        raise ValueError(f"--scratch={scratch!r} is not empty: the runs need a directory of their own")
    scratch = scratch or tempfile.mkdtemp(prefix="vs_pytorch-")
    os.makedirs(scratch, exist_ok=True)
    data = write_nanogpt_data(text, os.path.join(scratch, "ids"))
    say(f"data: {data_path}, {len(text):,} characters, {data['meta']['vocab_size']} distinct; "
        f"train {len(data['train']):,}, val {len(data['val']):,}; scratch {scratch}")
    nano = load_nanogpt(nanogpt_dir)
    speed = measure_speed(say, nano, data, data_path, cores, steps, block, warmup, seed, SHAPES[shape])
    losses = None
    if train_iters > 0:
        losses = compare_losses(say, nano, nanogpt_dir, text, data_path, data, scratch, train_iters)
    say()
    for line in table(cores, speed, losses, train_iters):
        say(line)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(say.lines) + "\n")
        print(f"wrote {out}")


def define_flags() -> Any:
    """The flags (defined only when run as a script: the test imports this file's data functions)."""
    from absl import flags

    flags.DEFINE_string("nanogpt_dir", None, "A nanoGPT checkout (model.py, train.py, configurator.py, config/).")
    flags.DEFINE_string("data", None, "Tiny Shakespeare's input.txt.")
    flags.DEFINE_string("cores", "", "Cores to pin to, e.g. 0 or 0,1 (empty: those this process may use).")
    flags.DEFINE_integer("steps", 200, "Timed train steps per side (the median is reported).")
    flags.DEFINE_integer("block", 10, "Steps per side before switching to the other.")
    flags.DEFINE_integer("warmup", 10, "Untimed steps per side first (after lmjax's compilation).")
    flags.DEFINE_integer("train_iters", 0, "Train both sides this many iterations and compare val losses (0: skip).")
    flags.DEFINE_integer("seed", 0, "Seed of the random batch offsets of the speed part.")
    flags.DEFINE_string("scratch", None, "Directory for data, runs and logs (default: a new one under /tmp).")
    flags.DEFINE_string("out", None, "Also write the report (markdown) to this file.")
    flags.DEFINE_enum("shape", "shakespeare_char", list(SHAPES),
                      "Sizes both sides build (speed); --train_iters needs shakespeare_char.")
    flags.mark_flags_as_required(["nanogpt_dir", "data"])
    return flags.FLAGS


def main(argv: list[str]) -> None:
    from absl import app, logging

    from lmjax import cli

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO

    def inputs() -> list[int]:
        check_inputs(f.nanogpt_dir, f.data)
        if f.steps < 1 or f.block < 1 or f.warmup < 1 or f.train_iters < 0 or f.train_iters == 1:
            raise ValueError("--steps, --block and --warmup must be >= 1, --train_iters 0 or >= 2")
        if f.train_iters and f.shape != "shakespeare_char":
            raise ValueError(f"--train_iters trains nanoGPT's README run: it needs --shape=shakespeare_char, not {f.shape!r}")
        return parse_cores(f.cores)

    cores = cli.run(inputs)
    os.sched_setaffinity(0, cores)  # before torch and JAX start their thread pools
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison: no accelerator probing
    cli.run(lambda: run(os.path.abspath(f.nanogpt_dir), os.path.abspath(f.data), cores, f.steps, f.block,
                        f.warmup, f.train_iters, f.seed, f.scratch, f.out, f.shape))


if __name__ == "__main__":
    from absl import app

    sys.path.insert(0, REPO)  # lmjax from this checkout when run as a script
    from lmjax import cli

    FLAGS = define_flags()
    app.run(main, flags_parser=cli.parse_flags)
