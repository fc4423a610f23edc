"""The optimizer: global-norm clipping, then AdamW (or Adafactor, Lion, SGD) with masked decay.

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
import optax


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


def make_optimizer(optim_cfg: Any, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
    """The transformation named by `config.optim.name`, after clipping at `config.optim.clip`.

    Decay is decoupled and scaled by the learning rate, as in PyTorch's AdamW: each step
    subtracts `lr_t * weight_decay * param` from the masked parameters.
    """
    name, wd = optim_cfg.name, float(optim_cfg.weight_decay)
    if name == "adamw":
        tx = optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=wd, mask=mask
        )
    elif name == "lion":
        tx = optax.lion(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=wd, mask=mask)
    elif name == "adafactor":
        # Factored second moments: optimizer state is O(rows + cols) per matrix, not O(rows * cols).
        tx = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask)
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(wd, mask),
            optax.sgd(schedule, momentum=optim_cfg.b1 or None),
        )
    else:
        raise ValueError(f"Unknown config.optim.name={name!r}; expected adamw | adafactor | lion | sgd.")
    if optim_cfg.clip and optim_cfg.clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(optim_cfg.clip)), tx)
    return tx
