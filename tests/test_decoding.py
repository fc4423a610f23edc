"""KV-cache decoding equals the full forward pass; ragged batches; sampling filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from lmjax.model import decoding, generate
from test_model import FAST_COMPILE, POSITIONS, forward, init, random_tokens, tiny_cfg


def left_pad(rows):
    """Prompts of different lengths, left-padded: padding has segment 0, positions start at 0."""
    P = max(len(r) for r in rows)
    tokens, positions, segment_ids = (np.zeros((len(rows), P), np.int32) for _ in range(3))
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = r
        positions[i, P - len(r):] = np.arange(len(r))
        segment_ids[i, P - len(r):] = 1
    return tokens, positions, segment_ids


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _cached_logits(frozen_cfg, prefill_chunks, params, tokens, positions, segment_ids, continuation):
    """Prefill the left-padded prompts (in `prefill_chunks` pieces), then feed `continuation` one
    token per step through decode_step. Returns the logits of every slot and step, and the index."""
    B, P = tokens.shape
    steps = continuation.shape[1]
    cache = decoding.init_cache(frozen_cfg, B, P + steps)
    bounds = np.linspace(0, P, prefill_chunks + 1).astype(int)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, cache = decoding.prefill(
            frozen_cfg, params, cache, tokens[:, lo:hi], positions[:, lo:hi], segment_ids[:, lo:hi]
        )
        out.append(logits)

    def step(carry, token_B):
        cache, position_B = carry
        logits_BxV, cache = decoding.decode_step(frozen_cfg, params, cache, token_B, position_B)
        return (cache, position_B + 1), logits_BxV

    (cache, _), step_logits_TxBxV = jax.lax.scan(step, (cache, positions[:, -1] + 1), continuation.T)
    return jnp.concatenate(out + [step_logits_TxBxV.transpose(1, 0, 2)], axis=1), cache["index"]


def check_cached_matches_full(cfg, lengths=(3, 7, 5), steps=3, prefill_chunks=1):
    """Left-padded ragged batch through the cache == each row alone through the full forward."""
    params = init(cfg)
    rows = [np.asarray(random_tokens(20 + i, (n + steps,))) for i, n in enumerate(lengths)]
    tokens, positions, segment_ids = left_pad([r[:n] for r, n in zip(rows, lengths)])
    continuation = np.stack([r[n:] for r, n in zip(rows, lengths)])
    cached, index = _cached_logits(
        FrozenConfigDict(cfg), prefill_chunks, params, tokens, positions, segment_ids, continuation
    )
    assert int(index) == tokens.shape[1] + steps
    # Each row alone, right-padded to a common length (causal: padding after a row cannot matter).
    alone = np.zeros((len(rows), max(lengths) + steps), np.int32)
    for i, r in enumerate(rows):
        alone[i, : len(r)] = r
    full = forward(cfg, params, jnp.asarray(alone))
    P = tokens.shape[1]
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(cached[i, P - n:], full[i, : n + steps], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_decode_matches_full_forward_on_ragged_batch_for_every_position_type(position):
    check_cached_matches_full(tiny_cfg(position=position))  # GQA: 4 query heads, 2 kv heads


@pytest.mark.parametrize(
    "overrides",
    [
        dict(position="rope", num_kv_heads=1, scan_layers=True, attention="dot_product"),
        dict(position="alibi", num_kv_heads=4, qk_norm=True, norm="rmsnorm", mlp="swiglu", use_bias=False),
    ],
)
def test_cached_decode_matches_full_forward_mqa_mha_scan_dot_product(overrides):
    """The second case also prefills in two chunks, the second into a non-empty cache."""
    check_cached_matches_full(tiny_cfg(**overrides), prefill_chunks=1 + ("alibi" == overrides["position"]))


def greedy_by_full_forward(cfg, params, prompt, steps):
    """Greedy decoding the slow way: the full forward over a fixed-size buffer at every step."""
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + steps):
        buffer[0, t] = int(jnp.argmax(forward(cfg, params, jnp.asarray(buffer))[0, t - 1]))
    return buffer[0, len(prompt):].tolist()


def test_generate_batched_ragged_prompts_equal_greedy_full_forward():
    cfg = tiny_cfg(position="learned")
    params = init(cfg)
    prompts = [[5, 9], [1, 2, 3, 4, 60, 7]]
    batched = generate(cfg, params, prompts, max_new_tokens=6, temperature=0.0)
    expected = [greedy_by_full_forward(cfg, params, p, 6) for p in prompts]
    assert batched == expected
    assert batched[0] != batched[1]
    eos = batched[1][2]
    trimmed = generate(cfg, params, prompts, max_new_tokens=6, temperature=0.0, eos_id=eos)
    assert trimmed[1] == batched[1][: batched[1].index(eos)]


def test_sampling_filters_top_k_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    logits_BxV = jnp.broadcast_to(logits, (2000, 5))
    rng = jax.random.key(0)
    greedy = decoding.sample(logits_BxV, rng, 1.0, greedy=True)
    assert bool(jnp.all(greedy == 0))
    top2 = decoding.sample(logits_BxV, rng, 1.0, top_k=2)
    assert set(np.unique(top2).tolist()) == {0, 1}
    nucleus = decoding.sample(logits_BxV, rng, 1.0, top_p=0.85)  # 0.5 + 0.3 < 0.85: three tokens kept
    assert set(np.unique(nucleus).tolist()) == {0, 1, 2}
    free = decoding.sample(logits_BxV, rng, 1.0)
    assert abs(float(jnp.mean(free == 0)) - 0.5) < 0.05 and set(np.unique(free).tolist()) == set(range(5))
    cold = decoding.sample(logits_BxV, rng, 0.1)
    assert float(jnp.mean(cold == 0)) > 0.95


def test_generate_rejects_prompts_past_the_learned_position_table():
    cfg = tiny_cfg(position="learned")
    with pytest.raises(ValueError, match="config.model.max_len"):
        generate(cfg, init(cfg), [[1] * 30], max_new_tokens=5, temperature=0.0)
