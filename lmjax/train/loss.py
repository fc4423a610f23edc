"""Token cross-entropy as sums, so that any split of a batch adds up to the same mean.

A loss returned as a mean cannot be accumulated exactly: two microbatches with different numbers
of real (non-padding) tokens would be weighted equally. Returning (sum of weighted losses, sum of
weights) and dividing once, after all microbatches and all devices are summed, gives the exact
mean over the whole batch. `weights` masks padding, packing gaps, or (for SFT) prompt tokens.
"""

import jax
import jax.numpy as jnp


def cross_entropy_sums(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum_t w_t * -log p(target_t), sum_t w_t, sum_t w_t * log(Z_t)^2), all float32.

    The last is the z-loss term of PaLM: it keeps the softmax normalizer log Z near 0, which
    helps stability in low precision; the caller multiplies it by `config.train.z_loss`.
    The target logit is picked with a one-hot mask rather than a gather: on CPU and TPU the
    multiply-and-reduce fuses with the log-sum-exp, where a gather's gradient is a scatter.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    one_hot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
    target_logit_BxL = jnp.sum(logits_BxLxV * one_hot_BxLxV, axis=-1)
    loss_sum = jnp.sum((log_z_BxL - target_logit_BxL) * weights_BxL)
    z_sum = jnp.sum(jnp.square(log_z_BxL) * weights_BxL)
    return loss_sum, jnp.sum(weights_BxL), z_sum


def safe_mean(total: jax.Array, weight: jax.Array) -> jax.Array:
    """total / weight, and 0 for an all-padding batch instead of NaN."""
    return jnp.where(weight > 0, total / jnp.maximum(weight, 1e-30), 0.0)
