"""SFT, DPO and reward-model training: `train(mode, config, init_from, workdir)` runs any mode
(PPO included, through ppo_trainer.py) from the checkpoint in `init_from`, or resumes it.

It is the pretraining machinery with other rows and another loss: the workdir is opened with
`Setup` (checked config, tokenizer, mesh, sharded abstract state), the step is
`lmjax.train.step.make_train_step` (same sharding rules, microbatches, donation) given a
post-training loss, batches come from the same resumable stream, and the loop that checkpoints,
resumes, logs and evaluates is the one every post-training mode shares (loop.py).

DPO's reference is the model of `init_from`: the reference log-probs of every train and eval pair
are computed once, before the first step (and again, identically, on resume), and ride along in
the batches; the reference parameters are not kept in memory during training.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from lmjax import model, sharding
from lmjax.posttrain import batches, dataset, loop, losses
from lmjax.posttrain import init as init_lib
from lmjax.posttrain.reward_model import RewardModel
from lmjax.train import checkpointing, metrics
from lmjax.train import step as step_lib

LOGGED = ("loss", "lr", "grad_norm", "accuracy", "reward_margin", "chosen_reward", "rejected_reward", "reward_mean")


class PosttrainRun(loop.Run):
    """One SFT, DPO or reward-model run. `__init__` reads and checks everything and writes nothing; `run()` trains."""

    logged = LOGGED

    def __init__(self, mode: str, config: config_dict.ConfigDict, init_from: str, workdir: str):
        if mode == "ppo":
            raise ValueError("PPO runs through lmjax.posttrain.ppo_trainer.PPORun (or train('ppo', ...))")
        super().__init__(mode, config, init_from, workdir)
        setup, config = self.setup, self.config
        if mode == "reward":
            setup.model = RewardModel(config.model)
            setup.abstract_state, setup.state_shardings = step_lib.abstract_train_state(config, setup.model, setup.mesh)
        self.rows = self._rows(config.posttrain.train_file)
        self.eval_rows = self._rows(config.posttrain.eval_file) if config.posttrain.eval_file else None
        loss_fn = {
            "sft": step_lib.lm_loss_sums_fn,
            "dpo": losses.dpo_loss_sums_fn,
            "reward": losses.reward_loss_sums_fn,
        }[mode](config, setup.model)
        self.train_step = step_lib.make_train_step(config, setup.model, setup.mesh, setup.state_shardings, loss_fn)
        self.eval_sums = jax.jit(
            lambda params, batch: loss_fn(params, batch, jax.random.PRNGKey(0), 0)[1],
            in_shardings=(setup.state_shardings.params, sharding.batch_sharding(setup.mesh, setup.rules)),
            out_shardings=sharding.replicated(setup.mesh),
        )
        self.last_eval: dict = {}
        self.samples: list[str] = []

    def _rows(self, path: str) -> dict[str, np.ndarray]:
        seq_len, pad_id = int(self.config.data.seq_len), self.setup.tokenizer.pad_id
        if self.mode == "sft":
            examples = dataset.read_jsonl(path, "sft")
            return batches.sft_rows(self.template, examples, seq_len, pad_id=pad_id,
                                    prompt_loss_weight=float(self.config.sft.prompt_loss_weight),
                                    pack=bool(self.config.sft.packing))
        return batches.pair_rows(self.template, dataset.read_jsonl(path, "pairs"), seq_len, pad_id=pad_id)

    # --- the mode's part of the loop (lmjax.posttrain.loop) --------------------------------------

    def _start(self, restored: checkpointing.Restored | None) -> Any:
        setup, config = self.setup, self.config
        state = None
        if restored is None or self.mode == "dpo":
            pretrained = init_lib.load_params(self.source_config, self.init_from)
            subtree = "transformer" if self.mode == "reward" else None
            state = init_lib.initial_state(config, setup.model, setup.mesh, setup.state_shardings, pretrained, subtree)
        if self.mode == "dpo":  # the step-0 model is the reference, also when resuming
            for rows in (self.rows, self.eval_rows):
                if rows is not None:
                    rows["ref_logps"] = self._pair_logps(state.params, rows)
        self.stream = batches.make_stream(self.rows, int(config.data.seq_len), int(config.train.batch_size),
                                          setup.batch_rows(config.train.batch_size), seed=int(config.train.seed),
                                          shuffle=bool(config.posttrain.shuffle))
        return state if restored is None else None

    def _step(self, state: Any, step: int) -> tuple[Any, dict]:
        return self.train_step(state, sharding.shard_batch(next(self.stream), self.setup.mesh, self.setup.rules))

    def _evaluate_due(self, step: int) -> bool:
        return self.eval_rows is not None and (step % self.config.eval.every_steps == 0 or step == self.total)

    def _evaluation(self, state: Any, step: int, writer: metrics.MetricsWriter) -> dict[str, float]:
        self.last_eval = self.evaluate(state.params)
        if self.mode != "reward" and self.config.eval.num_samples:
            self.samples = self._samples(state.params, step, writer)
        return self.last_eval

    def _describe(self, step: int) -> str:
        return (f"{self.config.name} ({self.mode}) from {self.init_from}: {model.param_count(self.config.model):,} "
                f"parameters, {self.stream.rows_per_epoch} rows, steps {step}->{self.total}, "
                f"{len(jax.devices())} device(s)")

    def _summary_extra(self) -> dict:
        return {"final_eval": self.last_eval, "samples": self.samples}

    # --- its pieces ------------------------------------------------------------------------------

    def _global_batches(self, rows: dict[str, np.ndarray]):
        """The rows in order, in global batches of train.batch_size (the last padded with weight-0
        rows, which every loss leaves out), as this process's sharded part."""
        size = int(self.config.train.batch_size)
        start, stop = self.setup.batch_rows(size)
        count = len(rows["weights"])
        for first in range(0, count, size):
            index = np.arange(first, first + size)
            part = {k: v[np.minimum(index, count - 1)][start:stop] for k, v in rows.items()}
            part["weights"] = part["weights"] * (index < count)[start:stop].reshape(-1, *[1] * (rows["weights"].ndim - 1))
            yield first, min(size, count - first), sharding.shard_batch(part, self.setup.mesh, self.setup.rules)

    def _pair_logps(self, params: Any, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Sequence log-probs [N, 2] of every pair's responses under `params` (the reference)."""
        pair_logps = losses.pair_logps_fn(self.setup.model)
        fn = jax.jit(lambda p, b: pair_logps(p, b, jax.random.PRNGKey(0)),
                     out_shardings=sharding.replicated(self.setup.mesh))
        out = np.zeros((len(rows["weights"]), 2), np.float32)
        for first, n, batch in self._global_batches({k: rows[k] for k in ("inputs", "targets", "weights")}):
            out[first:first + n] = np.asarray(fn(params, batch))[:n]
        return out

    def evaluate(self, params: Any) -> dict[str, float]:
        """Every metric of the loss over the whole eval file, as `val_<name>`."""
        totals: dict[str, float] = {}
        for _, _, batch in self._global_batches(self.eval_rows):
            for key, value in jax.device_get(self.eval_sums(params, batch)).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        weight = max(totals.pop("weight_sum"), 1e-30)
        totals.pop("z_sum", None)
        return {f"val_{key.removesuffix('_sum')}": value / weight for key, value in totals.items()}

    def _samples(self, params: Any, step: int, writer: metrics.MetricsWriter) -> list[str]:
        """Greedy (by default) answers to the first `eval.num_samples` prompts of the eval file."""
        path = self.config.posttrain.eval_file
        examples = dataset.read_jsonl(path, "sft" if self.mode == "sft" else "pairs")[: self.config.eval.num_samples]
        prompts = [ex["prompt"] if "prompt" in ex else ex["messages"][:-1] for ex in examples]
        new = model.generate(self.config.model, params, [self.template.prompt_ids(p) for p in prompts],
                             int(self.config.eval.sample_tokens), temperature=float(self.config.eval.sample_temperature),
                             rng=jax.random.key(step), eos_id=self.template.end_id)
        texts = [f"{p[-1]['content']!r} -> {self.template.decode(ids)!r}" for p, ids in zip(prompts, new)]
        for i, text in enumerate(texts):
            writer.write_text(step, f"sample_{i}", text)
            if self.is_main:
                print(f"--- sample {i} at step {step}: {text}", flush=True)
        return texts


def train(mode: str, config: config_dict.ConfigDict, init_from: str, workdir: str) -> dict:
    """Post-train (`mode`: sft | dpo | reward | ppo) the model of `init_from` in `workdir`, or resume; the summary."""
    if mode == "ppo":
        from lmjax.posttrain import ppo_trainer

        return ppo_trainer.train(config, init_from, workdir)
    return PosttrainRun(mode, config, init_from, workdir).run()
