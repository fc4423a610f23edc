"""The decoder-only transformer: embeddings, N pre-norm blocks (optionally remat'd and scanned),
final norm, LM head. Every architecture choice comes from `config.model`."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model import moe as moe_lib
from lmjax.model import positions as pos_lib
from lmjax.model.attention import Attention, cache_write
from lmjax.model.matmul import dot_general_for
from lmjax.model.mlp import Mlp
from lmjax.model.norms import make_norm

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    # Save the weight matmuls' outputs; recompute attention scores and elementwise ops.
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)
# Logit of a padding id: far below any real logit, so its probability is exactly 0, yet finite, so
# that the loss's one-hot product (0 * logit) stays 0 and dividing by a temperature cannot overflow.
PADDING_LOGIT = -1e9


def padded_vocab_size(cfg) -> int:
    """Rows of the embedding and LM head: model.vocab_size rounded up to model.vocab_multiple.

    A mesh splits the vocabulary dimension over an axis, and TPUs lay it out in 128-wide lanes:
    GPT-2's 50,257 ids divide neither, 50,304 divides both. The ids past vocab_size are never
    inputs or targets, and their logits are PADDING_LOGIT, so no loss or sample ever sees them.
    """
    multiple = int(cfg.get("vocab_multiple", None) or 1)
    return -(-int(cfg.vocab_size) // multiple) * multiple


def _cpu_fusion_boundary(g: jax.Array) -> jax.Array:
    """`g`, computed once: a conditional is a fusion boundary XLA's CPU compiler keeps (it expands
    `optimization_barrier` before fusing). The branches differ in form only, so JAX keeps both."""
    return jax.lax.cond(jnp.isfinite(g.reshape(-1)[0]), lambda g: g, lambda g: -(-g), g)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
    """The identity, whose cotangent is materialized on CPU.

    The residual stream's cotangent is elementwise in the one of the block above, and XLA's CPU
    fusion duplicates such producers into every consumer, so without a boundary each block's
    backward recomputes the elementwise work of every block above it (time quadratic in depth).
    Only the CPU backend gets the boundary: elsewhere this is the plain identity, and the GPU and
    TPU compilers fuse as they see fit.
    """
    return x


materialize_cotangent.defvjp(
    lambda x: (x, None),
    lambda _, g: (jax.lax.platform_dependent(g, cpu=_cpu_fusion_boundary, default=lambda g: g),),
)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, cache)."""

    cfg: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray, ctx: dict, cache: dict | None = None):
        cfg = self.cfg
        x_BxLxD = materialize_cotangent(x_BxLxD)
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attention = Attention(cfg, self.deterministic, name="attn")
        h_BxLxD, cache = attention(make_norm(cfg, "attn_norm")(x_BxLxD), ctx, cache)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD + drop(h_BxLxD), ("batch", "length", "embed"))
        mlp = moe_lib.MoeMlp(cfg, name="moe") if moe_lib.enabled(cfg) else Mlp(cfg, name="mlp")
        h_BxLxD = mlp(make_norm(cfg, "mlp_norm")(x_BxLxD))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD + drop(h_BxLxD), ("batch", "length", "embed"))
        return x_BxLxD, cache


def attention_context(positions_BxL, segment_ids_BxL, cache):
    """Positions, mask and cache bookkeeping shared by every layer; also the updated cache header.

    The causal mask is over array slots (not positions), so packed documents whose positions
    restart at 0 stay causal; segment_ids keep them from seeing each other. With a cache, this
    call's tokens occupy slots index..index+L-1 (index: shared, or one per row) and slots holding
    segment 0 (left padding, unused) are never attended by real tokens.
    """
    B, L = positions_BxL.shape
    if cache is None:
        mask = None
        if segment_ids_BxL is not None:
            causal_LxL = jnp.tril(jnp.ones((L, L), bool))
            mask = (causal_LxL[None] & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]))[:, None]
        ctx = {"q_positions": positions_BxL, "k_positions": positions_BxL, "mask": mask, "cache_index": None}
        return ctx, None
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((B, L), jnp.int32)
    index = cache["index"]  # shared, or [B] per row
    k_positions_BxS = cache_write(cache["positions"], positions_BxL, index)
    k_segments_BxS = cache_write(cache["segment_ids"], segment_ids_BxL, index)
    S = k_positions_BxS.shape[1]
    query_slots_BxL = jnp.reshape(index, (-1, 1)) + jnp.arange(L)
    causal_BxLxS = jnp.arange(S)[None, None, :] <= query_slots_BxL[:, :, None]
    mask = (causal_BxLxS & (segment_ids_BxL[:, :, None] == k_segments_BxS[:, None, :]))[:, None]
    ctx = {"q_positions": positions_BxL, "k_positions": k_positions_BxS, "mask": mask, "cache_index": index}
    header = {"index": index + L, "positions": k_positions_BxS, "segment_ids": k_segments_BxS}
    return ctx, header


