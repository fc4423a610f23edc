"""The reward model: the transformer's trunk with a scalar head, read at the last response token."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lmjax.model import Transformer


def last_index(weights_BxL: jnp.ndarray) -> jnp.ndarray:
    """Position of the last weighted target of each row: its input is the response's last token."""
    L = weights_BxL.shape[-1]
    return L - 1 - jnp.argmax(jnp.flip(weights_BxL > 0, axis=-1), axis=-1)


class RewardModel(nn.Module):
    """tokens [B, L] (+ weights marking the response) -> rewards [B]. The trunk's parameters sit
    under `transformer`, named as in the language model, so a pretrained or SFT model loads into it."""

    cfg: Any

    @nn.compact
    def __call__(self, tokens_BxL, weights_BxL=None, positions=None, segment_ids=None, deterministic=True):
        h_BxLxD = Transformer(self.cfg, name="transformer")(
            tokens_BxL, positions, segment_ids, deterministic=deterministic, features=True
        )
        kernel_init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std), ("embed", None))
        head = nn.Dense(1, kernel_init=kernel_init, dtype=jnp.float32, name="reward_head")
        scores_BxL = head(h_BxLxD.astype(jnp.float32))[..., 0]
        if weights_BxL is None:
            return scores_BxL
        last_B = last_index(weights_BxL)
        return jnp.take_along_axis(scores_BxL, last_B[:, None], axis=1)[:, 0]
