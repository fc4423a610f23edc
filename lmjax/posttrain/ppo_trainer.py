"""RLHF with PPO: `train(config, init_from, workdir)` samples responses from the policy, scores them
with a reward model, and improves the policy against a KL penalty to the reference (the model of
`init_from`), or resumes such a run.

Each step: `train.batch_size` prompts (from `posttrain.train_file`, the resumable batch stream) get
responses from the KV-cache sampler (`ppo.max_new_tokens`, `ppo.temperature`); one jitted pass
computes the policy's, the reference's and the value network's per-token log-probs and values and
the reward model's score; per-token rewards are the score at the last token minus
`kl_coef * (log pi - log pi_ref)` at every token; GAE gives advantages and returns; then
`ppo.epochs` passes of `ppo.minibatches` updates apply the clipped policy and value losses through
`lmjax.train.step.make_train_step` (same sharding rules, donation, microbatches). The KL (k1 and
k3 estimators, per response) and the coefficient (fixed, or adaptive with `ppo.kl_target`) are
logged with the losses. The value network starts as the reward model of `ppo.reward_from`.

The loop around the step (checkpoints, resume, metrics, summary) is the one every mode shares
(loop.py); a checkpoint also keeps the KL coefficient, and a step's samples and minibatch order
depend only on the seed and the step, so a resumed run repeats the uninterrupted one exactly.

Rollouts run on one host: every process would sample the same whole batch (multi-host PPO is untested).
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from lmjax import config as config_lib
from lmjax import model, sharding
from lmjax.posttrain import batches, dataset, loop, ppo
from lmjax.posttrain import config as pt_config
from lmjax.posttrain import init as init_lib
from lmjax.posttrain.actor_critic import ActorCritic
from lmjax.posttrain.losses import token_logps
from lmjax.posttrain.reward_model import RewardModel
from lmjax.train import checkpointing
from lmjax.train import step as step_lib
from lmjax.train.workdir import Setup

ROLLOUT_METRICS = ("score", "kl_k1", "kl_k3", "response_length", "max_abs_policy_ref_logp_diff")
UPDATE_METRICS = ("loss", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "grad_norm")


def ppo_loss_sums_fn(config: config_dict.ConfigDict, actor_critic: ActorCritic):
    """Clipped policy loss + value_coef * clipped value loss, summed over response tokens."""
    p = config.ppo
    deterministic = float(config.model.dropout) == 0.0

    def loss_sums(params: Any, batch: dict[str, jax.Array], dropout_key: jax.Array, step: jax.Array):
        logits_BxLxV, values_BxL = actor_critic.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                                                      rngs={"dropout": dropout_key})
        mask_BxL = batch["weights"]
        logp_BxL = token_logps(logits_BxLxV, batch["targets"])
        policy = ppo.clipped_policy_loss_sum(logp_BxL, batch["old_logps"], batch["advantages"], mask_BxL, p.clip)
        value = ppo.clipped_value_loss_sum(values_BxL, batch["old_values"], batch["returns"], mask_BxL, p.value_clip)
        ratio_BxL = jnp.exp(logp_BxL - batch["old_logps"])
        sums = {
            "loss_sum": policy + p.value_coef * value,
            "weight_sum": jnp.sum(mask_BxL),
            "z_sum": jnp.float32(0),
            "policy_loss_sum": policy,
            "value_loss_sum": value,
            "clip_fraction_sum": jnp.sum((jnp.abs(ratio_BxL - 1.0) > p.clip) * mask_BxL),
            "approx_kl_sum": jnp.sum((batch["old_logps"] - logp_BxL) * mask_BxL),
        }
        return sums["loss_sum"], sums

    return loss_sums


def rollout_rows(prompts: list[list[int]], responses: list[list[int]], end_id: int, max_new_tokens: int,
                 seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """[B, seq_len] inputs, targets and weights (1 on the sampled tokens, and on `<|end|>` when the
    sampler produced it) of prompt + response."""
    B = len(prompts)
    out = {"inputs": np.full((B, seq_len), max(pad_id, 0), np.int32),
           "targets": np.full((B, seq_len), max(pad_id, 0), np.int32),
           "weights": np.zeros((B, seq_len), np.float32)}
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ended = len(response) < max_new_tokens  # the sampler cut the row at <|end|>
        sequence = np.asarray(prompt + response + ([end_id] if ended else []), np.int32)
        n = len(sequence) - 1
        out["inputs"][row, :n], out["targets"][row, :n] = sequence[:-1], sequence[1:]
        out["weights"][row, len(prompt) - 1 : n] = 1.0
    return out


class PPORun(loop.Run):
    """One PPO run. `__init__` reads and checks everything and writes nothing; `run()` trains."""

    logged = (*ROLLOUT_METRICS, "kl_coef", *UPDATE_METRICS)

    def __init__(self, config: config_dict.ConfigDict, init_from: str, workdir: str):
        super().__init__("ppo", config, init_from, workdir)
        setup, config = self.setup, self.config
        p = config.ppo
        self.updates_per_step = int(p.epochs) * int(p.minibatches)
        # The optimizer sees minibatches: its schedule counts updates, its batch is one minibatch.
        self.update_config = update_config = copy.deepcopy(config)
        update_config.train.batch_size = int(config.train.batch_size) // int(p.minibatches)
        update_config.train.steps = self.total * self.updates_per_step
        update_config.optim.warmup_steps = int(config.optim.warmup_steps) * self.updates_per_step
        setup.model = ActorCritic(config.model)
        setup.abstract_state, setup.state_shardings = step_lib.abstract_train_state(update_config, setup.model, setup.mesh)
        self.policy = model.Transformer(config.model)
        self.reward_config = pt_config.init_config(p.reward_from, config.mesh, "config.ppo.reward_from")
        init_lib.require_kind(p.reward_from, init_lib.REWARD_MODEL, "config.ppo.reward_from",
                              "point it at the workdir of a --mode=reward run")
        shape = lambda c: {k: v for k, v in config_lib.to_json(c)["model"].items()  # noqa: E731
                           if k not in config_lib.RUNTIME_MODEL_KEYS}
        reward_shape, policy_shape = shape(self.reward_config), shape(config)
        diffs = [f"model.{k}: {reward_shape.get(k)!r} there, {v!r} here" for k, v in policy_shape.items()
                 if reward_shape.get(k) != v]
        if diffs:
            raise ValueError(f"config.ppo.reward_from={p.reward_from} holds a model of another shape than --init_from "
                             f"({init_from}): the value network starts from it, so they must match ("
                             + "; ".join(diffs) + ")")
        self.reward_setup = Setup(self.reward_config, p.reward_from)
        self.reward_setup.model = RewardModel(self.reward_config.model)
        self.reward_setup.abstract_state, self.reward_setup.state_shardings = step_lib.abstract_train_state(
            self.reward_config, self.reward_setup.model, setup.mesh)
        seq_len = int(config.data.seq_len)
        self.prompts = [self.template.prompt_ids(ex["prompt"])
                        for ex in dataset.read_jsonl(config.posttrain.train_file, "prompts")]
        longest = max(len(prompt) for prompt in self.prompts)
        if longest + int(p.max_new_tokens) > seq_len:
            raise ValueError(f"the longest prompt of {config.posttrain.train_file} is {longest} tokens: with "
                             f"config.ppo.max_new_tokens={p.max_new_tokens} it does not fit data.seq_len={seq_len}")
        try:
            self.train_step = step_lib.make_train_step(update_config, setup.model, setup.mesh, setup.state_shardings,
                                                       ppo_loss_sums_fn(config, setup.model))
        except ValueError as e:
            raise ValueError(f"PPO updates on minibatches of config.train.batch_size={config.train.batch_size} / "
                             f"config.ppo.minibatches={p.minibatches} rollouts; {e}") from None
        self.rollout_stats = self._make_rollout_stats()
        self.kl = ppo.AdaptiveKLController(float(p.kl_coef), float(p.kl_target), int(p.kl_horizon))

    def _make_rollout_stats(self):
        """One jitted pass over the rollouts: log-probs, values, scores, rewards, GAE, KL."""
        setup, p = self.setup, self.config.ppo
        actor_critic, policy, reward_model = setup.model, self.policy, self.reward_setup.model

        def stats(params, ref_params, reward_params, batch, kl_coef):
            with sharding.activation_sharding(setup.mesh, setup.rules):
                logits_BxLxV, values_BxL = actor_critic.apply({"params": params}, batch["inputs"])
                ref_logits_BxLxV = policy.apply({"params": ref_params}, batch["inputs"])
                scores_B = reward_model.apply({"params": reward_params}, batch["inputs"], batch["weights"])
            mask_BxL = batch["weights"]
            logp_BxL = token_logps(logits_BxLxV, batch["targets"]) * mask_BxL
            ref_logp_BxL = token_logps(ref_logits_BxLxV, batch["targets"]) * mask_BxL
            rewards_BxL = ppo.token_rewards(scores_B, logp_BxL, ref_logp_BxL, mask_BxL, kl_coef)
            advantages_BxL, returns_BxL = ppo.gae(rewards_BxL, values_BxL * mask_BxL, mask_BxL, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages_BxL = ppo.whiten(advantages_BxL, mask_BxL)
            k1_BxL, k3_BxL = ppo.kl_estimates(logp_BxL, ref_logp_BxL)
            return {
                "old_logps": logp_BxL, "old_values": values_BxL * mask_BxL, "advantages": advantages_BxL,
                "returns": returns_BxL, "score": scores_B, "kl_k1": jnp.sum(k1_BxL * mask_BxL, axis=1),
                "kl_k3": jnp.sum(k3_BxL * mask_BxL, axis=1), "response_length": jnp.sum(mask_BxL, axis=1),
                "max_abs_policy_ref_logp_diff": jnp.max(jnp.abs(logp_BxL - ref_logp_BxL)),
            }

        shardings = setup.state_shardings.params
        return jax.jit(stats, in_shardings=(shardings, shardings["policy"], self.reward_setup.state_shardings.params,
                                            sharding.batch_sharding(setup.mesh, setup.rules), None))

    # --- the mode's part of the loop (lmjax.posttrain.loop) --------------------------------------

    def _start(self, restored: checkpointing.Restored | None) -> Any:
        setup, config = self.setup, self.config
        pretrained = init_lib.load_params(self.source_config, self.init_from)  # the reference, always
        self.reference = jax.jit(lambda params: init_lib.grow_vocab(params, model.padded_vocab_size(config.model)),
                                 out_shardings=setup.state_shardings.params["policy"])(pretrained)
        self.reward_params = self.reward_setup.restore(read_only=True).state.params
        rows = len(self.prompts)
        self.stream = batches.make_stream({"prompt_index": np.arange(rows)[:, None], "weights": np.ones((rows, 1))}, 1,
                                          int(config.train.batch_size), (0, int(config.train.batch_size)),
                                          seed=int(config.train.seed), shuffle=bool(config.posttrain.shuffle))
        if restored is not None:
            self.kl.coef = float(restored.data_state["kl_coef"])
            return None
        return init_lib.initial_state(self.update_config, setup.model, setup.mesh, setup.state_shardings,
                                      (pretrained, self.reward_params), subtree=("policy", "value"))

    def _data_state(self) -> dict:
        return {"kl_coef": self.kl.coef}

    def _describe(self, step: int) -> str:
        return (f"{self.config.name} (ppo) from {self.init_from}, rewards from {self.config.ppo.reward_from}: "
                f"{len(self.prompts)} prompts, steps {step}->{self.total}, {self.updates_per_step} updates per step")

    def _summary_extra(self) -> dict:
        return {"reward_from": self.config.ppo.reward_from}

    def _step(self, state: Any, step: int) -> tuple[Any, dict]:
        """One PPO step: sample, score, then epochs x minibatches updates. Returns (state, record)."""
        config, p, setup = self.config, self.config.ppo, self.setup
        prompts = [self.prompts[i] for i in next(self.stream)["prompt_index"][:, 0]]
        key = jax.random.fold_in(jax.random.key(int(config.train.seed)), step)
        # Prompts left-padded to the longest that fits: every rollout batch runs one compiled sampler.
        responses = model.generate(config.model, state.params["policy"], prompts, int(p.max_new_tokens),
                                   temperature=float(p.temperature), rng=key, eos_id=self.template.end_id,
                                   min_prompt_len=int(config.data.seq_len) - int(p.max_new_tokens))
        rows = rollout_rows(prompts, responses, self.template.end_id, int(p.max_new_tokens),
                            int(config.data.seq_len), setup.tokenizer.pad_id)
        batch = sharding.shard_batch(rows, setup.mesh, setup.rules)
        stats = jax.device_get(self.rollout_stats(state.params, self.reference, self.reward_params, batch,
                                                  jnp.float32(self.kl.coef)))
        record = {name: float(np.mean(stats[name])) for name in ROLLOUT_METRICS}
        record["kl_coef"] = self.kl.coef
        data = {**rows, **{k: stats[k] for k in ("old_logps", "old_values", "advantages", "returns")}}
        order_rng = np.random.default_rng([int(config.train.seed), step])
        totals: dict[str, float] = {}
        for _ in range(int(p.epochs)):
            for minibatch in np.array_split(order_rng.permutation(len(prompts)), int(p.minibatches)):
                part = sharding.shard_batch({k: v[minibatch] for k, v in data.items()}, setup.mesh, setup.rules)
                state, step_metrics = self.train_step(state, part)
                self._check_finite(step_metrics, step + 1)  # every update: a NaN must not feed the next one
                for name in UPDATE_METRICS:
                    totals[name] = totals.get(name, 0.0) + float(step_metrics[name]) / self.updates_per_step
        record.update(totals)
        if p.kl_target > 0:
            self.kl.update(record["kl_k1"], len(prompts))
        return state, {**record, "is_finite": True}


def train(config: config_dict.ConfigDict, init_from: str, workdir: str) -> dict:
    """PPO on the model of `init_from` in `workdir` (or resume); returns the summary."""
    return PPORun(config, init_from, workdir).run()
