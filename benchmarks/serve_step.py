"""The serving engine's decode step alone: XLA's cost analysis, cache copies in its optimized HLO, time.

    python -m benchmarks.serve_step [--preset=configs/gpt_small.py] [--rows=1,16] [--keys=32,64,128]

For each row count and key bucket, compiles `lmjax.serve.engine.decode_slots` for a random-init
model of the preset's shape (vocab 259, the byte tokenizer's) and prints the bytes accessed and
FLOPs of XLA's cost analysis, the copies and transposes in the optimized HLO that produce a whole
layer's cache, and the fastest and median of `--calls` calls (the cache donated from call to call).
The per-row cache writes are scatters that the cost analysis counts as a read and a write of the
whole cache, although they run in place.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from lmjax import config as config_lib
from lmjax import host_memory
from lmjax.model import Transformer, decoding
from lmjax.serve import engine as engine_lib


def cache_copies(program: str, layer_size: int) -> int:
    """Copies and transposes in an optimized HLO text whose result has `layer_size` elements."""
    count = 0
    for line in program.splitlines():
        if " copy(" in line or " transpose(" in line:
            dims = line.split("[", 1)[1].split("]", 1)[0].split(",")
            count += int(np.prod([int(d) for d in dims if d])) == layer_size
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="configs/gpt_small.py")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--keys", default="32,64,128")
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    print(f"freed host memory reused (lmjax.host_memory, as the server does): {host_memory.reuse_freed_host_memory()}")
    c = config_lib.load(args.preset)
    c.model.vocab_size = 259
    cfg = FrozenConfigDict(c.model)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    print("| rows | keys | MB accessed | MFLOP | cache copies | fastest / median (ms) |")
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        for keys in (int(k) for k in args.keys.split(",")):
            cache = decoding.init_cache(cfg, rows, cfg.max_len, per_row_index=True)
            cache["index"] = jnp.full((rows,), keys // 2, jnp.int32)
            requests = [engine_lib.Request([1], 1, emit=None, temperature=0.8, seed=i) for i in range(rows)]
            inputs = (np.arange(rows, dtype=np.int32), np.ones(rows, bool), engine_lib._settings(requests),
                      np.zeros(rows, np.int32))
            compiled = engine_lib.decode_slots.lower(cfg, params, cache, *inputs, keys=keys).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            copies = cache_copies(compiled.as_text(), jax.tree.leaves(cache["layers"])[0].size)
            times = []
            for _ in range(args.calls + 1):
                start = time.perf_counter()
                cache, out = engine_lib.decode_slots(cfg, params, cache, *inputs, keys=keys)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - start)
            times = times[1:]
            print(f"| {rows} | {keys} | {cost['bytes accessed'] / 1e6:.1f} | {cost['flops'] / 1e6:.1f} | {copies} | "
                  f"{1e3 * min(times):.2f} / {1e3 * statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
