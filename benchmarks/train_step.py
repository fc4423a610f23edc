"""Time the real train step of a config on the current devices: compile time, ms/step, tokens/s, MFU.

  python benchmarks/train_step.py --config=configs/gpt_small.py [--config.model.num_layers=6 ...]
  python benchmarks/train_step.py --config=configs/gpt_small.py --fake_devices=8

No tokenizer or data is needed: the batch is random tokens over `--vocab_size` (used when the
config leaves `model.vocab_size` unset). The step is the one the trainer runs (same shardings,
donated state); the mesh comes from `config.mesh` (data=-1 takes every device). `--fake_devices=N`
re-runs this script with N fake CPU devices (XLA's host-platform device count), which must be
set before JAX starts. Timing: `--warmup` untimed steps, then the median of `--steps` steps.
"""

import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt_small.py", "Config file.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size when the config leaves it unset.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_FAKE = flags.DEFINE_integer("fake_devices", 0, "Re-run with this many fake CPU devices (0: real devices).")
_MEASURE_PEAK = flags.DEFINE_bool(
    "measure_peak", True, "On CPU, also measure the matmul peak now, next to the step (shared machines)."
)

FAKE_FLAG = "--xla_force_host_platform_device_count"


def reexec_with_fake_devices(n: int) -> None:
    """Replace this process by itself with N fake CPU devices, unless that is already the case."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if f"{FAKE_FLAG}={n}" in xla_flags:
        return
    env = dict(os.environ, XLA_FLAGS=f"{xla_flags} {FAKE_FLAG}={n}".strip(), JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str]) -> None:
    del argv
    if _FAKE.value:
        reexec_with_fake_devices(_FAKE.value)

    import jax
    import numpy as np

    from lmjax import hardware, sharding, train
    from lmjax import model as model_lib

    config = _CONFIG.value
    if config.model.vocab_size is None:
        config.model.vocab_size = _VOCAB.value
    config.train.steps = max(int(config.train.steps), _WARMUP.value + _STEPS.value + 1)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules(config.mesh)
    model = model_lib.Transformer(config.model)
    rows, length = int(config.train.batch_size), int(config.data.seq_len)
    flops_per_token = model_lib.flops_per_token(config.model, length)

    print(f"config {config.name}: {dict(config.model)}")
    print(f"devices {len(jax.devices())} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"params {model_lib.param_count(config.model):,} "
          f"(non-embedding {model_lib.param_count(config.model, non_embedding=True):,})")
    print(f"batch {rows} x {length} tokens, microbatches {config.train.microbatches}, "
          f"flops/token {flops_per_token / 1e6:.1f} M, flops/step {flops_per_token * rows * length / 1e9:.1f} G")

    state, shardings = train.create_train_state(config, model, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (rows, length + 1), dtype=np.int32)
    batch = sharding.shard_batch(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, length), np.float32)},
        mesh,
        rules,
    )
    start = time.perf_counter()
    step = train.make_train_step(config, model, mesh, shardings).lower(state, batch).compile()
    print(f"compile {time.perf_counter() - start:.1f} s")

    for _ in range(_WARMUP.value):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_sec = rows * length / seconds
    mfu = train.mfu(tokens_per_sec, flops_per_token, jax.devices())
    achieved = tokens_per_sec * flops_per_token
    print(f"step {seconds * 1e3:.1f} ms (median of {len(times)}; min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f}), loss {float(metrics['loss']):.3f}")
    peak = hardware.peak_flops_per_device(jax.devices()[0]) * len(jax.devices())
    print(f"tokens/s {tokens_per_sec:,.0f}, model {achieved / 1e9:.1f} GFLOP/s, "
          f"MFU {mfu:.1%} of {peak / 1e9:.0f} GFLOP/s (lmjax.hardware)")
    if _MEASURE_PEAK.value and jax.devices()[0].platform == "cpu":
        now = hardware.measure_cpu_matmul_flops()
        best = hardware.record_cpu_peak(now)
        print(f"matmul peak measured now {now / 1e9:.0f} GFLOP/s: MFU {achieved / now:.1%} "
              f"(best seen here {best / 1e9:.0f} GFLOP/s, now the trainer's MFU reference)")


if __name__ == "__main__":
    from lmjax import cli

    app.run(main, flags_parser=cli.parse_flags)
