"""Weight-only post-training quantization of the transformer's matmul weights, through qwix.

Decoding reads every weight once per generated token, so memory traffic bounds a large model's decode
step: int8 weights are a quarter of float32's bytes, int4 an eighth. Activations stay in the compute
dtype.

  int8  one float32 scale per output channel (symmetric absmax)
  int4  one scale per output channel and per group of `group` consecutive input features (the
        innermost contraction axis): 4 bits are too coarse for one scale per whole row. The
        attention output projection contracts two axes (heads x head_dim) and qwix groups only one,
        so it keeps one scale per output channel.

What is quantized: the q/k/v/out projections, the MLP, and an untied LM head. The token embedding
is a table lookup, not a matmul, so a tied embedding (and head) stays in float.
"""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmjax.model.mlp import mlp_dim
from lmjax.model.transformer import Transformer

MODES = ("none", "int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_GROUP = 32


def _qwix():
    try:
        import qwix
    except ImportError as e:
        raise ImportError("weight quantization needs qwix: pip install -e '.[quant]'") from e
    return qwix


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {MODES}")


def rules(cfg, mode: str, group: int = DEFAULT_GROUP) -> list:
    """qwix rules for `mode`. An int4 group that does not divide a contraction axis (D or F) shrinks
    to the largest size that divides both."""
    check_mode(mode)
    if cfg.scan_layers:
        raise ValueError("quantization: config.model.scan_layers=True is not supported (qwix's scales do not "
                         "follow nn.scan's stacked layer axis); quantize the unscanned model")
    qwix = _qwix()
    qtype = QTYPES[mode]
    ops = ("dot_general",) if cfg.tie_embeddings else ("dot_general", "einsum")
    tile = None if mode == "int8" else math.gcd(group, cfg.embed_dim, mlp_dim(cfg))
    return [
        qwix.QuantizationRule(module_path=r".*attn/out", weight_qtype=qtype),
        qwix.QuantizationRule(module_path=".*", op_names=ops, weight_qtype=qtype, tile_size=tile),
    ]


def quantized_transformer(cfg, mode: str, group: int = DEFAULT_GROUP) -> nn.Module:
    """Transformer(cfg) whose matmuls take the quantized weights of `quantize_params`."""
    qwix = _qwix()
    return qwix.quantize_model(Transformer(cfg), qwix.PtqProvider(rules(cfg, mode, group)))


def abstract_quantized_params(cfg, mode: str, group: int = DEFAULT_GROUP):
    """The quantized parameter tree's structure and shapes, traced without computing anything."""
    model = quantized_transformer(cfg, mode, group)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def quantize_params(cfg, params, mode: str, group: int = DEFAULT_GROUP):
    """Float params -> the tree `quantized_transformer(cfg, mode)` applies (qwix QArrays for weights).

    Jitted: one compiled program instead of a dispatch (and a compile) per weight and op."""
    qwix, abstract = _qwix(), abstract_quantized_params(cfg, mode, group)
    return jax.jit(lambda p: qwix.quantize_params(p, abstract))(nn.unbox(params))


def with_quantization(cfg, mode: str, group: int = DEFAULT_GROUP):
    """A copy of the model config that `lmjax.model.decoding` runs quantized (mode "none": float)."""
    check_mode(mode)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.quantize, cfg.quantize_group = mode, group
    return cfg


def model_for(cfg) -> nn.Module:
    """Transformer(cfg), or its quantized form when the config carries `quantize` (with_quantization)."""
    mode = cfg.get("quantize", "none")
    if mode == "none":
        return Transformer(cfg)
    return quantized_transformer(cfg, mode, cfg.get("quantize_group", DEFAULT_GROUP))


def param_bytes(params) -> int:
    """Bytes the parameters occupy at rest, int4 counted at half a byte."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(params):
        bits = 4 if leaf.dtype == jnp.int4 else 8 * np.dtype(leaf.dtype).itemsize
        total += leaf.size * bits // 8
    return total


def weight_leaves(qparams) -> dict[str, object]:
    """The quantized weights by path, each a qwix WithAux whose `.array` is the QArray."""
    flat = flax.traverse_util.flatten_dict(qparams)
    return {"/".join(k): v for k, v in flat.items() if not isinstance(v, jax.Array)}


def dequantize_params(qparams):
    """The float weights a quantized model effectively computes with (for measuring the error)."""
    qwix = _qwix()
    flat = flax.traverse_util.flatten_dict(qparams)
    out = {k: v if isinstance(v, jax.Array) else qwix.dequantize(v.array) for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(out)
