"""Early exits: the model's own final norm and LM head read the residual stream after chosen layers.

An exit after layer l (1 <= l < N) costs no parameters: it is the final norm and head applied to the
output of block l-1. Untrained, those hidden states are not in the space the head reads, so exits
are trained by a weighted sum of every exit's cross-entropy (LayerSkip, Elhoushi et al. 2024): the
weight of an exit grows with its depth as the triangular number l(l+1)/2, times
`train.early_exit_scale`; the last layer weighs N + scale * N(N-1)/2; the weights are normalized to
sum to 1. Scale 0 is the plain loss. (LayerSkip's curriculum and layer dropout are not used.)

Configured by `train.early_exit_layers` (empty: off, the default loss path untouched). Decoding
with exits is lmjax.infer.early_exit.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.norms import make_norm
from lmjax.model.transformer import Block


def check_exits(cfg: Any, exits: Sequence[int]) -> tuple[int, ...]:
    """The exits as a sorted tuple, or a ValueError naming the key: each l must be 1 <= l < num_layers."""
    exits = tuple(int(l) for l in exits)
    bad = [l for l in exits if not 1 <= l < int(cfg.num_layers)]
    if bad or len(set(exits)) != len(exits):
        raise ValueError(f"early exit layers {exits}: each must be a distinct layer count in "
                         f"[1, config.model.num_layers - 1 = {int(cfg.num_layers) - 1}]")
    if exits and cfg.scan_layers:
        raise ValueError("early exits read each block's output: set config.model.scan_layers=False")
    return tuple(sorted(exits))


def exit_weights(num_layers: int, exits: Sequence[int], scale: float) -> dict[int, float]:
    """{layers run: loss weight} for each exit and the last layer (key num_layers), summing to 1."""
    raw = {l: scale * l * (l + 1) / 2 for l in exits}
    raw[num_layers] = num_layers + scale * num_layers * (num_layers - 1) / 2
    total = sum(raw.values())
    return {l: w / total for l, w in raw.items()}


def head_logits(cfg: Any, params: Any, x_BxLxD: jax.Array) -> jax.Array:
    """float32 logits of hidden states through the shared final norm and LM head (as Transformer does)."""
    x_BxLxD = make_norm(cfg).apply({"params": params["final_norm"]}, x_BxLxD)
    head_DxV = params["embedding"].T if cfg.tie_embeddings else params["head"]
    x_BxLxD, head_DxV = nn.dtypes.promote_dtype(x_BxLxD, head_DxV, dtype=jnp.dtype(cfg.dtype))
    return jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV, preferred_element_type=jnp.float32).astype(jnp.float32)


def exit_logits(model: nn.Module, params: Any, tokens_BxL: jax.Array, exits: Sequence[int], **kwargs: Any
                ) -> dict[int, jax.Array]:
    """{layers run: logits [B, L, V]} for each exit and the full model (key num_layers), in one forward.

    The blocks' outputs are captured from the model's own forward (`capture_intermediates`), so
    dropout, remat and sharding are exactly the training forward's."""
    def is_block(module: nn.Module, method: str) -> bool:
        return isinstance(module, Block) and method == "__call__"

    logits_BxLxV, state = model.apply({"params": params}, tokens_BxL, capture_intermediates=is_block,
                                      mutable=["intermediates"], **kwargs)
    blocks = state["intermediates"]
    result = {l: head_logits(model.cfg, params, blocks[f"block_{l - 1}"]["__call__"][0][0]) for l in exits}
    result[int(model.cfg.num_layers)] = logits_BxLxV
    return result
