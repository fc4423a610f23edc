"""Speculative decoding keeps the target's output: its greedy tokens exactly, its sampling distribution
in law; a draft equal to the target is always accepted."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from lmjax.infer.speculative import speculative_generate
from lmjax.model import decoding, generate
from test_model import forward, init, tiny_cfg

PROMPTS = [[3, 1, 4, 1, 5], [9], [2, 6, 5]]  # a ragged batch


def perturbed(params, scale, seed):
    """The target's parameters plus noise: a draft that agrees with it often, but not always."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), params)


@pytest.fixture(scope="module")
def target():
    cfg = tiny_cfg(position="rope")
    return cfg, init(cfg)


def test_greedy_speculative_equals_target_greedy_on_a_ragged_batch(target):
    cfg, params = target
    draft_params = perturbed(params, 0.01, seed=0)
    want = generate(cfg, params, PROMPTS, 10, temperature=0)
    got, stats = speculative_generate(cfg, params, cfg, draft_params, PROMPTS, 10, gamma=4, temperature=0)
    assert got == want
    # The draft was both kept and refused, so both branches of the verify pass produced tokens here.
    assert 0 < stats.accepted < stats.tested
    assert stats.target_forwards_per_token < 1.0
    assert stats.emitted >= len(PROMPTS) * 9 and stats.emitted == stats.passes + stats.accepted


def test_greedy_with_a_smaller_draft_model_on_one_row(target):
    """One row: the cache index is rolled back exactly; the draft has its own shape and positions."""
    cfg, params = target
    draft_cfg = tiny_cfg(position="learned", num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1)
    want = generate(cfg, params, PROMPTS[:1], 12, temperature=0)
    got, stats = speculative_generate(
        cfg, params, draft_cfg, init(draft_cfg), PROMPTS[:1], 12, gamma=2, temperature=0
    )
    assert got == want
    assert stats.passes == stats.emitted - stats.accepted


def exact_joint(cfg, params, prompt, n_tokens, top_k):
    """P(t_1 .. t_n | prompt) for every sequence, enumerated with one full forward over all of them."""
    V = cfg.vocab_size
    seqs = np.array(list(itertools.product(range(V), repeat=n_tokens)), np.int32)
    tokens = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits = forward(cfg, params, jnp.asarray(tokens))[:, len(prompt) - 1 : -1]
    logp = jax.nn.log_softmax(decoding.warp_logits(logits.reshape(-1, V), 1.0, top_k), axis=-1)
    logp = np.asarray(logp).reshape(len(seqs), n_tokens, V)
    picked = np.take_along_axis(logp, seqs[:, :, None], axis=-1)[..., 0]
    return np.exp(picked.sum(axis=1)).reshape((V,) * n_tokens)


def chi_square_p(counts, probs):
    """Pearson's test of counts against probs, cells expecting < 5 pooled into one."""
    counts, expected = counts.ravel(), probs.ravel() * counts.sum()
    small = expected < 5
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return scipy_stats.chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue


@pytest.fixture(scope="module")
def vocab8():
    """A target and a flatter draft of one shape over 8 tokens, sampled in 10,000 independent rows of
    one prompt (one compile serves every call)."""
    cfg = tiny_cfg(vocab_size=8, position="rope")
    draft_params = init(cfg)
    target_params = jax.tree_util.tree_map(lambda x: 4.0 * x, draft_params)

    def sample(draft_params, seed):
        out, stats = speculative_generate(
            cfg, target_params, cfg, draft_params, [[1, 5]] * 10_000, 4, gamma=2, temperature=1.0, top_k=6,
            rng=jax.random.key(seed),
        )
        return np.asarray(out), stats

    return cfg, target_params, draft_params, sample


def test_draft_equal_to_target_is_always_accepted(vocab8):
    _, target_params, _, sample = vocab8
    _, stats = sample(target_params, seed=1)
    assert stats.accepted == stats.tested > 0
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_pass == 3.0
    # 3 tokens after the first, 3 per pass: one verify pass per row.
    assert stats.passes == 10_000 and stats.target_forwards_per_token == pytest.approx(2 / 4)


def test_speculative_sampling_has_the_target_distribution(vocab8):
    """The pairs (t2, t3) and the token t4, drawn through the verify passes (kept drafts, resampled
    refusals, free tokens), against the target's exact law (top-k 6 at temperature 1). The same test
    refuses the draft's own law, so it has the power to see a wrong distribution."""
    cfg, target_params, draft_params, sample = vocab8
    out, stats = sample(draft_params, seed=7)
    assert 0.2 < stats.acceptance_rate < 0.9  # refusals and acceptances both common
    target_law = exact_joint(cfg, target_params, [1, 5], 4, top_k=6)
    draft_law = exact_joint(cfg, draft_params, [1, 5], 4, top_k=6)
    pair_counts = np.zeros((8, 8))
    np.add.at(pair_counts, (out[:, 1], out[:, 2]), 1)
    last_counts = np.bincount(out[:, 3], minlength=8)
    assert chi_square_p(pair_counts, target_law.sum(axis=(0, 3))) > 1e-3
    assert chi_square_p(last_counts, target_law.sum(axis=(0, 1, 2))) > 1e-3
    assert chi_square_p(pair_counts, draft_law.sum(axis=(0, 3))) < 1e-9


def test_bad_arguments_are_named(target):
    cfg, params = target
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(cfg, params, cfg, params, PROMPTS, 4, gamma=0)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(cfg, params, tiny_cfg(vocab_size=32), params, PROMPTS, 4)
