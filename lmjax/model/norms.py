"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype.

Why our own: the statistics of a bfloat16 residual stream lose precision, so we upcast, and we
want the scale parameter to carry the logical axis name `norm`.
"""

import flax.linen as nn
import jax.numpy as jnp

from lmjax.model import manual_vjp

NORMS = ("layernorm", "rmsnorm")


def _norm_init(init):
    return nn.with_logical_partitioning(init, ("norm",))


class LayerNorm(nn.Module):
    """(x - mean) / std * scale (+ bias), over the last axis."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    manual_vjp: bool = False  # the hand-written backward of lmjax.model.manual_vjp

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", _norm_init(nn.initializers.ones), (dim,), self.param_dtype)
        if self.manual_vjp:
            y = manual_vjp.layer_norm(x32, scale.astype(jnp.float32), self.eps)
        else:
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
            y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", _norm_init(nn.initializers.zeros), (dim,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, over the last axis (no centering, no bias)."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    manual_vjp: bool = False  # the hand-written backward of lmjax.model.manual_vjp

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", _norm_init(nn.initializers.ones), (dim,), self.param_dtype)
        if self.manual_vjp:
            return manual_vjp.rms_norm(x32, scale.astype(jnp.float32), self.eps).astype(self.dtype)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps))
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg, name: str | None = None) -> nn.Module:
    """The norm selected by `config.model.norm` (layernorm | rmsnorm)."""
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    manual = manual_vjp.enabled(cfg)
    if cfg.norm == "layernorm":
        return LayerNorm(cfg.norm_eps, cfg.use_bias, dtype, param_dtype, manual, name=name)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.norm_eps, dtype, param_dtype, manual, name=name)
    raise ValueError(f"config.model.norm={cfg.norm!r}: expected one of {NORMS}")
