"""The Mixture-of-Experts FFN: a router sends each token to k of X expert FFNs (plus optional shared
experts every token goes through), so parameters grow with X while the FLOPs per token follow k.

Two dispatch paths compute the same function when nothing overflows:
  capacity  GShard/Switch: each row's tokens fill at most C slots per expert (first choices before
            second choices, earlier tokens first), the rest are dropped; dispatch and combine are
            one-hot einsums, static shapes that shard over the `expert` mesh axis (an all-to-all).
  dropless  MegaBlocks-style: the token-expert pairs are sorted by expert and every expert runs a
            grouped matmul (`jax.lax.ragged_dot`) over exactly its tokens; nothing is dropped.
The router's statistics (Switch load-balancing loss, ST-MoE router z-loss, the share of assignments
each expert got, the share dropped) are sown into the `moe` collection; `layer_means` reads them for
the train step, which adds the weighted losses to the objective and reports them all.

Shape letters (besides those of lmjax/model/__init__.py): X experts, A experts per token (k),
T tokens of a batch (B * L), P token-expert pairs (T * A), C slots per expert per row.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.model.mlp import ACTIVATIONS, Mlp, mlp_dim

COLLECTION = "moe"
ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
# Sown per layer: name -> number of axes of one layer's value.
STATS = {"load_balance_loss": 0, "router_z_loss": 0, "expert_load": 1, "dropped_fraction": 0}


def enabled(cfg: Any) -> bool:
    """Whether `config.model` asks for MoE FFNs (model.moe.num_experts > 0); a model config saved
    before MoE existed has no `moe` section and is dense."""
    moe = cfg.get("moe")
    return moe is not None and int(moe.num_experts) > 0


def expert_dim(cfg: Any) -> int:
    """F of one expert: config.model.moe.expert_dim, or the dense FFN's width when unset."""
    return int(cfg.moe.expert_dim) if cfg.moe.expert_dim is not None else mlp_dim(cfg)


def capacity(moe_cfg: Any, tokens_per_row: int) -> int:
    """C: slots per expert per row, ceil(k * tokens * capacity_factor / X), at least 1."""
    wanted = moe_cfg.experts_per_token * tokens_per_row * moe_cfg.capacity_factor / moe_cfg.num_experts
    return max(1, math.ceil(wanted))


def check(cfg: Any) -> None:
    """Raise ValueError naming the first `config.model.moe` key that cannot work."""
    moe = cfg.moe
    if moe.num_experts < 0:
        raise ValueError(f"config.model.moe.num_experts={moe.num_experts} must be >= 0 (0: dense FFN)")
    if not enabled(cfg):
        return
    if not 1 <= moe.experts_per_token <= moe.num_experts:
        raise ValueError(f"config.model.moe.experts_per_token={moe.experts_per_token} must be in "
                         f"[1, config.model.moe.num_experts={moe.num_experts}]")
    if moe.shared_experts < 0:
        raise ValueError(f"config.model.moe.shared_experts={moe.shared_experts} must be >= 0")
    if moe.expert_dim is not None and moe.expert_dim < 1:
        raise ValueError(f"config.model.moe.expert_dim={moe.expert_dim} must be >= 1 (or unset)")
    if moe.capacity_factor <= 0:
        raise ValueError(f"config.model.moe.capacity_factor={moe.capacity_factor} must be > 0")
    for key in ("load_balance_loss", "router_z_loss"):
        if moe[key] < 0:
            raise ValueError(f"config.model.moe.{key}={moe[key]} must be >= 0")


def route(logits_TxX: jax.Array, moe_cfg: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scores [T, X], weights [T, A], experts [T, A]): the top-k experts of each token by score
    (softmax or sigmoid of the logits) and the weights their outputs are mixed with."""
    if moe_cfg.router == "softmax":
        scores_TxX = jax.nn.softmax(logits_TxX, axis=-1)
    elif moe_cfg.router == "sigmoid":
        scores_TxX = jax.nn.sigmoid(logits_TxX)
    else:
        raise ValueError(f"config.model.moe.router={moe_cfg.router!r}: expected one of {ROUTERS}")
    weights_TxA, experts_TxA = jax.lax.top_k(scores_TxX, int(moe_cfg.experts_per_token))
    if moe_cfg.renormalize:
        weights_TxA = weights_TxA / jnp.sum(weights_TxA, axis=-1, keepdims=True)
    return scores_TxX, weights_TxA, experts_TxA


def load_balance_loss(scores_TxX: jax.Array, experts_TxA: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Switch Transformer loss X * sum_i f_i * p_i, f): f_i is the share of the token-expert
    assignments that went to expert i, p_i the mean router probability of i (sigmoid scores are
    normalized per token first). It is 1 when routing is uniform and grows as it concentrates."""
    num_experts = scores_TxX.shape[-1]
    load_X = jnp.mean(jax.nn.one_hot(experts_TxA, num_experts, dtype=jnp.float32), axis=(0, 1))
    probs_TxX = scores_TxX / jnp.sum(scores_TxX, axis=-1, keepdims=True)
    importance_X = jnp.mean(probs_TxX, axis=0)
    return num_experts * jnp.sum(load_X * importance_X), load_X


