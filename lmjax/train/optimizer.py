"""The optimizer: global-norm clipping, then AdamW (or Adafactor, Lion, SGD) with masked, decoupled decay.

Weight decay pulls weights toward zero to keep their norm in check; that makes sense for the
matrices that mix features, not for the few vectors that set a scale or offset. So decay applies
to a parameter unless one of these holds:
  * it is a norm parameter: one of its logical axes is `norm` (LayerNorm/RMSNorm scale and bias);
  * it is a bias: its name is `bias`;
  * it is a vector: fewer than two axes once the stacked `layers` axis of scanned blocks is
    dropped (so scanning the layers does not turn a bias into a "matrix");
  * it is an embedding table (name contains `embedding`) and `optim.decay_embeddings` is False.
    With tied embeddings the table is also the LM head, so decaying it is the common default.
The decision uses the logical names the model gives its parameters, so it needs the boxed
(`nn.Partitioned`) tree from `model.init` or `jax.eval_shape(model.init, ...)`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
ADAFACTOR_DECAY_RATE = 0.8  # second-moment decay 1 - t^-0.8 (Shazeer & Stern, 2018)
ADAFACTOR_EPS = 1e-30  # added to squared gradients (Adam's eps is added to their root)


def decay_mask(boxed_params: Any, decay_embeddings: bool) -> Any:
    """A tree of bools shaped like the unboxed params: True where weight decay applies."""

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim
        if "norm" in names or name == "bias":
            return False
        if sum(axis != "layers" for axis in names) < 2:
            return False
        return decay_embeddings or "embedding" not in name

    return jax.tree_util.tree_map_with_path(
        decays, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def _direction(optim_cfg: Any) -> optax.GradientTransformation:
    """The optimizer's step direction before the learning rate and decay are applied."""
    name, b1 = optim_cfg.name, float(optim_cfg.b1)
    if name == "adamw":
        return optax.scale_by_adam(b1=b1, b2=float(optim_cfg.b2), eps=float(optim_cfg.eps))
    if name == "lion":
        return optax.scale_by_lion(b1=b1, b2=float(optim_cfg.b2))
    if name == "adafactor":
        # Shazeer & Stern (2018): second moments factored into row and column statistics for
        # matrices of at least 128 x 128 (optimizer state O(rows + cols)), decaying as 1 - t^-0.8,
        # with 1e-30 added to the squared gradient; each update's RMS clipped to 1. Adam's b2 and
        # eps are different quantities and do not apply. The update is not multiplied by the
        # parameter's RMS, so `optim.lr` is an absolute step size, as for the other optimizers.
        steps = [
            optax.scale_by_factored_rms(factored=True, decay_rate=ADAFACTOR_DECAY_RATE,
                                        min_dim_size_to_factor=128, epsilon=ADAFACTOR_EPS),
            optax.clip_by_block_rms(1.0),
        ]
        if b1:  # momentum on the normalized update, without bias correction (as in T5X)
            steps.append(optax.ema(b1, debias=False))
        return optax.chain(*steps)
    if name == "sgd":
        return optax.trace(decay=b1) if b1 else optax.identity()
    raise ValueError(f"Unknown config.optim.name={name!r}; expected one of {OPTIMIZERS}.")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm`'s update, as the product with one scalar: g * min(1, max_norm / |g|).

    optax divides each element by the norm, which XLA's CPU compiler writes out as a pass of its own
    over every gradient; a product with a scalar fuses into the optimizer's update instead.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(optim_cfg: Any, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
    """Clipping at `optim.clip`, then `p <- p - lr_t * (direction + weight_decay * p)` for every optimizer.

    Decay is decoupled from the gradient statistics (added after Adam's normalisation, Lion's sign,
    Adafactor's factored scaling or SGD's momentum) and scaled by the learning rate as in PyTorch's
    AdamW, so with zero gradients a decayed weight shrinks by `1 - lr_t * weight_decay` per step.
    """
    tx = optax.chain(
        _direction(optim_cfg),
        optax.add_decayed_weights(float(optim_cfg.weight_decay), mask),
        optax.scale_by_learning_rate(schedule),
    )
    if optim_cfg.clip and optim_cfg.clip > 0:
        tx = optax.chain(clip_by_global_norm(float(optim_cfg.clip)), tx)
    return tx
