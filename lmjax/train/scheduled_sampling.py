"""Scheduled sampling for transformers: train on inputs where some gold tokens are the model's own guesses.

A model trained only on gold prefixes (teacher forcing) never sees its own mistakes, but generates
from them ("exposure bias"). Scheduled sampling (Bengio et al. 2015) replaces each gold input token,
with a probability that grows over training, by the model's prediction of it. A transformer reads
all positions at once, so the predictions come from a first forward pass over the gold inputs,
without gradients, and the loss from a second pass over the mixed inputs (Mihaylova & Martins
2019). The targets stay gold.

`config.train.scheduled_sampling` names the schedule of the replacement probability at step i,
capped at `train.scheduled_sampling_max` (k = `train.scheduled_sampling_k`; Bengio et al.'s
teacher-forcing probability is 1 minus this):
  none             off: the train step is the teacher-forcing step, unchanged (costs nothing)
  constant         the cap from the first step
  linear           i / k (k: the steps to reach 1)
  exponential      1 - k^i (k < 1)
  inverse_sigmoid  1 - k / (k + exp(i / k)) (k >= 1)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

SCHEDULES = ("none", "constant", "linear", "exponential", "inverse_sigmoid")


def replace_probability(train_cfg: Any, step: jax.Array) -> jax.Array:
    """The probability (float32 scalar) that a gold input token is replaced at `step`."""
    name, k = train_cfg.scheduled_sampling, float(train_cfg.scheduled_sampling_k)
    i = jnp.asarray(step, jnp.float32)
    if name == "constant":
        p = jnp.float32(1.0)
    elif name == "linear":
        p = i / k
    elif name == "exponential":
        p = 1.0 - jnp.power(k, i)
    elif name == "inverse_sigmoid":
        p = 1.0 - k / (k + jnp.exp(i / k))
    else:
        raise ValueError(f"config.train.scheduled_sampling={name!r} has no probability; choose one of {SCHEDULES}")
    return jnp.clip(p, 0.0, float(train_cfg.scheduled_sampling_max))


def mix_inputs(inputs_BxL: jax.Array, predictions_BxL: jax.Array, weights_BxL: jax.Array,
               probability: jax.Array, key: jax.Array) -> jax.Array:
    """`inputs_BxL` with input t (t >= 1) replaced, with `probability`, by predictions_BxL[t - 1] (the
    model's guess of it); only where input t is a weighted target of position t - 1, so padding
    and document boundaries keep their gold tokens."""
    guess_BxL = jnp.pad(predictions_BxL[:, :-1], ((0, 0), (1, 0)))
    predicted_BxL = jnp.pad(weights_BxL[:, :-1] > 0, ((0, 0), (1, 0)))
    replace_BxL = predicted_BxL & (jax.random.uniform(key, inputs_BxL.shape) < probability)
    return jnp.where(replace_BxL, guess_BxL.astype(inputs_BxL.dtype), inputs_BxL)
