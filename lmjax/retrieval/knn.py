"""Exact nearest neighbours in jnp, and the kNN next-token distribution of kNN-LM.

Search: squared L2 distances |q|^2 - 2 q.k + |k|^2 against the datastore one block of keys at a
time (a `lax.scan`, so memory is queries x block, not queries x datastore), keeping a running
top-k. At a datastore of a few million keys an exact search is affordable, and an approximate
index (FAISS) would only add a dependency and an error to account for.

Distribution (Khandelwal et al. 2020): p_knn(v) = sum over neighbours i with token v of
softmax(-d_i / T), d_i the squared L2 distance, T the temperature.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _search(queries_QxD, keys_NxBxD, key_norms_NxB, k: int, block: int):
    q_norms_Q = jnp.sum(queries_QxD * queries_QxD, axis=-1)

    def step(best, blk):
        keys_BxD, norms_B, first = blk
        d_QxB = q_norms_Q[:, None] - 2.0 * queries_QxD @ keys_BxD.T + norms_B[None, :]
        neg_QxK, idx_QxK = jax.lax.top_k(-d_QxB, k)
        merged_neg = jnp.concatenate([best[0], neg_QxK], axis=1)
        merged_idx = jnp.concatenate([best[1], idx_QxK + first], axis=1)
        neg_QxK, pick_QxK = jax.lax.top_k(merged_neg, k)
        return (neg_QxK, jnp.take_along_axis(merged_idx, pick_QxK, axis=1)), None

    Q = queries_QxD.shape[0]
    init = (jnp.full((Q, k), -jnp.inf, jnp.float32), jnp.zeros((Q, k), jnp.int32))
    firsts = jnp.arange(keys_NxBxD.shape[0], dtype=jnp.int32) * block
    (neg_QxK, idx_QxK), _ = jax.lax.scan(step, init, (keys_NxBxD, key_norms_NxB, firsts))
    return jnp.maximum(-neg_QxK, 0.0), idx_QxK


class ExactIndex:
    """The keys of a datastore, padded into blocks on the device, searched exactly."""

    def __init__(self, keys_MxD: np.ndarray, block: int = 8192):
        keys_MxD = np.asarray(keys_MxD, np.float32)
        M, D = keys_MxD.shape
        if M == 0:
            raise ValueError("the datastore is empty")
        self.size, self.block = M, min(block, M)
        num_blocks = -(-M // self.block)
        padded = np.zeros((num_blocks * self.block, D), np.float32)
        padded[:M] = keys_MxD
        norms = np.full(num_blocks * self.block, np.inf, np.float32)  # padding is never a neighbour
        norms[:M] = np.sum(keys_MxD * keys_MxD, axis=-1)
        self.keys_NxBxD = jnp.asarray(padded.reshape(num_blocks, self.block, D))
        self.norms_NxB = jnp.asarray(norms.reshape(num_blocks, self.block))

    def search(self, queries_QxD: np.ndarray, k: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances [Q, k] ascending, datastore indices [Q, k])."""
        if not 1 <= k <= min(self.size, self.block):
            raise ValueError(f"k={k} neighbours asked of a datastore of {self.size} keys")
        queries_QxD = np.asarray(queries_QxD, np.float32)
        distances, indices = [], []
        for first in range(0, len(queries_QxD), batch):
            index = np.minimum(np.arange(first, first + batch), len(queries_QxD) - 1)
            d, i = _search(jnp.asarray(queries_QxD[index]), self.keys_NxBxD, self.norms_NxB, k, self.block)
            keep = min(batch, len(queries_QxD) - first)
            distances.append(np.asarray(d)[:keep])
            indices.append(np.asarray(i)[:keep])
        return np.concatenate(distances), np.concatenate(indices)


def nearest_neighbors(queries_QxD: np.ndarray, keys_MxD: np.ndarray, k: int, *, block: int = 8192,
                      batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest keys of each query: (squared L2 distances [Q, k] ascending, indices [Q, k])."""
    return ExactIndex(keys_MxD, block).search(queries_QxD, k, batch)


def knn_distribution(distances_QxK, tokens_QxK, vocab_size: int, temperature: float) -> jax.Array:
    """p_knn [Q, V]: each neighbour's softmax(-d / T) weight added to its next token."""
    weights_QxK = jax.nn.softmax(-jnp.asarray(distances_QxK, jnp.float32) / temperature, axis=-1)
    rows_QxK = jnp.broadcast_to(jnp.arange(weights_QxK.shape[0])[:, None], weights_QxK.shape)
    return jnp.zeros((weights_QxK.shape[0], vocab_size), jnp.float32).at[rows_QxK, tokens_QxK].add(weights_QxK)


def knn_target_logprob(distances_QxK, tokens_QxK, targets_Q, temperature: float) -> jax.Array:
    """log p_knn(target) [Q] (-inf where no neighbour has the target), without the [Q, V] table."""
    logits_QxK = -jnp.asarray(distances_QxK, jnp.float32) / temperature
    hit_QxK = jnp.asarray(tokens_QxK) == jnp.asarray(targets_Q)[:, None]
    return jax.nn.logsumexp(jnp.where(hit_QxK, logits_QxK, -jnp.inf), axis=-1) - jax.nn.logsumexp(logits_QxK, axis=-1)


def interpolate_logprob(lm_logprob_Q, knn_logprob_Q, lam: float) -> jax.Array:
    """log(lam * p_knn + (1 - lam) * p_lm) of the target, in log space: lam = 0 gives the model's
    own log-probability exactly."""
    lm_logprob_Q, knn_logprob_Q = jnp.asarray(lm_logprob_Q), jnp.asarray(knn_logprob_Q)
    if lam == 0:
        return lm_logprob_Q
    if lam == 1:
        return knn_logprob_Q
    return jnp.logaddexp(jnp.log(lam) + knn_logprob_Q, jnp.log1p(-lam) + lm_logprob_Q)
