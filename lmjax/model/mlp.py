"""The position-wise feed-forward block: gelu, gelu_tanh (GPT-2), relu, or swiglu (Llama)."""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lmjax.model import manual_vjp
from lmjax.model.matmul import dot_general_for

ACTIVATIONS = {
    "gelu": manual_vjp.gelu_erf,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}
MLP_TYPES = (*ACTIVATIONS, "swiglu")


def mlp_dim(cfg) -> int:
    """F: config.model.mlp_dim, or int(mlp_ratio * embed_dim) when unset."""
    return cfg.mlp_dim if cfg.mlp_dim is not None else int(cfg.mlp_ratio * cfg.embed_dim)


class Mlp(nn.Module):
    """x -> act(x W_in) W_out, or for swiglu (silu(x W_gate) * x W_up) W_out."""

    cfg: Any
    hidden_dim: int | None = None  # F; None: mlp_dim(cfg) (MoE shared experts set their own)

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        F, D = self.hidden_dim or mlp_dim(cfg), cfg.embed_dim

        def dense(name, features, names, std):
            return nn.Dense(
                features,
                use_bias=cfg.use_bias,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
                dot_general=dot_general_for(cfg),
                name=name,
            )

        if cfg.mlp == "swiglu":
            gate_BxLxF = dense("gate", F, ("embed", "mlp"), cfg.init_std)(x_BxLxD)
            up_BxLxF = dense("up", F, ("embed", "mlp"), cfg.init_std)(x_BxLxD)
            h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
        elif cfg.mlp in ACTIVATIONS:
            manual = manual_vjp.enabled(cfg) and cfg.mlp in manual_vjp.ACTIVATIONS
            activation = (manual_vjp.ACTIVATIONS if manual else ACTIVATIONS)[cfg.mlp]
            h_BxLxF = activation(dense("up", F, ("embed", "mlp"), cfg.init_std)(x_BxLxD))
        else:
            raise ValueError(f"config.model.mlp={cfg.mlp!r}: expected one of {MLP_TYPES}")
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        # Residual projection scaled by 1/sqrt(2N) as in GPT-2.
        return dense("down", D, ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.num_layers))(h_BxLxF)
