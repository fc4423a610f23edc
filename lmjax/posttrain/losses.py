"""Post-training objectives, each as `(params, batch, dropout_key, step) -> (objective, sums)` for
`lmjax.train.step.make_train_step`: sums over examples (`loss_sum`, `weight_sum` = number of
examples, extra `<metric>_sum`s) so microbatches and devices add up to the exact batch mean.

SFT needs nothing new: it is the next-token loss with the chat template's weights
(`lmjax.train.step.lm_loss_sums_fn`). Pair batches hold [B, 2, L] fields, index 0 the chosen
response and 1 the rejected one; both go through the model as one [2B, L] batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DPO_LOSSES = ("sigmoid", "ipo")


def token_logps(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """log p(target) at every position, float32 [B, L]."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    one_hot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
    return jnp.sum(logits_BxLxV * one_hot_BxLxV, axis=-1) - jax.nn.logsumexp(logits_BxLxV, axis=-1)


def sequence_logps(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """log p(response | prompt) [B]: the sum of the log-probs of the masked (response) targets."""
    return jnp.sum(token_logps(logits_BxLxV, targets_BxL) * (mask_BxL > 0), axis=-1)


def _flat(x_Bx2xL: jax.Array) -> jax.Array:
    return x_Bx2xL.reshape(-1, *x_Bx2xL.shape[2:])


def _real_pairs(batch: dict[str, jax.Array]) -> jax.Array:
    """1.0 for a pair, 0.0 for a padding row (no weighted token: e.g. filling an eval batch)."""
    return (jnp.sum(batch["weights"], axis=(1, 2)) > 0).astype(jnp.float32)


def pair_logps_fn(model: nn.Module, deterministic: bool = True) -> Callable[..., jax.Array]:
    """(params, pair batch, dropout_key) -> sequence log-probs [B, 2] of the chosen and rejected responses."""

    def pair_logps(params: Any, batch: dict[str, jax.Array], dropout_key: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, _flat(batch["inputs"]), deterministic=deterministic,
                             rngs={"dropout": dropout_key})
        return sequence_logps(logits, _flat(batch["targets"]), _flat(batch["weights"])).reshape(-1, 2)

    return pair_logps


def dpo_losses(logratio_Bx2: jax.Array, beta: float, kind: str = "sigmoid") -> jax.Array:
    """Per-pair loss from log pi/pi_ref of (chosen, rejected).

    sigmoid (DPO): -log sigmoid(beta * h), h = logratio_chosen - logratio_rejected; ln 2 at h = 0.
    ipo (IPO): (h - 1 / (2 beta))^2, a squared loss that stops pushing once the margin reaches its
    target, on the same summed sequence log-probs.
    """
    h_B = logratio_Bx2[:, 0] - logratio_Bx2[:, 1]
    if kind == "sigmoid":
        return -jax.nn.log_sigmoid(beta * h_B)
    if kind == "ipo":
        return jnp.square(h_B - 1.0 / (2.0 * beta))
    raise ValueError(f"config.dpo.loss={kind!r} is not valid; choose one of: {', '.join(DPO_LOSSES)}")


def _pair_sums(loss_sum: jax.Array, rewards_Bx2: jax.Array, real_B: jax.Array) -> dict[str, jax.Array]:
    """The sums every pairwise objective reports: its loss, the pairs counted, and how often and by
    how much the chosen response's reward beats the rejected one's."""
    margin_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
    return {
        "loss_sum": loss_sum,
        "weight_sum": jnp.sum(real_B),
        "z_sum": jnp.float32(0),
        "accuracy_sum": jnp.sum((margin_B > 0) * real_B),
        "reward_margin_sum": jnp.sum(margin_B * real_B),
    }


def dpo_loss_sums_fn(config: Any, model: nn.Module) -> Callable[..., Any]:
    """DPO against reference log-probs given in the batch (`ref_logps` [B, 2], computed once)."""
    beta, kind = float(config.dpo.beta), str(config.dpo.loss)
    pair_logps = pair_logps_fn(model, deterministic=float(config.model.dropout) == 0.0)

    def loss_sums(params: Any, batch: dict[str, jax.Array], dropout_key: jax.Array, step: jax.Array):
        logratio_Bx2 = pair_logps(params, batch, dropout_key) - batch["ref_logps"]
        rewards_Bx2 = beta * logratio_Bx2  # DPO's implicit rewards
        real_B = _real_pairs(batch)
        loss_sum = jnp.sum(dpo_losses(logratio_Bx2, beta, kind) * real_B)
        sums = {
            **_pair_sums(loss_sum, rewards_Bx2, real_B),
            "chosen_reward_sum": jnp.sum(rewards_Bx2[:, 0] * real_B),
            "rejected_reward_sum": jnp.sum(rewards_Bx2[:, 1] * real_B),
        }
        return loss_sum, sums

    return loss_sums


def bradley_terry_losses(rewards_Bx2: jax.Array) -> jax.Array:
    """-log P(chosen > rejected) = -log sigmoid(r_chosen - r_rejected), per pair."""
    return -jax.nn.log_sigmoid(rewards_Bx2[:, 0] - rewards_Bx2[:, 1])


def reward_loss_sums_fn(config: Any, model: nn.Module) -> Callable[..., Any]:
    """Bradley-Terry loss of a RewardModel, plus `reward.center` * (r_chosen + r_rejected)^2, which
    pins the rewards' mean near 0 (the loss alone sees only differences)."""
    center = float(config.reward.center)
    deterministic = float(config.model.dropout) == 0.0

    def loss_sums(params: Any, batch: dict[str, jax.Array], dropout_key: jax.Array, step: jax.Array):
        rewards_Bx2 = model.apply(
            {"params": params}, _flat(batch["inputs"]), _flat(batch["weights"]), deterministic=deterministic,
            rngs={"dropout": dropout_key},
        ).reshape(-1, 2)
        real_B = _real_pairs(batch)
        loss_sum = jnp.sum(bradley_terry_losses(rewards_Bx2) * real_B)
        center_sum = jnp.sum(jnp.square(rewards_Bx2[:, 0] + rewards_Bx2[:, 1]) * real_B)
        sums = {
            **_pair_sums(loss_sum, rewards_Bx2, real_B),
            "reward_mean_sum": jnp.sum(rewards_Bx2.mean(axis=1) * real_B),
        }
        return loss_sum + center * center_sum, sums

    return loss_sums
