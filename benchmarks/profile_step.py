"""Where a train step's time goes, op by op: a `jax.profiler` trace of the real step, summarised.

    python benchmarks/profile_step.py --config=configs/shakespeare_char.py [--config.x=y ...] [--steps=20]
    taskset -c 0 python benchmarks/profile_step.py ...   # one core

Runs the trainer's jitted step on random batches (`model.vocab_size` falls back to `--vocab_size`),
traces `--steps` steps after warm-up, and maps every compiled op the trace timed back to the model
code that produced it (the op's `op_name` in the optimized HLO). Prints milliseconds per step by
part (attention, MLP, norms, embedding and head, optimizer) and direction (forward, which under
`grad` includes the forward's linearisation, or backward), then the most expensive ops with their
shapes. `--hlo_out=FILE` keeps the optimized HLO for a closer look.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "Config file.")
_VOCAB = flags.DEFINE_integer("vocab_size", 66, "Vocabulary size when the config leaves it unset.")
_STEPS = flags.DEFINE_integer("steps", 20, "Traced steps.")
_TOP = flags.DEFINE_integer("top", 25, "Most expensive ops to list.")
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "Write the step's optimized HLO here.")
_REUSE = flags.DEFINE_bool(
    "reuse_host_memory", True, "Reuse freed host memory as the trainer does (lmjax.host_memory); off: glibc's defaults.")

PARTS = (("/attn/", "attention"), ("/mlp/", "mlp"), ("norm", "norms"),
         ("bld,dv->blv", "embedding + head"), ("embedding", "embedding + head"), ("Transformer", "other model"))


def part_of(op_name: str) -> tuple[str, str]:
    """(part of the model or 'optimizer + loss', 'fwd' or 'bwd') of an HLO op_name."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    for marker, part in PARTS:
        if marker in op_name:
            return part, direction
    return "optimizer + loss", direction


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Each top-level instruction of the optimized module: name -> (shape, op_name)."""
    entry = re.search(r"\nENTRY [^\n]*\{\n(.*?)\n\}", hlo_text, re.S).group(1)
    table = {}
    for line in entry.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.]+) = (\S+) ", line)
        if match:
            op_name = re.search(r'op_name="([^"]+)"', line)
            table[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "?")
    return table


def op_times(trace_dir: str, names: dict) -> collections.Counter:
    """Total microseconds per compiled op over the trace (events named after HLO instructions)."""
    path = sorted(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            totals[event["name"]] += event["dur"]
    return totals


def profile(config) -> None:
    import jax
    import numpy as np

    from lmjax import config as config_lib
    from lmjax import cpu_dots, host_memory, sharding, train
    from lmjax.model import Transformer

    if config.model.vocab_size is None:
        config.model.vocab_size = _VOCAB.value
    config_lib.check(config)
    if _REUSE.value:  # before anything starts JAX, as the trainer does
        print(f"one heap, steps inline (lmjax.host_memory.one_heap_for_large_steps): "
              f"{host_memory.one_heap_for_large_steps(host_memory.logits_bytes(config))}")
    print(f"CPU dot library (lmjax.cpu_dots): {cpu_dots.choose_dot_library()}")
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
    if _REUSE.value:
        print(f"freed host memory reused (lmjax.host_memory): {host_memory.reuse_freed_host_memory()}")
    model = Transformer(config.model)
    state, shardings = train.create_train_state(config, model, mesh)
    rows, length = int(config.train.batch_size), int(config.data.seq_len)
    rng = np.random.default_rng(0)

    def batch():
        tokens = rng.integers(0, config.model.vocab_size, (rows, length + 1), dtype=np.int32)
        return sharding.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                     "weights": np.ones((rows, length), np.float32)}, mesh, rules)

    step = train.make_train_step(config, model, mesh, shardings).lower(state, batch()).compile()
    hlo = step.as_text()
    if _HLO_OUT.value:
        with open(_HLO_OUT.value, "w") as f:
            f.write(hlo)
    for _ in range(5):
        state, metrics = step(state, batch())
    jax.block_until_ready(metrics)
    batches = [batch() for _ in range(_STEPS.value)]
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for b in batches:
            state, metrics = step(state, b)
            jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        names = op_table(hlo)
        totals = op_times(trace_dir, names)

    per_step = {name: us / _STEPS.value / 1e3 for name, us in totals.items()}
    by_part = collections.Counter()
    for name, ms in per_step.items():
        by_part[part_of(names[name][1])] += ms
    print(f"devices {len(jax.devices())} x {jax.devices()[0].device_kind}; batch {rows} x {length}; "
          f"{_STEPS.value} traced steps; ms per step summed over the ops the trace timed")
    print("\n| part | forward ms | backward ms | total ms |\n|---|---|---|---|")
    for part in sorted({p for p, _ in by_part}, key=lambda p: -(by_part[(p, "fwd")] + by_part[(p, "bwd")])):
        fwd, bwd = by_part[(part, "fwd")], by_part[(part, "bwd")]
        print(f"| {part} | {fwd:.2f} | {bwd:.2f} | {fwd + bwd:.2f} |")
    print(f"| all ops | {sum(v for (_, d), v in by_part.items() if d == 'fwd'):.2f} | "
          f"{sum(v for (_, d), v in by_part.items() if d == 'bwd'):.2f} | {sum(by_part.values()):.2f} |")
    print(f"\n{_TOP.value} most expensive ops (ms per step, shape, source):")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[: _TOP.value]:
        shape, op_name = names[name]
        print(f"  {ms:6.2f}  {name:32s} {shape:28s} {op_name.removeprefix('jit(train_step)/')[-90:]}")


def main(argv) -> None:
    del argv
    from lmjax import cli

    cli.run(lambda: profile(_CONFIG.value))


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from lmjax import cli

    app.run(main, flags_parser=cli.parse_flags)
