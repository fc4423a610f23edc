"""Autoregressive decoding with a KV cache: init_cache, prefill, decode_step, and batched `generate`.

The cache is a plain pytree carried through the jitted loop (no mutable Flax collection):
  index        int32 scalar, the next slot to write (shared by the batch); or [B], one per row
               (`per_row_index`), so that rows of different lengths each write where they are
  positions    [B, S] int32, the position of the token in each slot (for ALiBi)
  segment_ids  [B, S] int32, 0 for slots that must never be attended (left padding)
  layers       per layer {'k', 'v'}: [B, K, S, E] each ([B, S, K, E] for the fused attention paths:
               attention.cache_axes); with scan_layers one dict of [N, ...]
Prompts of different lengths are left-padded: every row's last prompt token then sits in the same
slot, so one shared write index serves the whole batch, while each row's positions start at 0.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from lmjax.model.attention import cache_axes, head_dim
from lmjax.model import quantization


def init_cache(cfg, batch_size: int, length: int | None = None, dtype=None, per_row_index: bool = False) -> dict:
    """An empty cache of `length` slots (default config.model.max_len), in the compute dtype."""
    S = cfg.max_len if length is None else length
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    sizes = {"b": batch_size, "k": cfg.num_kv_heads, "s": S, "e": head_dim(cfg)}
    shape = tuple(sizes[axis] for axis in cache_axes(cfg))
    if cfg.scan_layers:
        shape = (cfg.num_layers, *shape)
        layers = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    else:
        layers = tuple(
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
        )
    return {
        "index": jnp.zeros((batch_size,) if per_row_index else (), jnp.int32),
        "positions": jnp.zeros((batch_size, S), jnp.int32),
        "segment_ids": jnp.zeros((batch_size, S), jnp.int32),
        "layers": layers,
    }


def prefill(cfg, params, cache: dict, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    """Runs a (padded) prompt block through the model, writing its keys/values into the cache.

    Returns (float32 logits [B, L, V], cache). segment_ids 0 marks padding; default all 1.
    """
    return quantization.model_for(cfg).apply(
        {"params": nn.unbox(params)}, tokens_BxL, positions_BxL, segment_ids_BxL, cache=cache
    )


def decode_step(cfg, params, cache: dict, tokens_B, positions_B):
    """One new token per row at the next cache slot. Returns (float32 logits [B, V], cache)."""
    logits_Bx1xV, cache = prefill(cfg, params, cache, tokens_B[:, None], positions_B[:, None])
    return logits_Bx1xV[:, 0], cache


def warp_logits(logits_BxV, temperature, top_k: int = 0, top_p: float = 1.0):
    """Logits of the distribution `sample` draws from: scaled by temperature, then top-k, nucleus.

    Separate from `sample` because speculative decoding needs the probabilities themselves.
    """
    logits_BxV = logits_BxV / temperature
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # The smallest logit still inside the nucleus (the top token is always kept).
        cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def sample(logits_BxV, rng, temperature, top_k: int = 0, top_p: float = 1.0, greedy: bool = False):
    """Next tokens [B] from float32 logits: argmax when greedy, else temperature, top-k, nucleus."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = warp_logits(logits_BxV, temperature, top_k, top_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "top_p", "greedy"))
def _generate(
    cfg, params, tokens_BxP, positions_BxP, segment_ids_BxP, rng, temperature,
    *, max_new_tokens, top_k, top_p, greedy,
):
    """Prefill, then a lax.scan of decode steps: the whole generation is one compiled program."""
    B, P = tokens_BxP.shape
    cache = init_cache(cfg, B, P + max_new_tokens)
    logits_BxPxV, cache = prefill(cfg, params, cache, tokens_BxP, positions_BxP, segment_ids_BxP)
    rngs = jax.random.split(rng, max_new_tokens)
    first_B = sample(logits_BxPxV[:, -1], rngs[0], temperature, top_k, top_p, greedy)

    def step(carry, rng_t):
        cache, token_B, position_B = carry
        logits_BxV, cache = decode_step(cfg, params, cache, token_B, position_B)
        next_B = sample(logits_BxV, rng_t, temperature, top_k, top_p, greedy)
        return (cache, next_B, position_B + 1), next_B

    carry = (cache, first_B, positions_BxP[:, -1] + 1)
    _, rest_TxB = jax.lax.scan(step, carry, rngs[1:])
    return jnp.concatenate([first_B[:, None], rest_TxB.T], axis=1)


def generate(
    cfg,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    min_prompt_len: int = 0,
) -> list[list[int]]:
    """Samples continuations of a batch of prompts (of any lengths >= 1); returns the new tokens only.

    temperature 0 is greedy. All rows run for max_new_tokens steps in one jitted scan; a row's output
    is then cut before its first eos_id. Prompts are left-padded to the longest, or to
    `min_prompt_len` if longer: callers that round it up to a few sizes compile a few programs.
    """
    check_prompts(cfg, prompts, max_new_tokens)
    tokens, positions, segment_ids = left_pad(prompts, min_prompt_len)
    greedy = temperature == 0
    out_BxT = _generate(
        FrozenConfigDict(cfg),
        nn.unbox(params),
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jnp.asarray(segment_ids),
        jax.random.key(0) if rng is None else rng,
        jnp.float32(1.0 if greedy else temperature),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=float(top_p),
        greedy=greedy,
    )
    return cut_at_eos(out_BxT, eos_id)


def check_prompts(cfg, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuses an empty prompt, and a continuation past the end of a learned position table."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    P = max(len(p) for p in prompts)
    if cfg.position == "learned" and P + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds "
            f"config.model.max_len={cfg.max_len}, the size of the learned position table"
        )


def left_pad(prompts: list[list[int]], min_len: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, positions, segment_ids [B, P] of prompts left-padded to the longest (or to `min_len`):
    each row's last token in the same slot, positions from 0, padding in segment 0."""
    B, P = len(prompts), max(max(len(p) for p in prompts), min_len)
    tokens, positions, segment_ids = (np.zeros((B, P), np.int32) for _ in range(3))
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) :] = prompt
        positions[row, P - len(prompt) :] = np.arange(len(prompt))
        segment_ids[row, P - len(prompt) :] = 1
    return tokens, positions, segment_ids


def cut_at_eos(tokens_BxT, eos_id: int | None) -> list[list[int]]:
    """Each row as a list, cut before its first eos_id."""
    result = []
    for row in np.asarray(tokens_BxT).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result
