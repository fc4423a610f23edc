"""Next tokens for a batch of unrelated requests: each row has its own temperature, top-k, top-p and
random stream, so a request's tokens do not depend on which other requests share the batch.

Row semantics equal `lmjax.model.decoding.sample` with that row's settings (temperature 0 is greedy;
top_k 0 and top_p 1 are off). A row's randomness is `fold_in(fold_in(key(seed), choice), t)` for its
t-th new token: the same request (seed, choice) draws the same numbers alone or in any batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 5  # alternatives reported per token (the OpenAI API's largest `logprobs`)


def row_keys(seed_B: jax.Array, choice_B: jax.Array, step_B: jax.Array) -> jax.Array:
    """One typed PRNG key per row from (seed, choice index, index of the new token)."""

    def key(seed, choice, step):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), choice), step)

    return jax.vmap(key)(seed_B.astype(jnp.uint32), choice_B, step_B)


def filtered_logits(logits_BxV: jax.Array, temperature_B, top_k_B, top_p_B) -> jax.Array:
    """Logits divided by the temperature, with the tokens outside each row's top-k and nucleus at -inf.

    The filters need the vocabulary sorted, a large share of a small model's decode step, so a batch
    where no row asks for top-k or top-p skips the sort (the result is the same: nothing is cut).
    """
    V = logits_BxV.shape[-1]
    scaled_BxV = logits_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    k_B = jnp.where((top_k_B > 0) & (top_k_B < V), top_k_B, V)

    def cut(scaled_BxV):
        sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
        kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
        sorted_BxV = jnp.where(jnp.arange(V)[None, :] < k_B[:, None], sorted_BxV, -jnp.inf)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # The smallest logit still inside the nucleus (the top token is always kept).
        inside_BxV = (mass_before_BxV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
        cutoff_Bx1 = jnp.min(jnp.where(inside_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        cutoff_Bx1 = jnp.maximum(cutoff_Bx1, kth_Bx1)
        return jnp.where(scaled_BxV < cutoff_Bx1, -jnp.inf, scaled_BxV)

    filtering = jnp.any((k_B < V) | (top_p_B < 1.0))
    return jax.lax.cond(filtering, cut, lambda scaled_BxV: scaled_BxV, scaled_BxV)


def sample_rows(logits_BxV, temperature_B, top_k_B, top_p_B, keys_B) -> dict:
    """The next token of every row, with its log-prob and the row's likeliest alternatives.

    Log-probs are the model's own (log-softmax of the raw logits), whatever the sampling settings,
    so that they score text the same way a forward pass does.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    filtered_BxV = filtered_logits(logits_BxV, temperature_B, top_k_B, top_p_B)
    drawn_B = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys_B, filtered_BxV)
    token_B = jnp.where(temperature_B > 0, drawn_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    top_logprobs_BxT, top_ids_BxT = jax.lax.top_k(logprobs_BxV, min(TOP_LOGPROBS, logits_BxV.shape[-1]))
    return {
        "token": token_B,
        "logprob": jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0],
        "top_ids": top_ids_BxT.astype(jnp.int32),
        "top_logprobs": top_logprobs_BxT,
    }