def router_z_loss(logits_TxX: jax.Array) -> jax.Array:
    """ST-MoE: the mean over tokens of log(sum_i exp(logit_i))^2, which keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxX, axis=-1)))


def layer_means(sown: Any) -> dict[str, jax.Array]:
    """The `moe` collection of an apply (one value per MoE layer, stacked when layers are scanned)
    as {stat: mean over layers}."""
    values = {name: [] for name in STATS}
    for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
        name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        values[name].append(leaf.reshape((-1,) + leaf.shape[leaf.ndim - STATS[name]:]))
    return {name: jnp.mean(jnp.concatenate(v), axis=0) for name, v in values.items() if v}


def aux_loss(moe_cfg: Any, means: dict[str, jax.Array]) -> jax.Array:
    """The weighted router losses the train step adds to the per-token objective."""
    return (float(moe_cfg.load_balance_loss) * means["load_balance_loss"]
            + float(moe_cfg.router_z_loss) * means["router_z_loss"])


class ExpertDense(nn.Module):
    """X dense layers side by side: kernel [X, in, out], bias [X, out].

    Called on [X, ..., in] (each expert's slots, the capacity path), or on [P, in] rows sorted by
    expert with `group_sizes` [X] and each row's expert `experts_P` (the dropless path).
    """

    cfg: Any
    features: int
    names: tuple[str, str]  # logical names of (in, out)
    std: float

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes_X: jax.Array | None = None,
                 experts_P: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        X, fan_in = int(cfg.moe.num_experts), x.shape[-1]
        param_dtype = jnp.dtype(cfg.param_dtype)
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std),
                                                                    ("expert", *self.names)),
                            (X, fan_in, self.features), param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=jnp.dtype(cfg.dtype))
        if group_sizes_X is None:
            y = jnp.einsum("x...i,xio->x...o", x, kernel)
        else:
            y = jax.lax.ragged_dot(x, kernel, group_sizes_X)
        if cfg.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert", self.names[1])),
                              (X, self.features), param_dtype).astype(y.dtype)
            y = y + (bias[experts_P] if group_sizes_X is not None else bias.reshape((X,) + (1,) * (y.ndim - 2) + (-1,)))
        return y


class MoeMlp(nn.Module):
    """x [B, L, D] -> sum over the token's k experts of weight * expert(x), + shared experts(x)."""

    cfg: Any

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg, moe = self.cfg, self.cfg.moe
        B, L, D = x_BxLxD.shape
        X, A = int(moe.num_experts), int(moe.experts_per_token)
        router_DxX = self.param("router", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                       ("embed", None)),
                                (D, X), jnp.dtype(cfg.param_dtype))
        x_TxD = x_BxLxD.reshape(B * L, D)
        # The router runs in float32 whatever the compute dtype (Switch's selective precision).
        logits_TxX = x_TxD.astype(jnp.float32) @ router_DxX.astype(jnp.float32)
        scores_TxX, weights_TxA, experts_TxA = route(logits_TxX, moe)
        balance, load_X = load_balance_loss(scores_TxX, experts_TxA)
        self.sow(COLLECTION, "load_balance_loss", balance)
        self.sow(COLLECTION, "router_z_loss", router_z_loss(logits_TxX))
        self.sow(COLLECTION, "expert_load", load_X)

        if moe.dispatch == "capacity":
            y_BxLxD, kept = self._capacity(x_BxLxD, weights_TxA.reshape(B, L, A), experts_TxA.reshape(B, L, A))
            self.sow(COLLECTION, "dropped_fraction", 1.0 - kept / (B * L * A))
        elif moe.dispatch == "dropless":
            y_BxLxD = self._dropless(x_TxD, weights_TxA, experts_TxA).reshape(B, L, D)
            self.sow(COLLECTION, "dropped_fraction", jnp.float32(0))
        else:
            raise ValueError(f"config.model.moe.dispatch={moe.dispatch!r}: expected one of {DISPATCHES}")
        if moe.shared_experts:
            y_BxLxD = y_BxLxD + Mlp(cfg, hidden_dim=int(moe.shared_experts) * expert_dim(cfg), name="shared")(x_BxLxD)
        return y_BxLxD

    def _experts(self, x: jax.Array, *grouping: jax.Array) -> jax.Array:
        """Every expert's FFN (the activation of config.model.mlp) on its own inputs."""
        cfg = self.cfg
        F, D = expert_dim(cfg), cfg.embed_dim
        up = lambda name: ExpertDense(cfg, F, ("embed", "mlp"), cfg.init_std, name=name)(x, *grouping)  # noqa: E731
        if cfg.mlp == "swiglu":
            h = nn.silu(up("gate")) * up("up")
        else:
            h = ACTIVATIONS[cfg.mlp](up("up"))
        down_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2's residual scaling, as in Mlp
        return ExpertDense(cfg, D, ("mlp", "embed"), down_std, name="down")(h, *grouping)

    def _capacity(self, x_BxLxD: jax.Array, weights_BxLxA: jax.Array, experts_BxLxA: jax.Array):
        """(output, number of token-expert pairs kept): each row fills C slots per expert."""
        B, L, A = experts_BxLxA.shape
        X, C = int(self.cfg.moe.num_experts), capacity(self.cfg.moe, L)
        choice_BxLxAxX = jax.nn.one_hot(experts_BxLxA, X, dtype=jnp.int32)
        # Slots are taken by every token's first choice, then every token's second choice, ...
        choice_BxALxX = choice_BxLxAxX.transpose(0, 2, 1, 3).reshape(B, A * L, X)
        slot_BxALxX = jnp.cumsum(choice_BxALxX, axis=1) - 1
        slot_BxLxAxX = slot_BxALxX.reshape(B, A, L, X).transpose(0, 2, 1, 3)
        kept_BxLxAxX = choice_BxLxAxX * (slot_BxLxAxX < C)
        # A token picks an expert at most once, so summing over its choices loses nothing.
        kept_BxLxX = jnp.sum(kept_BxLxAxX, axis=2)
        slot_BxLxX = jnp.sum(slot_BxLxAxX * choice_BxLxAxX, axis=2)
        weight_BxLxX = jnp.sum(weights_BxLxA[..., None] * kept_BxLxAxX, axis=2)
        dtype = x_BxLxD.dtype
        dispatch_BxLxXxC = jax.nn.one_hot(slot_BxLxX, C, dtype=dtype) * kept_BxLxX[..., None].astype(dtype)
        combine_BxLxXxC = dispatch_BxLxXxC * weight_BxLxX[..., None].astype(dtype)
        dispatch_BxLxXxC = nn.with_logical_constraint(dispatch_BxLxXxC, ("batch", "length", None, None))
        x_XxBxCxD = jnp.einsum("blxc,bld->xbcd", dispatch_BxLxXxC, x_BxLxD)
        x_XxBxCxD = nn.with_logical_constraint(x_XxBxCxD, ("expert", "batch", None, "embed"))
        y_XxBxCxD = self._experts(x_XxBxCxD)
        y_XxBxCxD = nn.with_logical_constraint(y_XxBxCxD, ("expert", "batch", None, "embed"))
        y_BxLxD = jnp.einsum("xbcd,blxc->bld", y_XxBxCxD, combine_BxLxXxC)
        return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed")), jnp.sum(kept_BxLxX)

    def _dropless(self, x_TxD: jax.Array, weights_TxA: jax.Array, experts_TxA: jax.Array) -> jax.Array:
        """Output [T, D]: the T * A token-expert pairs sorted by expert, one grouped matmul per layer."""
        T, A = experts_TxA.shape
        X = int(self.cfg.moe.num_experts)
        experts_P = experts_TxA.reshape(T * A)
        order_P = jnp.argsort(experts_P, stable=True)
        group_sizes_X = jnp.bincount(experts_P, length=X).astype(jnp.int32)
        y_PxD = self._experts(x_TxD[order_P // A], group_sizes_X, experts_P[order_P])
        y_TxAxD = y_PxD[jnp.argsort(order_P)].reshape(T, A, -1)
        return jnp.einsum("tad,ta->td", y_TxAxD, weights_TxA.astype(y_TxAxD.dtype))
