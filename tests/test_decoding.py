"""KV-cache decoding equals the full forward pass; ragged batches; sampling filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from lmjax.model import decoding, generate
from test_model import POSITIONS, forward, init, random_tokens, tiny_cfg


@functools.partial(jax.jit, static_argnums=0)
def _prefill(frozen_cfg, params, cache, tokens, positions, segment_ids):
    return decoding.prefill(frozen_cfg, params, cache, tokens, positions, segment_ids)


def cached_logits(cfg, params, tokens, positions, segment_ids, prefill_len, cache_len=16):
    """Prefill the first `prefill_len` columns (in two chunks), then decode the rest one at a time."""
    B, T = tokens.shape
    cache = decoding.init_cache(cfg, B, cache_len)
    split = prefill_len // 2
    out = []
    for lo, hi in ((0, split), (split, prefill_len)):
        logits, cache = _prefill(
            FrozenConfigDict(cfg), params, cache, tokens[:, lo:hi], positions[:, lo:hi], segment_ids[:, lo:hi]
        )
        out.append(logits)
    for t in range(prefill_len, T):
        logits, cache = _prefill(
            FrozenConfigDict(cfg), params, cache, tokens[:, t:t + 1], positions[:, t:t + 1], segment_ids[:, t:t + 1]
        )
        out.append(logits)
    assert int(cache["index"]) == T
    return jnp.concatenate(out, axis=1)


def check_cached_matches_full(cfg, prefill_len=5, total=9):
    params = init(cfg)
    tokens = random_tokens(11, (2, total))
    positions = jnp.broadcast_to(jnp.arange(total), (2, total))
    ones = jnp.ones((2, total), jnp.int32)
    np.testing.assert_allclose(
        cached_logits(cfg, params, tokens, positions, ones, prefill_len),
        forward(cfg, params, tokens),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_decode_matches_full_forward_for_every_position_type(position):
    check_cached_matches_full(tiny_cfg(position=position))  # GQA: 4 query heads, 2 kv heads


@pytest.mark.parametrize(
    "overrides",
    [
        dict(position="rope", num_kv_heads=1, scan_layers=True, attention="dot_product"),
        dict(position="alibi", num_kv_heads=4, qk_norm=True, norm="rmsnorm", mlp="swiglu", use_bias=False),
    ],
)
def test_cached_decode_matches_full_forward_mqa_mha_scan_dot_product(overrides):
    check_cached_matches_full(tiny_cfg(**overrides))


def left_pad(rows):
    P = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), P), np.int32)
    positions = np.zeros((len(rows), P), np.int32)
    segment_ids = np.zeros((len(rows), P), np.int32)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = r
        positions[i, P - len(r):] = np.arange(len(r))
        segment_ids[i, P - len(r):] = 1
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_ragged_batch_left_padded_decode_matches_each_prompt_alone(position):
    cfg = tiny_cfg(position=position)
    params = init(cfg)
    lengths, steps = (3, 7, 5), 3
    rows = [np.asarray(random_tokens(20 + i, (n + steps,)))[:] for i, n in enumerate(lengths)]
    prompts = [r[:n] for r, n in zip(rows, lengths)]
    tokens, positions, segment_ids = left_pad(prompts)
    P = tokens.shape[1]
    cont = jnp.asarray(np.stack([r[n:] for r, n in zip(rows, lengths)]))
    cont_positions = jnp.asarray(np.array(lengths)[:, None] + np.arange(steps))
    all_tokens = jnp.concatenate([tokens, cont], axis=1)
    all_positions = jnp.concatenate([positions, cont_positions], axis=1)
    all_segments = jnp.concatenate([segment_ids, jnp.ones((3, steps), jnp.int32)], axis=1)
    logits = cached_logits(cfg, params, all_tokens, all_positions, all_segments, P, cache_len=P + steps)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        alone = forward(cfg, params, jnp.asarray(row)[None])[0]
        np.testing.assert_allclose(logits[i, P - n:], alone, atol=1e-5, rtol=1e-5)


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
