"""Causal self-attention with grouped KV heads (MHA, GQA, MQA), RoPE/ALiBi, QK-norm, KV cache.

Two interchangeable paths chosen by `config.model.attention`:
  einsum       the readable reference below;
  dot_product  `jax.nn.dot_product_attention` with its default implementation (XLA in jax 0.10.2);
  cudnn        the same call with implementation="cudnn": fused flash attention on NVIDIA GPUs
               (bfloat16/float16 compute only; JAX raises if cuDNN cannot serve the shape).
The fused paths have no attention-weight dropout, so while dropout is active (training with
dropout > 0) the einsum path is used instead.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model import manual_vjp
from lmjax.model import positions as pos_lib
from lmjax.model.matmul import dot_general_for
from lmjax.model.norms import RMSNorm

IMPLEMENTATIONS = ("einsum", "dot_product", "cudnn")


def head_dim(cfg) -> int:
    """E: config.model.head_dim, or embed_dim // num_heads when unset."""
    return cfg.head_dim if cfg.head_dim is not None else cfg.embed_dim // cfg.num_heads


def check_heads(cfg) -> None:
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"config.model.num_heads={cfg.num_heads} must be a multiple of num_kv_heads={cfg.num_kv_heads}"
        )


class Projection(nn.Module):
    """x @ W (+ b), contracting x's trailing `in_shape` axes into `out_shape`.

    Ours rather than nn.DenseGeneral because that one initializes its kernel flat and then reshapes,
    so a logical sharding of the [D, H, E] kernel cannot be applied at (sharded) init.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str | None, ...]  # logical names of the kernel axes, in then out
    std: float
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    dot_general: Any = jax.lax.dot_general

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.names)
        kernel = self.param("kernel", init, self.in_shape + self.out_shape, self.param_dtype)
        n = len(self.in_shape)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        # promote_dtype rather than astype: a quantized kernel (qwix) passes through it unchanged.
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = self.dot_general(x, kernel, (contract, ((), ())))
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.names[n:])
            y = y + self.param("bias", bias_init, self.out_shape, self.param_dtype).astype(self.dtype)
        return y


def cache_axes(cfg) -> str:
    """The axis order of the cached keys and values: [B, K, S, E] ("bkse") for the einsum path, whose
    batched dots read each kv head's slots as one matrix (from a [B, S, K, E] cache they would copy the
    whole cache into that order at every decode step); [B, S, K, E] ("bske") for the fused paths,
    whose API takes that order."""
    return "bkse" if cfg.attention == "einsum" else "bske"


def cache_write(cache_BxSx: jnp.ndarray, new_BxLx: jnp.ndarray, index, axis: int = 1) -> jnp.ndarray:
    """Writes `new` into the cache at slot `index` of the slot `axis`: a scalar shared by the batch, or
    [B], one per row (a server's slots each hold a request of its own length). In place when the
    cache is donated."""
    new_BxLx = new_BxLx.astype(cache_BxSx.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache_BxSx, new_BxLx, index, axis)

    def write_row(row_Sx, new_Lx, start):
        return jax.lax.dynamic_update_slice_in_dim(row_Sx, new_Lx, start, axis - 1)

    return jax.vmap(write_row)(cache_BxSx, new_BxLx, index)


def einsum_attention(
    q_BxLxHxE: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask_Bx1xLxS: jnp.ndarray,
    bias_BxHxLxS: jnp.ndarray | None,
    dropout: nn.Module | None = None,
    kv_axes: str = "bske",
    manual_backward: bool = False,
) -> jnp.ndarray:
    """softmax(q k^T / sqrt(E) + bias, masked) v, each group of G query heads sharing one kv head.

    Keys and values are [B, S, K, E] (this call's own) or in the order `kv_axes` names (a cache's,
    see `cache_axes`). The logits and softmax are float32 whatever the compute dtype: in bfloat16
    the exponentials of long rows lose the small probabilities and the max-subtraction is too coarse.
    `manual_backward`: differentiate through `manual_vjp.softmax_attention` (no bias or dropout).

    The query heads are split into [K, G] only where both are above one (GQA): a size-1 axis in the
    logits sends XLA's CPU backend down a slow path for the softmax gradient's row sum (~10x that
    of the same sum without it), so MHA keeps its heads axis as it is and MQA drops the kv axis.
    Below, q is [B, L, (K), (G), E] and the logits [B, (K), (G), L, S], each axis in parentheses
    present only when above one.
    """
    B, L, H, E = q_BxLxHxE.shape
    K = k.shape[kv_axes.index("k")]
    G = H // K
    if K == 1:  # MQA: the one kv head's axis goes
        k, v = (x.squeeze(kv_axes.index("k")) for x in (k, v))
        kv_axes = kv_axes.replace("k", "")
    q_axes, logit_axes = "blkge", "bkgls"
    if G == 1:  # MHA: each kv head is its query head
        q_axes, logit_axes = q_axes.replace("g", ""), logit_axes.replace("g", "")
    if K == 1:
        q_axes, logit_axes = q_axes.replace("k", ""), logit_axes.replace("k", "")
    head_shape = tuple(n for n in (K, G) if n > 1)
    q = q_BxLxHxE.reshape(B, L, *head_shape, E)
    mask = mask_Bx1xLxS.reshape(mask_Bx1xLxS.shape[0], *(1 for _ in head_shape), *mask_Bx1xLxS.shape[2:])
    if manual_backward and bias_BxHxLxS is None and dropout is None:  # the forward below, another backward
        return manual_vjp.softmax_attention(q, k, v, mask, (q_axes, kv_axes, logit_axes)).reshape(B, L, H, E)
    logits = jnp.einsum(f"{q_axes},{kv_axes}->{logit_axes}", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.float32(math.sqrt(E))
    if bias_BxHxLxS is not None:
        logits += bias_BxHxLxS.reshape(B, *head_shape, L, -1)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum(f"{logit_axes},{kv_axes}->{q_axes}", probs.astype(v.dtype), v)
    return out.reshape(B, L, H, E)


class Attention(nn.Module):
    """Multi-head causal self-attention. Returns (out_BxLxD, updated cache or None).

    `ctx` holds what every layer shares: q_positions_BxL, k_positions_BxS, mask_Bx1xLxS (None:
    plain causal over this call's tokens) and cache_index (None without a KV cache: the slot where
    this call's keys/values are written, shared or [B] per row).
    """

    cfg: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray, ctx: dict, cache: dict | None = None):
        cfg = self.cfg
        check_heads(cfg)
        H, K, E, D = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg), cfg.embed_dim
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def proj(name, heads, head_axis):
            names = ("embed", head_axis, "head_dim")
            projection = Projection(
                (D,), (heads, E), names, cfg.init_std, cfg.use_bias, dtype, param_dtype, dot_general_for(cfg),
                name=name,
            )
            return projection(x_BxLxD)

        q_BxLxHxE = proj("query", H, "heads")
        k_BxLxKxE = proj("key", K, "kv_heads")
        v_BxLxKxE = proj("value", K, "kv_heads")
        if cfg.qk_norm:
            q_BxLxHxE = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="query_norm")(q_BxLxHxE)
            k_BxLxKxE = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="key_norm")(k_BxLxKxE)
        if cfg.position == "rope":
            inv_freq = pos_lib.rope_inv_freq(E, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor)
            q_BxLxHxE = pos_lib.apply_rope(q_BxLxHxE, ctx["q_positions"], inv_freq)
            k_BxLxKxE = pos_lib.apply_rope(k_BxLxKxE, ctx["q_positions"], inv_freq)
        q_BxLxHxE = nn.with_logical_constraint(q_BxLxHxE, ("batch", "length", "heads", "head_dim"))

        new_cache, kv_axes, k, v = None, "bske", k_BxLxKxE, v_BxLxKxE
        if cache is not None:
            kv_axes = cache_axes(cfg)
            slot_axis = kv_axes.index("s")
            order = tuple("bske".index(axis) for axis in kv_axes)
            k = cache_write(cache["k"], k_BxLxKxE.transpose(order), ctx["cache_index"], slot_axis)
            v = cache_write(cache["v"], v_BxLxKxE.transpose(order), ctx["cache_index"], slot_axis)
            new_cache = {"k": k, "v": v}
            # A caller may pass the positions of only a prefix of the cache: attend over that prefix.
            S = ctx["k_positions"].shape[1]
            k, v = (jax.lax.slice_in_dim(x, 0, S, axis=slot_axis) for x in (k, v))
        names = {"b": "batch", "s": "length", "k": "kv_heads", "e": "head_dim"}
        k, v = (nn.with_logical_constraint(x, tuple(names[axis] for axis in kv_axes)) for x in (k, v))

        bias_BxHxLxS = None
        if cfg.position == "alibi":
            bias_BxHxLxS = pos_lib.alibi_bias(ctx["q_positions"], ctx["k_positions"], H)
        mask_Bx1xLxS = ctx["mask"]
        attn_dropout = cfg.dropout > 0 and not self.deterministic
        if cfg.attention in ("dot_product", "cudnn") and not attn_dropout:
            out_BxLxHxE = jax.nn.dot_product_attention(
                q_BxLxHxE,
                k.astype(q_BxLxHxE.dtype),  # [B, S, K, E]: these paths' cache_axes
                v.astype(q_BxLxHxE.dtype),
                bias=bias_BxHxLxS,
                mask=mask_Bx1xLxS,
                is_causal=mask_Bx1xLxS is None,
                implementation="cudnn" if cfg.attention == "cudnn" else None,
            )
        elif cfg.attention in ("einsum", "dot_product", "cudnn"):
            if mask_Bx1xLxS is None:
                L = x_BxLxD.shape[1]
                mask_Bx1xLxS = jnp.tril(jnp.ones((L, L), bool))[None, None]
            dropout = nn.Dropout(cfg.dropout, deterministic=False) if attn_dropout else None
            manual = manual_vjp.enabled(cfg) and cache is None
            out_BxLxHxE = einsum_attention(q_BxLxHxE, k, v, mask_Bx1xLxS, bias_BxHxLxS, dropout, kv_axes, manual)
        else:
            raise ValueError(f"config.model.attention={cfg.attention!r}: expected one of {IMPLEMENTATIONS}")
        out_BxLxHxE = nn.with_logical_constraint(out_BxLxHxE, ("batch", "length", "heads", "head_dim"))

        # GPT-2: residual projections scaled by 1/sqrt(2N) so the stream's variance stays O(1).
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        names = ("heads", "head_dim", "embed")
        out = Projection(
            (H, E), (D,), names, out_std, cfg.use_bias, dtype, param_dtype, dot_general_for(cfg), name="out"
        )
        out_BxLxD = out(out_BxLxHxE)
        return out_BxLxD, new_cache
