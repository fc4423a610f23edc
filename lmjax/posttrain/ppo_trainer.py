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
logged every step. The value network starts as the reward model of `ppo.reward_from`.

Rollouts run on one host: every process would sample the same whole batch (multi-host PPO is untested).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from lmjax import cli, model, sharding
from lmjax import config as config_lib
from lmjax.posttrain import batches, dataset, ppo
from lmjax.posttrain import config as pt_config
from lmjax.posttrain import init as init_lib
from lmjax.posttrain.actor_critic import ActorCritic
from lmjax.posttrain.chat import ChatTemplate
from lmjax.posttrain.losses import token_logps
from lmjax.posttrain.reward_model import RewardModel
from lmjax.train import checkpointing, metrics, preemption
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


class PPORun:
    """One run. `__init__` reads and checks everything and writes nothing; `run()` trains."""

    def __init__(self, config: config_dict.ConfigDict, init_from: str, workdir: str):
        self.wall_start = time.time()
        pt_config.check(config, "ppo")
        self.init_from, self.workdir = init_from, workdir
        config, self.source_config = pt_config.from_init(config, init_from)
        self.setup = setup = Setup(config, workdir)
        self.config = config = setup.config
        p = config.ppo
        self.total = int(config.train.steps)
        self.updates_per_step = int(p.epochs) * int(p.minibatches)
        # The optimizer sees minibatches: its schedule counts updates, its batch is one minibatch.
        self.update_config = update_config = copy.deepcopy(config)
        update_config.train.batch_size = int(config.train.batch_size) // int(p.minibatches)
        update_config.train.steps = self.total * self.updates_per_step
        update_config.optim.warmup_steps = int(config.optim.warmup_steps) * self.updates_per_step
        setup.model = ActorCritic(config.model)
        setup.abstract_state, setup.state_shardings = step_lib.abstract_train_state(update_config, setup.model, setup.mesh)
        self.policy = model.Transformer(config.model)
        self.reward_config = pt_config.init_config(p.reward_from, config.mesh)
        shape = lambda c: {k: v for k, v in config_lib.to_json(c)["model"].items()  # noqa: E731
                           if k not in config_lib.RUNTIME_MODEL_KEYS}
        if shape(self.reward_config) != shape(config):
            raise ValueError(f"config.ppo.reward_from={p.reward_from} holds a model of another shape than --init_from "
                             f"({init_from}): the value network starts from it, so they must match")
        self.reward_setup = Setup(self.reward_config, p.reward_from)
        self.reward_setup.model = RewardModel(self.reward_config.model)
        self.reward_setup.abstract_state, self.reward_setup.state_shardings = step_lib.abstract_train_state(
            self.reward_config, self.reward_setup.model, setup.mesh)
        self.template = ChatTemplate(setup.tokenizer)
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
        self.last_log: dict = {}

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

    def run(self) -> dict:
        setup, config, p = self.setup, self.config, self.config.ppo
        restored = setup.restore(read_only=False)
        pretrained = init_lib.load_params(self.source_config, self.init_from)  # the reference, always
        reference = jax.jit(lambda params: init_lib.grow_vocab(params, model.padded_vocab_size(config.model)),
                            out_shardings=setup.state_shardings.params["policy"])(pretrained)
        reward_params = self.reward_setup.restore(read_only=True).state.params
        rows = len(self.prompts)
        stream = batches.make_stream({"prompt_index": np.arange(rows)[:, None], "weights": np.ones((rows, 1))}, 1,
                                     int(config.train.batch_size), (0, int(config.train.batch_size)),
                                     seed=int(config.train.seed), shuffle=bool(config.posttrain.shuffle))
        kl = ppo.AdaptiveKLController(float(p.kl_coef), float(p.kl_target), int(p.kl_horizon))
        if restored is not None:
            state, step = restored.state, restored.step
            stream.set_state(restored.data_state["pipeline"])
            kl.coef = float(restored.data_state["kl_coef"])
            previous_wall = float(restored.data_state.get("wall_time_s", 0.0))
            print(f"resumed from checkpoint step {step} in {self.workdir}", flush=True)
        else:
            state = init_lib.initial_state(self.update_config, setup.model, setup.mesh, setup.state_shardings,
                                           (pretrained, reward_params), subtree=("policy", "value"))
            step, previous_wall = 0, 0.0
        self.state = state
        if step >= self.total:
            print(f"{self.workdir} is already trained to step {step} (train.steps={self.total}); nothing to do")
            return metrics.read_summary(self.workdir) or {}
        manager = checkpointing.make_manager(self.workdir, config.checkpoint)
        writer = metrics.MetricsWriter(self.workdir, step, enabled=jax.process_index() == 0)
        wall = lambda: previous_wall + time.time() - self.wall_start  # noqa: E731
        print(f"{config.name} (ppo) from {self.init_from}, rewards from {p.reward_from}: {rows} prompts, "
              f"steps {step}->{self.total}, {self.updates_per_step} updates per step", flush=True)
        with preemption.stop_on_sigterm() as sigterm:
            while step < self.total:
                state, record = self._step(state, step, next(stream)["prompt_index"][:, 0], reference,
                                           reward_params, kl)
                step += 1
                if step % config.train.log_every == 0 or step in (1, self.total):
                    writer.write(step, record)
                    print(f"step {step}/{self.total} | " + " | ".join(f"{k} {v:.4g}" for k, v in record.items()),
                          flush=True)
                self.last_log = record
                stop = preemption.preempted(sigterm, step)
                if stop or step % config.checkpoint.every_steps == 0 or step == self.total:
                    checkpointing.save(manager, step, state, config=config_lib.to_json(config), data_state={
                        "pipeline": stream.get_state(), "kl_coef": kl.coef, "wall_time_s": wall()})
                if stop:
                    print(f"SIGTERM: saved a checkpoint at step {step}; exiting", flush=True)
                    break
        manager.wait_until_finished()
        manager.close()
        writer.close()
        summary = {"name": config.name, "mode": "ppo", "init_from": self.init_from, "reward_from": p.reward_from,
                   "steps": step, "completed": step >= self.total, "wall_time_s": wall(), "final": self.last_log,
                   "config": config_lib.to_json(config)}
        if jax.process_index() == 0:
            metrics.write_summary(self.workdir, summary)
            print(f"done: {step} steps in {metrics.format_duration(wall())}", flush=True)
        self.state = state
        return summary

    def _step(self, state, step: int, prompt_index: np.ndarray, reference, reward_params, kl):
        """One PPO step: sample, score, then epochs x minibatches updates. Returns (state, record)."""
        config, p, setup = self.config, self.config.ppo, self.setup
        prompts = [self.prompts[i] for i in prompt_index]
        key = jax.random.fold_in(jax.random.key(int(config.train.seed)), step)
        # Prompts left-padded to the longest that fits: every rollout batch runs one compiled sampler.
        responses = model.generate(config.model, state.params["policy"], prompts, int(p.max_new_tokens),
                                   temperature=float(p.temperature), rng=key, eos_id=self.template.end_id,
                                   min_prompt_len=int(config.data.seq_len) - int(p.max_new_tokens))
        rows = rollout_rows(prompts, responses, self.template.end_id, int(p.max_new_tokens),
                            int(config.data.seq_len), setup.tokenizer.pad_id)
        batch = sharding.shard_batch(rows, setup.mesh, setup.rules)
        stats = jax.device_get(self.rollout_stats(state.params, reference, reward_params, batch, jnp.float32(kl.coef)))
        record = {name: float(np.mean(stats[name])) for name in ROLLOUT_METRICS}
        record["kl_coef"] = kl.coef
        data = {**rows, **{k: stats[k] for k in ("old_logps", "old_values", "advantages", "returns")}}
        order_rng = np.random.default_rng([int(config.train.seed), step])
        totals: dict[str, float] = {}
        for _ in range(int(p.epochs)):
            for minibatch in np.array_split(order_rng.permutation(len(prompts)), int(p.minibatches)):
                part = sharding.shard_batch({k: v[minibatch] for k, v in data.items()}, setup.mesh, setup.rules)
                state, step_metrics = self.train_step(state, part)
                for name in UPDATE_METRICS:
                    totals[name] = totals.get(name, 0.0) + float(step_metrics[name]) / self.updates_per_step
                if not bool(step_metrics["is_finite"]):
                    raise cli.UserError(f"the PPO loss became NaN/inf at step {step + 1}; stopping without saving it")
        record.update(totals)
        if p.kl_target > 0:
            kl.update(record["kl_k1"], len(prompts))
        return state, record


def train(config: config_dict.ConfigDict, init_from: str, workdir: str) -> dict:
    """PPO on the model of `init_from` in `workdir` (or resume); returns the summary."""
    return PPORun(config, init_from, workdir).run()
