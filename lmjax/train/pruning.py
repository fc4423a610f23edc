"""Pruning: fixed masks that zero a share of the blocks' weight matrices, kept zero through a recovery fine-tune.

Methods (`prune.method`), each applied to every block's attention and MLP kernels (embeddings, norms
and biases are kept, except a pruned head's query bias):
  magnitude  unstructured: the `prune.sparsity` share of each matrix with the smallest |W|;
  wanda      unstructured, per output unit: the smallest |W_ij| * ||x_j|| (Sun et al. 2023), x_j the
             matrix's input feature j over `prune.calibration_batches` training batches;
  2:4        semi-structured: the 2 smallest |W| of every 4 consecutive inputs of each output (sparsity 0.5);
  heads      structured: the `sparsity` share of each layer's query heads with the smallest squared
             norm of their query and output-projection weights; their query and output slices are
             zeroed, so the head adds nothing (its keys/values stay: with GQA other heads read them).

Fine-tuning through the trainer (`prune.from_workdir`): a fresh run starts from that run's newest
checkpoint, pruned, with a new optimizer, and its loss reads the weights through the mask, so a
pruned weight gets gradient 0; Adam's moments of a zero gradient stay 0 and decoupled weight decay of
0 is 0, so the weight stays exactly zero. The mask is recomputed from the dense run on every resume
(it depends only on that checkpoint and the fixed calibration batches).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import data
from lmjax.model.attention import Projection

METHODS = ("magnitude", "wanda", "2:4", "heads")


def check(config: Any) -> None:
    p = config.prune
    if p.method not in METHODS:
        raise ValueError(f"config.prune.method={p.method!r} is not valid; choose one of: {', '.join(METHODS)}")
    if not 0.0 <= float(p.sparsity) < 1.0:
        raise ValueError(f"config.prune.sparsity={p.sparsity} must be in [0, 1)")
    if p.method == "2:4" and float(p.sparsity) != 0.5:
        raise ValueError(f"config.prune.method='2:4' removes exactly half: set config.prune.sparsity=0.5, not {p.sparsity}")
    if p.method == "wanda" and int(p.calibration_batches) < 1:
        raise ValueError(f"config.prune.calibration_batches={p.calibration_batches} must be >= 1 for wanda")


def _prunable(path: tuple[str, ...]) -> bool:
    return path[0].startswith("block_") and path[-1] == "kernel"


def _matrix(path: tuple[str, ...], w: jax.Array) -> jax.Array:
    """The kernel as [inputs, outputs] (the attention output projection's inputs are heads x head_dim)."""
    inputs = 2 if path[-2:] == ("out", "kernel") and path[-3] == "attn" else 1
    return w.reshape(int(np.prod(w.shape[:inputs])), -1)


def _drop_lowest(score_IxO: jax.Array, share: jax.Array, axis: int | None) -> jax.Array:
    """1.0 where kept: the round(share * n) lowest scores of the matrix (axis None) or of each slice along `axis` go."""
    if axis is None:
        n, rank = score_IxO.size, jnp.argsort(jnp.argsort(score_IxO.reshape(-1))).reshape(score_IxO.shape)
    else:
        n, rank = score_IxO.shape[axis], jnp.argsort(jnp.argsort(score_IxO, axis=axis), axis=axis)
    return (rank >= jnp.round(share * n)).astype(jnp.float32)


def _two_of_four(score_IxO: jax.Array) -> jax.Array:
    n_in, n_out = score_IxO.shape
    if n_in % 4:
        raise ValueError(f"2:4 pruning needs input widths divisible by 4, got a {score_IxO.shape} matrix")
    groups_Gx4xO = score_IxO.reshape(n_in // 4, 4, n_out)
    return _drop_lowest(groups_Gx4xO, jnp.float32(0.5), axis=1).reshape(n_in, n_out)


def _head_masks(block: dict, share: jax.Array) -> dict:
    """{('attn', 'query', 'kernel'|'bias'), ('attn', 'out', 'kernel')} masks dropping whole query heads."""
    query_DxHxE, out_HxExD = block["attn"]["query"]["kernel"], block["attn"]["out"]["kernel"]
    score_H = jnp.sum(jnp.square(query_DxHxE), axis=(0, 2)) + jnp.sum(jnp.square(out_HxExD), axis=(1, 2))
    keep_H = _drop_lowest(score_H, share, axis=None)
    masks = {("attn", "query", "kernel"): jnp.broadcast_to(keep_H[None, :, None], query_DxHxE.shape),
             ("attn", "out", "kernel"): jnp.broadcast_to(keep_H[:, None, None], out_HxExD.shape)}
    if "bias" in block["attn"]["query"]:
        masks[("attn", "query", "bias")] = jnp.broadcast_to(keep_H[:, None], block["attn"]["query"]["bias"].shape)
    return masks


def input_norms(model: nn.Module, params: Any, batches: list[np.ndarray]) -> dict[tuple[str, ...], jax.Array]:
    """{kernel path: ||x_j|| over every token of `batches`} for each block matmul, read at its input."""

    @jax.jit
    def squares(params: Any, tokens_BxL: jax.Array) -> dict[tuple[str, ...], jax.Array]:
        found: dict[tuple[str, ...], jax.Array] = {}

        def record(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(module, (Projection, nn.Dense)):
                x = args[0].astype(jnp.float32)
                inputs = len(module.in_shape) if isinstance(module, Projection) else 1
                found["/".join((*module.path, "kernel"))] = jnp.sum(
                    jnp.square(x), axis=tuple(range(x.ndim - inputs))).reshape(-1)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply({"params": params}, tokens_BxL)
        return found

    totals = None
    for tokens_BxL in batches:
        found = squares(params, jnp.asarray(tokens_BxL))
        totals = found if totals is None else jax.tree.map(jnp.add, totals, found)
    return {tuple(path.split("/")): jnp.sqrt(total) for path, total in totals.items()}


def masks_for(params: Any, method: str, sparsity: float, norms: dict | None = None) -> Any:
    """A tree like `params` of float32 masks (1 kept, 0 pruned); unpruned leaves get all-ones. One compiled program."""
    keyed = None if norms is None else {"/".join(path): n for path, n in norms.items()}
    return _masks(params, keyed, jnp.float32(sparsity), method=method)


@functools.partial(jax.jit, static_argnames=("method",))
def _masks(params: Any, norms: dict | None, sparsity: jax.Array, *, method: str) -> Any:
    flat = flax.traverse_util.flatten_dict(params)
    masks = {path: jnp.ones_like(w, jnp.float32) for path, w in flat.items()}
    for path, w in flat.items():
        if not _prunable(path) or method == "heads":
            continue
        score_IxO = jnp.abs(_matrix(path, w)).astype(jnp.float32)
        if method == "wanda":
            score_IxO = score_IxO * norms["/".join(path)][:, None]
            keep_IxO = _drop_lowest(score_IxO, sparsity, axis=0)
        elif method == "2:4":
            keep_IxO = _two_of_four(score_IxO)
        else:
            keep_IxO = _drop_lowest(score_IxO, sparsity, axis=None)
        masks[path] = keep_IxO.reshape(w.shape)
    if method == "heads":
        for name in (n for n in params if n.startswith("block_")):
            for sub, mask in _head_masks(params[name], sparsity).items():
                masks[(name, *sub)] = mask
    return flax.traverse_util.unflatten_dict(masks)


def apply_masks(params: Any, masks: Any) -> Any:
    return jax.tree.map(lambda w, m: w * m.astype(w.dtype), params, masks)


def sparsity_of(params: Any) -> float:
    """The share of exact zeros among the prunable kernels."""
    flat = flax.traverse_util.flatten_dict(params)
    kernels = [w for path, w in flat.items() if _prunable(path)]
    return float(sum(int(jnp.sum(w == 0)) for w in kernels) / sum(w.size for w in kernels))


def calibration_batches(config: Any, tokenizer: data.Tokenizer) -> list[np.ndarray]:
    """The first `prune.calibration_batches` training batches (a fixed seed: the same every call)."""
    pipeline = data.make_pipeline(config.data, tokenizer, "train", config.train.batch_size, seed=config.train.seed)
    return [next(pipeline)["inputs"] for _ in range(int(config.prune.calibration_batches))]


def prune(config: Any, model: nn.Module, params: Any, tokenizer: data.Tokenizer) -> tuple[Any, Any]:
    """(pruned params, masks) by `config.prune`'s method and sparsity."""
    check(config)
    method = config.prune.method
    norms = input_norms(model, params, calibration_batches(config, tokenizer)) if method == "wanda" else None
    masks = masks_for(params, method, float(config.prune.sparsity), norms)
    return apply_masks(params, masks), masks


def masked_loss_sums_fn(loss_sums_fn: Callable, masks: Any) -> Callable:
    """`loss_sums_fn` reading the params through the fixed mask: pruned weights get zero gradient."""
    def loss_sums(params: Any, *args: Any):
        return loss_sums_fn(apply_masks(params, masks), *args)

    return loss_sums


def pruned_start(setup: Any) -> tuple[Any, Any] | None:
    """(pruned params, masks) of `prune.from_workdir`'s newest checkpoint for a run that fine-tunes it; None if unset."""
    config = setup.config
    if not config.prune.from_workdir:
        return None
    check(config)
    from lmjax.train import workdir as workdir_lib  # workdir imports the train step

    workdir_lib.require_checkpoint(config.prune.from_workdir)
    dense = workdir_lib.Setup(config, config.prune.from_workdir).restore(read_only=True).state.params
    return prune(config, setup.model, dense, setup.tokenizer)
