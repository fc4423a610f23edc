"""One forward pass that gives what every retrieval mode needs: the log-probability of each target
token and the final hidden state (the final norm's output, the LM head's input: kNN-LM's key).

The hidden state is read with Flax's `capture_intermediates` on the `final_norm` module, so the
model is unchanged and the logits are those of the plain forward. Rows go through in batches of a
fixed size (the last one padded), so a whole evaluation compiles one program per row length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _is_final_norm(module: nn.Module, method_name: str) -> bool:
    return module.name == "final_norm" and method_name == "__call__"


def make_score_fn(model: nn.Module, params: Any, features_last: int) -> Callable:
    """(inputs_BxL, targets_BxL) -> (target log-prob [B, L], hidden states of the last
    `features_last` positions [B, features_last, D]), both float32."""

    @jax.jit
    def score(params, inputs_BxL, targets_BxL):
        logits_BxLxV, state = model.apply({"params": params}, inputs_BxL, capture_intermediates=_is_final_norm,
                                          mutable=["intermediates"])
        log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
        target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        (features_BxLxD,) = state["intermediates"]["final_norm"]["__call__"]
        features_BxFxD = features_BxLxD[:, features_BxLxD.shape[1] - features_last :]
        return target_logit_BxL - log_z_BxL, features_BxFxD.astype(jnp.float32)

    return functools.partial(score, params)  # params an argument, not constants baked into the program


def score_rows(score_fn: Callable, inputs: np.ndarray, targets: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`score_fn` over all rows, `batch_size` at a time: (target log-probs [R, L], features [R, F, D])."""
    rows = len(inputs)
    logprobs, features = [], []
    for first in range(0, rows, batch_size):
        index = np.minimum(np.arange(first, first + batch_size), rows - 1)  # pad by repeating the last row
        lp, f = score_fn(jnp.asarray(inputs[index]), jnp.asarray(targets[index]))
        keep = min(batch_size, rows - first)
        logprobs.append(np.asarray(lp, np.float32)[:keep])
        features.append(np.asarray(f, np.float32)[:keep])
    return np.concatenate(logprobs), np.concatenate(features)
