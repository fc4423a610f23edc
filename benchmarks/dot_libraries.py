"""The train step's matmuls, one by one, through each dot library XLA's CPU backend can call, and PyTorch's.

    python benchmarks/dot_libraries.py [--shape=shakespeare_char] [--cores=0,1] [--reps=200] [--out=FILE]

Every dense layer of the model and its two gradients, and attention's batched matmuls, at the sizes of
a `benchmarks/vs_pytorch.py` shape: each compiled three ways, YNNPACK (XLA's default), XLA's own
Eigen contraction (`cpu_dots`' one-core choice) and oneDNN (experimental in XLA; `cpu_dots`' choice
on more cores), timed alternately call by call in this process, then PyTorch's `torch.matmul` (if
installed) on the same operands afterwards, never interleaved with JAX (PyTorch's OpenMP workers keep
spinning after each call and would slow XLA's threads down). Run it once pinned to one core and once
to two: where a library's GFLOP/s does not grow with the second core, a step spends that core's time
waiting or repeating work.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_pytorch import SHAPES, parse_cores  # noqa: E402

_SHAPE = flags.DEFINE_enum("shape", "shakespeare_char", list(SHAPES), "Model and batch sizes (vs_pytorch.py's).")
_CORES = flags.DEFINE_string("cores", "", "Cores to pin to, e.g. 0 or 0,1 (empty: those this process may use).")
_REPS = flags.DEFINE_integer("reps", 200, "Timed calls per matmul and library (the median is reported).")
_OUT = flags.DEFINE_string("out", None, "Also write the table (markdown) to this file.")

CHAR_VOCAB = 66  # tiny Shakespeare's 65 characters and EOS, as vs_pytorch.py's lmjax side has
LIBRARIES = {  # XLA compile options per library: enum names, as compile() takes them
    "YNNPACK": {},
    "Eigen": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "oneDNN": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def step_matmuls(shape) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(what, lhs shape, rhs shape) of each distinct matmul of a train step; batched ones lead with the batch."""
    T, D, F = shape.batch_size * shape.block_size, shape.n_embd, 4 * shape.n_embd
    V, BH, L, E = shape.vocab_size or CHAR_VOCAB, shape.batch_size * shape.n_head, shape.block_size, shape.n_embd // shape.n_head
    return [
        ("q/k/v/out: forward, input grad", (T, D), (D, D)),
        ("mlp up: forward; mlp down: input grad", (T, D), (D, F)),
        ("mlp down: forward; mlp up: input grad", (T, F), (F, D)),
        ("lm head: forward", (T, D), (D, V)),
        ("q/k/v/out: weight grad", (D, T), (T, D)),
        ("mlp up: weight grad", (D, T), (T, F)),
        ("mlp down: weight grad", (F, T), (T, D)),
        ("attention: q k^T, dp", (BH, L, E), (BH, E, L)),
        ("attention: p v, dq, dk, dv", (BH, L, L), (BH, L, E)),
    ]


def flops(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return 2 * int(np.prod(a)) * b[-1]


def time_jax(operands: list[tuple[np.ndarray, np.ndarray]], reps: int) -> list[dict[str, float]]:
    """Median seconds per call of each library on each pair of operands, libraries alternating."""
    import jax
    import jax.numpy as jnp

    arrays = [(jnp.asarray(a), jnp.asarray(b)) for a, b in operands]
    compiled = []
    for a, b in arrays:
        lowered = jax.jit(jnp.matmul).lower(a, b)
        compiled.append({name: lowered.compile(compiler_options=opts or None) for name, opts in LIBRARIES.items()})
    out = []
    for timed in (False, True):  # a first untimed pass: the cores' clocks and caches settle
        for (a, b), fns in zip(arrays, compiled):
            times = {name: [] for name in fns}
            for _ in range(reps if timed else max(1, reps // 4)):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(a, b))
                    times[name].append(time.perf_counter() - t0)
            if timed:
                out.append({name: statistics.median(t) for name, t in times.items()})
    return out


def time_torch(operands: list[tuple[np.ndarray, np.ndarray]], reps: int, threads: int) -> list[float] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tensors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in operands]
    out = []
    for timed in (False, True):
        for a, b in tensors:
            times = []
            for _ in range(reps if timed else max(1, reps // 4)):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
            if timed:
                out.append(statistics.median(times))
    return out


def main(argv: list[str]) -> None:
    del argv
    cores = parse_cores(_CORES.value)
    if cores:
        os.sched_setaffinity(0, cores)
    shape = SHAPES[_SHAPE.value]
    rng = np.random.default_rng(0)
    matmuls = step_matmuls(shape)
    operands = [(rng.standard_normal(a, np.float32), rng.standard_normal(b, np.float32)) for _, a, b in matmuls]
    jax_s = time_jax(operands, _REPS.value)
    torch_s = time_torch(operands, _REPS.value, len(os.sched_getaffinity(0)))
    names = list(LIBRARIES) + (["PyTorch"] if torch_s else [])
    lines = [f"GFLOP/s (median of {_REPS.value} calls), shape `{_SHAPE.value}`, "
             f"{len(os.sched_getaffinity(0))} core(s) {sorted(os.sched_getaffinity(0))}", "",
             "| matmul | lhs x rhs | MFLOP | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    totals = {name: 0.0 for name in names}
    for i, (what, a, b) in enumerate(matmuls):
        seconds = dict(jax_s[i], **({"PyTorch": torch_s[i]} if torch_s else {}))
        for name in names:
            totals[name] += seconds[name]
        rates = " | ".join(f"{flops(a, b) / seconds[name] / 1e9:.0f}" for name in names)
        lines.append(f"| {what} | {a} x {b} | {flops(a, b) / 1e6:.1f} | {rates} |")
    lines.append("| all, one call each (ms) | | | " + " | ".join(f"{totals[n] * 1e3:.2f}" for n in names) + " |")
    print("\n".join(lines))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
