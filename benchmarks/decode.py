"""Decode speed: KV-cache generation vs recomputing the full forward pass for every new token.

    python -m benchmarks.decode --vocab_size=4096 --new_tokens=256   (from the repo root)

Both loops are greedy, run entirely inside one jit (compile time excluded), on a random-init model
with the shape of configs/gpt_small.py (max_len raised to prompt + new tokens). The full-recompute
loop runs the forward over a fixed buffer of prompt + new_tokens slots each step (causal: the
unfilled tail cannot change the logits read at the current slot).
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import cli
from lmjax import config as config_lib
from lmjax.model import Transformer, generate, param_count


def gpt_small_model_config(vocab_size: int, max_len: int):
    cfg = config_lib.load("configs/gpt_small.py").model
    cfg.vocab_size = vocab_size
    cfg.max_len = max_len
    return cfg


def full_recompute_generate(cfg, new_tokens: int):
    """A jitted greedy loop that runs the whole forward pass over the buffer at every step."""
    model = Transformer(cfg)

    @jax.jit
    def run(params, prompt_BxP):
        B, P = prompt_BxP.shape
        buffer_BxT = jnp.zeros((B, P + new_tokens), jnp.int32).at[:, :P].set(prompt_BxP)

        def step(t, buffer_BxT):
            logits_BxTxV = model.apply({"params": params}, buffer_BxT)
            next_B = jnp.argmax(logits_BxTxV[:, P + t - 1], axis=-1).astype(jnp.int32)
            return buffer_BxT.at[:, P + t].set(next_B)

        return jax.lax.fori_loop(0, new_tokens, step, buffer_BxT)[:, P:]

    return run


def timed(fn, repeats: int) -> float:
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args()
    cli.run(lambda: measure(args))


def measure(args: argparse.Namespace) -> None:
    cfg = gpt_small_model_config(args.vocab_size, args.prompt_len + args.new_tokens)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts_np = np.random.default_rng(0).integers(0, args.vocab_size, (args.batch_size, args.prompt_len))
    prompts = prompts_np.tolist()

    cached_out, full_out = [], []

    def run_cached():
        cached_out.append(generate(cfg, params, prompts, args.new_tokens, temperature=0.0))

    full = full_recompute_generate(cfg, args.new_tokens)

    def run_full():
        full_out.append(np.asarray(full(params, jnp.asarray(prompts_np, jnp.int32))))

    cached_s = timed(run_cached, args.repeats)
    full_s = timed(run_full, args.repeats)

    tokens = args.batch_size * args.new_tokens
    agree = np.mean(np.asarray(cached_out[-1]) == full_out[-1])
    print(f"model: gpt_small shape, {param_count(cfg):,} params, vocab {args.vocab_size}, "
          f"batch {args.batch_size}, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
          f"{jax.devices()[0].platform}")
    print(f"kv-cache:       {tokens / cached_s:10.1f} tok/s  ({cached_s:.3f} s)")
    print(f"full recompute: {tokens / full_s:10.1f} tok/s  ({full_s:.3f} s)")
    print(f"speedup: {full_s / cached_s:.2f}x   greedy tokens identical: {agree:.1%}")


if __name__ == "__main__":
    main()