class Transformer(nn.Module):
    """tokens [B, L] (+ positions, segment_ids) -> float32 logits [B, L, V].

    With `cache` (see decoding.init_cache) returns (logits, updated cache): the KV-cache path.
    With `features=True` returns the final-norm hidden states [B, L, D] instead of logits (and
    creates no LM head), for models that put another head on the trunk (a reward model).
    """

    cfg: Any

    @nn.compact
    def __call__(
        self,
        tokens_BxL: jnp.ndarray,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
        cache: dict | None = None,
        features: bool = False,
    ):
        cfg = self.cfg
        if cfg.vocab_size is None:
            raise ValueError(
                "config.model.vocab_size is None: set it, or let the trainer fill it from the tokenizer"
            )
        if cfg.position not in pos_lib.POSITION_TYPES:
            expected = pos_lib.POSITION_TYPES
            raise ValueError(f"config.model.position={cfg.position!r}: expected one of {expected}")
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, L = tokens_BxL.shape
        V, D = padded_vocab_size(cfg), cfg.embed_dim
        positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions is None else positions

        def init(names):
            return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)

        embedding_VxD = self.param("embedding", init(("vocab", "embed")), (V, D), param_dtype)
        x_BxLxD = jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(dtype)
        if cfg.position == "learned":
            table = self.param("pos_embedding", init((None, "embed")), (cfg.max_len, D), param_dtype)
            x_BxLxD += jnp.take(table, positions_BxL, axis=0).astype(dtype)
        elif cfg.position == "sinusoidal":
            x_BxLxD += pos_lib.sinusoidal(positions_BxL, D).astype(dtype)
        x_BxLxD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

        ctx, header = attention_context(positions_BxL, segment_ids, cache)
        layer_caches = None if cache is None else cache["layers"]
        block = Block
        if cfg.remat != "none":
            if cfg.remat not in REMAT_POLICIES:
                raise ValueError(f"config.model.remat={cfg.remat!r}: expected one of {REMAT_CHOICES}")
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0, moe_lib.COLLECTION: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, name="blocks")
            x_BxLxD, layer_caches = blocks(x_BxLxD, ctx, layer_caches)
        else:
            new_caches = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else layer_caches[i]
                x_BxLxD, layer_cache = block(cfg, deterministic, name=f"block_{i}")(x_BxLxD, ctx, layer_cache)
                new_caches.append(layer_cache)
            layer_caches = tuple(new_caches)
        x_BxLxD = make_norm(cfg, "final_norm")(x_BxLxD)
        if features:
            return x_BxLxD

        if cfg.tie_embeddings:
            head_DxV = embedding_VxD.T
        else:
            head_DxV = self.param("head", init(("embed", "vocab")), (D, V), param_dtype)
        # promote_dtype, not astype, lets a quantized head through; its einsum (qwix) returns the
        # compute dtype whatever preferred_element_type says, hence the final cast.
        x_BxLxD, head_DxV = nn.dtypes.promote_dtype(x_BxLxD, head_DxV, dtype=dtype)
        if jnp.dtype(dtype) == jnp.float32 and V >= D:
            # The dense layers' matmul: on CPU the head's weight gradient then transposes the
            # [B, L, D] input, not the larger [B, L, V] logits gradient (a small vocabulary keeps
            # the einsum, whose gradient transposes the logits' instead).
            logits_BxLxV = dot_general_for(cfg)(x_BxLxD, head_DxV, (((2,), (0,)), ((), ())))
        else:
            logits_BxLxV = jnp.einsum(
                "bld,dv->blv", x_BxLxD, head_DxV, preferred_element_type=jnp.float32
            ).astype(jnp.float32)
        if V > cfg.vocab_size:
            logits_BxLxV = jnp.where(jnp.arange(V) < cfg.vocab_size, logits_BxLxV, PADDING_LOGIT)
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))
        if cache is None:
            return logits_BxLxV
        return logits_BxLxV, {**header, "layers": layer_caches}
