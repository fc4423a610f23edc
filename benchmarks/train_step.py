"""Time the real train step of a config on the current devices: compile time, ms/step, tokens/s, MFU.

  python benchmarks/train_step.py --config=configs/gpt_small.py [--config.model.num_layers=6 ...]
  python benchmarks/train_step.py --config=configs/gpt_small.py --fake_devices=8
  python benchmarks/train_step.py --config=configs/gpt_small.py --compare_masks
  taskset -c 0 python benchmarks/train_step.py ...    # one core; the CPU peak follows the affinity

No tokenizer or data is needed: the batch is random tokens over `--vocab_size` (used when the
config leaves `model.vocab_size` unset). The step is the one the trainer runs (same shardings,
donated state); the mesh comes from `config.mesh` (data=-1 takes every device). `--fake_devices=N`
re-runs this script with N fake CPU devices (XLA's host-platform device count), which must be
set before JAX starts. Timing: `--warmup` untimed steps, then the median of `--steps` steps. On the
CPU it also prints the process's peak memory: `JAX_CPU_ENABLE_ASYNC_DISPATCH=true` keeps a large
step asynchronous, to see what running it on the calling thread saves (`lmjax.host_memory`).

The achieved model GFLOP/s (analytic FLOPs, as `lmjax.model.flops_per_token` counts them) is the
figure to compare between runs. MFU divides it by the peak the trainer uses
(`lmjax.hardware.peak_flops_and_source`), printed with its source; the peak is never measured here,
next to the step, because a peak that moves with the machine's load makes MFU figures incomparable.

`--compare_masks` times two compiled steps in one process: one fed batches with `segment_ids` (all
ones) and `positions`, as concat packing used to yield them, which makes the model build and apply a
dense [B, 1, L, L] mask; one fed inputs/targets/weights alone, the plain causal path (concat packing
now; `is_causal` with `--config.model.attention=dot_product`). The two alternate, in alternating
order, over the timed repetitions, so other work on a shared machine slows both alike.
"""

import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt_small.py", "Config file.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size when the config leaves it unset.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
_FAKE = flags.DEFINE_integer("fake_devices", 0, "Re-run with this many fake CPU devices (0: real devices).")
_COMPARE_MASKS = flags.DEFINE_bool(
    "compare_masks", False, "Also time the step on batches with segment_ids (a dense mask) against the causal path."
)
_REUSE = flags.DEFINE_bool(
    "reuse_host_memory", True, "Reuse freed host memory as the trainer does (lmjax.host_memory); off: glibc's defaults.")

FAKE_FLAG = "--xla_force_host_platform_device_count"


