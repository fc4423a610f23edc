"""PPO's arithmetic for RLHF: per-token rewards with a KL penalty, GAE, the clipped policy and value
objectives, and the adaptive KL coefficient. Pure functions over [B, T] response arrays, where
`mask_BxT` is 1 on generated tokens and 0 on padding after a response ends.

The loop that feeds them (rollouts, scoring, minibatch epochs) is ppo_trainer.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def kl_estimates(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token estimators of KL(policy || reference) from samples of the policy (Schulman, 2020):
    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0)."""
    log_ratio_BxT = ref_logp_BxT - logp_BxT
    return -log_ratio_BxT, jnp.expm1(log_ratio_BxT) - log_ratio_BxT


def token_rewards(scores_B: jax.Array, logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array,
                  kl_coef: float | jax.Array) -> jax.Array:
    """-kl_coef * k1 at every generated token, plus the reward model's score at the last one."""
    k1_BxT, _ = kl_estimates(logp_BxT, ref_logp_BxT)
    T = mask_BxT.shape[1]
    last_B = T - 1 - jnp.argmax(jnp.flip(mask_BxT > 0, axis=1), axis=1)
    score_BxT = jax.nn.one_hot(last_B, T) * scores_B[:, None]
    return (score_BxT - kl_coef * k1_BxT) * mask_BxT


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, T] by generalized advantage estimation (Schulman et al., 2016).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where anything past
    the end of the response (mask 0) counts as 0: the episode ends with its last token.
    """
    mask_BxT = mask_BxT.astype(jnp.float32)
    next_mask_BxT = jnp.concatenate([mask_BxT[:, 1:], jnp.zeros_like(mask_BxT[:, :1])], axis=1)
    next_values_BxT = jnp.concatenate([values_BxT[:, 1:], jnp.zeros_like(values_BxT[:, :1])], axis=1)
    deltas_BxT = rewards_BxT + gamma * next_values_BxT * next_mask_BxT - values_BxT

    def backward(next_advantage_B, inputs):
        delta_B, next_mask_B = inputs
        advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B
        return advantage_B, advantage_B

    _, advantages_TxB = jax.lax.scan(backward, jnp.zeros(rewards_BxT.shape[0]), (deltas_BxT.T, next_mask_BxT.T),
                                     reverse=True)
    advantages_BxT = advantages_TxB.T * mask_BxT
    return advantages_BxT, (advantages_BxT + values_BxT) * mask_BxT


def whiten(x_BxT: jax.Array, mask_BxT: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x standardised over its masked entries (advantages are commonly whitened per batch)."""
    n = jnp.maximum(jnp.sum(mask_BxT), 1.0)
    mean = jnp.sum(x_BxT * mask_BxT) / n
    var = jnp.sum(jnp.square(x_BxT - mean) * mask_BxT) / n
    return (x_BxT - mean) * jax.lax.rsqrt(var + eps) * mask_BxT


def clipped_policy_loss_sum(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array,
                            mask_BxT: jax.Array, clip: float) -> jax.Array:
    """Sum over tokens of -min(ratio A, clip(ratio, 1 - clip, 1 + clip) A), ratio = p / p_old: at
    ratio 1 its gradient is the plain policy gradient -A grad log p."""
    ratio_BxT = jnp.exp(logp_BxT - old_logp_BxT)
    unclipped_BxT = ratio_BxT * advantages_BxT
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip, 1.0 + clip) * advantages_BxT
    return jnp.sum(-jnp.minimum(unclipped_BxT, clipped_BxT) * mask_BxT)


def clipped_value_loss_sum(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array,
                           mask_BxT: jax.Array, clip: float) -> jax.Array:
    """Sum over tokens of 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    clipped_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip, clip)
    worst_BxT = jnp.maximum(jnp.square(values_BxT - returns_BxT), jnp.square(clipped_BxT - returns_BxT))
    return 0.5 * jnp.sum(worst_BxT * mask_BxT)


@dataclasses.dataclass
class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): nudged up when the measured KL is above `target`
    and down when below, by at most 20% of (steps / horizon) per update."""

    coef: float
    target: float
    horizon: int

    def update(self, kl: float, steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * steps / self.horizon
        return self.coef