def reexec_with_fake_devices(n: int) -> None:
    """Replace this process by itself with N fake CPU devices, unless that is already the case."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if f"{FAKE_FLAG}={n}" in xla_flags:
        return
    env = dict(os.environ, XLA_FLAGS=f"{xla_flags} {FAKE_FLAG}={n}".strip(), JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def time_steps(steps: dict, state, warmup: int, reps: int):
    """Runs each (compiled step, batch) of `steps` once per round: `warmup` untimed rounds, then `reps`
    timed ones, reversing the order every other round so that no variant always runs first.

    Returns the final state, the last metrics and {name: [seconds per step]}.
    """
    import jax

    names = list(steps)
    metrics = None
    for _ in range(warmup):
        for name in names:
            state, metrics = steps[name][0](state, steps[name][1])
    jax.block_until_ready(metrics)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            step, batch = steps[name]
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - start)
    return state, metrics, times


def main(argv: list[str]) -> None:
    del argv
    if _FAKE.value:
        reexec_with_fake_devices(_FAKE.value)
    from lmjax import cli
    from lmjax import config as config_lib

    config = _CONFIG.value
    if config.model.vocab_size is None:
        config.model.vocab_size = _VOCAB.value
    cli.run(lambda: config_lib.check(config))
    cli.run(lambda: measure(config))


def measure(config) -> None:
    import jax
    import numpy as np

    from lmjax import cpu_dots, hardware, host_memory, sharding, train
    from lmjax import model as model_lib

    if _REUSE.value:  # before anything starts JAX, as the trainer does
        print(f"one heap, steps inline (lmjax.host_memory.one_heap_for_large_steps): "
              f"{host_memory.one_heap_for_large_steps(host_memory.logits_bytes(config))}")
    print(f"CPU dot library (lmjax.cpu_dots): {cpu_dots.choose_dot_library()}")
    variants = 2 if _COMPARE_MASKS.value else 1
    config.train.steps = max(int(config.train.steps), variants * (_WARMUP.value + _STEPS.value) + 1)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules(config.mesh)
    model = model_lib.Transformer(config.model)
    if _REUSE.value:
        print(f"freed host memory reused (lmjax.host_memory): {host_memory.reuse_freed_host_memory()}")
    rows, length = int(config.train.batch_size), int(config.data.seq_len)
    flops_per_token = model_lib.flops_per_token(config.model, length)
    devices = jax.devices()

    print(f"config {config.name}: {dict(config.model)}")
    print(f"devices {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if devices[0].platform == "cpu":
        print(f"CPU {hardware.cpu_key()}, {hardware.usable_cores()} usable cores")
    print(f"params {model_lib.param_count(config.model):,} "
          f"(non-embedding {model_lib.param_count(config.model, non_embedding=True):,})")
    print(f"batch {rows} x {length} tokens, microbatches {config.train.microbatches}, "
          f"flops/token {flops_per_token / 1e6:.1f} M, flops/step {flops_per_token * rows * length / 1e9:.1f} G")
    try:
        peak_per_device, source = hardware.peak_flops_and_source(devices[0])
    except ValueError as e:  # an accelerator missing from the table: time the step, report no MFU
        print(f"MFU not reported: {e}")
        peak_per_device, source = None, None
    else:
        print(f"peak {peak_per_device * len(devices) / 1e9:,.1f} GFLOP/s = {len(devices)} device(s) x "
              f"{peak_per_device / 1e9:,.1f} (source: {source}, lmjax.hardware)")

    state, shardings = train.create_train_state(config, model, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (rows, length + 1), dtype=np.int32)
    causal = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, length), np.float32)}
    batches = {"causal": causal}
    if _COMPARE_MASKS.value:
        batches["segment mask"] = dict(
            causal,
            segment_ids=np.ones((rows, length), np.int32),
            positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        )
    jitted = train.make_train_step(config, model, mesh, shardings)
    steps = {}
    for name, batch_np in batches.items():
        batch = sharding.shard_batch(batch_np, mesh, rules)
        start = time.perf_counter()
        steps[name] = (jitted.lower(state, batch).compile(), batch)
        print(f"compile ({name}) {time.perf_counter() - start:.1f} s")

    state, metrics, times = time_steps(steps, state, _WARMUP.value, _STEPS.value)
    print(f"loss {float(metrics['loss']):.3f}")
    medians = {}
    for name, seconds in times.items():
        medians[name] = median = statistics.median(seconds)
        tokens_per_sec = rows * length / median
        achieved = tokens_per_sec * flops_per_token
        line = (f"{name:>12}: step {median * 1e3:.1f} ms (median of {len(seconds)}; min {min(seconds) * 1e3:.1f}, "
                f"max {max(seconds) * 1e3:.1f}), tokens/s {tokens_per_sec:,.0f}, model {achieved / 1e9:.1f} GFLOP/s")
        if peak_per_device is not None:
            line += f", MFU {train.mfu(tokens_per_sec, flops_per_token, devices, peak_per_device):.1%} ({source} peak)"
        print(line)
    if devices[0].platform == "cpu" and sys.platform == "linux":  # ru_maxrss is in KiB on Linux
        import resource

        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(f"peak host memory (max RSS of this process) {peak_mib:,} MiB")
    if _COMPARE_MASKS.value:
        # Each round ran both steps back to back: the median of per-round ratios is less exposed to
        # load that changes between rounds than the ratio of the two medians.
        paired = statistics.median(m / c for m, c in zip(times["segment mask"], times["causal"]))
        ratio = medians["segment mask"] / medians["causal"]
        print(f"segment mask / causal step time: {paired:.3f} (median of per-round ratios), "
              f"{ratio:.3f} (ratio of medians)")


if __name__ == "__main__":
    from lmjax import cli

    app.run(main, flags_parser=cli.parse_flags)
