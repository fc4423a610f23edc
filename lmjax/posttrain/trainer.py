"""The post-training loop: `train(mode, config, init_from, workdir)` runs SFT, DPO or reward-model
training from the checkpoint in `init_from`, or resumes it.

It is the pretraining machinery with other rows and another loss: the workdir is opened with
`Setup` (checked config, tokenizer, mesh, sharded abstract state), the step is
`lmjax.train.step.make_train_step` (same sharding rules, microbatches, donation) given a
post-training loss, batches come from the same resumable stream, and checkpoints, metrics.jsonl,
TensorBoard and summary.json are written as in pretraining. A resumed run restores the state and
the data position and continues exactly.

DPO's reference is the model of `init_from`: the reference log-probs of every train and eval pair
are computed once, before the first step (and again, identically, on resume), and ride along in
the batches; the reference parameters are not kept in memory during training.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from lmjax import cli, model, sharding
from lmjax import config as config_lib
from lmjax.posttrain import batches, dataset, losses
from lmjax.posttrain import config as pt_config
from lmjax.posttrain import init as init_lib
from lmjax.posttrain.chat import ChatTemplate
from lmjax.posttrain.reward_model import RewardModel
from lmjax.train import checkpointing, metrics, preemption
from lmjax.train import step as step_lib
from lmjax.train.workdir import Setup

LOGGED = ("loss", "lr", "grad_norm", "accuracy", "reward_margin", "chosen_reward", "rejected_reward", "reward_mean")


class PosttrainRun:
    """One run. `__init__` reads and checks everything and writes nothing; `run()` trains."""

    def __init__(self, mode: str, config: config_dict.ConfigDict, init_from: str, workdir: str):
        self.wall_start = time.time()
        pt_config.check(config, mode)
        if mode == "ppo":
            raise ValueError("PPO runs through lmjax.posttrain.ppo_trainer.PPORun (or train('ppo', ...))")
        self.mode, self.init_from, self.workdir = mode, init_from, workdir
        config, self.source_config = pt_config.from_init(config, init_from)
        self.setup = setup = Setup(config, workdir)
        self.config = config = setup.config
        if mode == "reward":
            setup.model = RewardModel(config.model)
            setup.abstract_state, setup.state_shardings = step_lib.abstract_train_state(config, setup.model, setup.mesh)
        self.template = ChatTemplate(setup.tokenizer)
        self.is_main = jax.process_index() == 0
        self.total = int(config.train.steps)
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
        self.last_log: dict = {}
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

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        setup, config = self.setup, self.config
        restored = setup.restore(read_only=False)
        pretrained = None
        if restored is None or self.mode == "dpo":
            pretrained = init_lib.load_params(self.source_config, self.init_from)
        if self.mode == "dpo":
            reference = init_lib.initial_state(config, setup.model, setup.mesh, setup.state_shardings, pretrained)
            for rows in (self.rows, self.eval_rows):
                if rows is not None:
                    rows["ref_logps"] = self._pair_logps(reference.params, rows)
            if restored is not None:
                del reference
        stream = batches.make_stream(self.rows, int(config.data.seq_len), int(config.train.batch_size),
                                     setup.batch_rows(config.train.batch_size), seed=int(config.train.seed),
                                     shuffle=bool(config.posttrain.shuffle))
        if restored is not None:
            state, step = restored.state, restored.step
            stream.set_state(restored.data_state["pipeline"])
            previous_wall = float(restored.data_state.get("wall_time_s", 0.0))
            print(f"resumed from checkpoint step {step} in {self.workdir}", flush=True)
        else:
            subtree = "transformer" if self.mode == "reward" else None
            state = (reference if self.mode == "dpo" else
                     init_lib.initial_state(config, setup.model, setup.mesh, setup.state_shardings, pretrained, subtree))
            step, previous_wall = 0, 0.0
        self.state = state
        if step >= self.total:
            print(f"{self.workdir} is already trained to step {step} (train.steps={self.total}); nothing to do")
            return metrics.read_summary(self.workdir) or {}
        manager = checkpointing.make_manager(self.workdir, config.checkpoint)
        writer = metrics.MetricsWriter(self.workdir, step, enabled=self.is_main)
        if self.is_main:
            print(f"{config.name} ({self.mode}) from {self.init_from}: {model.param_count(config.model):,} parameters, "
                  f"{stream.rows_per_epoch} rows, steps {step}->{self.total}, {len(jax.devices())} device(s)", flush=True)
        if step == 0 and self.eval_rows is not None:
            self._log(0, state, None, writer, evaluate=True)
        wall = lambda: previous_wall + time.time() - self.wall_start  # noqa: E731
        with preemption.stop_on_sigterm() as sigterm:
            while step < self.total:
                batch = sharding.shard_batch(next(stream), setup.mesh, setup.rules)
                state, step_metrics = self.train_step(state, batch)
                step += 1
                evaluate = self.eval_rows is not None and (step % config.eval.every_steps == 0 or step == self.total)
                if evaluate or step % config.train.log_every == 0 or step == self.total or step == 1:
                    self._log(step, state, step_metrics, writer, evaluate)
                stop = preemption.preempted(sigterm, step)
                if stop or step % config.checkpoint.every_steps == 0 or step == self.total:
                    self._check_finite(step_metrics, step)
                    checkpointing.save(manager, step, state, config=config_lib.to_json(config),
                                       data_state={"pipeline": stream.get_state(), "wall_time_s": wall()})
                if stop:
                    print(f"SIGTERM: saved a checkpoint at step {step}; exiting", flush=True)
                    break
        manager.wait_until_finished()
        manager.close()
        writer.close()
        summary = {
            "name": config.name, "mode": self.mode, "init_from": self.init_from, "steps": step,
            "completed": step >= self.total, "wall_time_s": wall(), "final": self.last_log,
            "final_eval": self.last_eval, "samples": self.samples, "config": config_lib.to_json(config),
        }
        if self.is_main:
            metrics.write_summary(self.workdir, summary)
            print(f"done: {step} steps in {metrics.format_duration(wall())}", flush=True)
        self.state = state
        return summary

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

    def _log(self, step: int, state: Any, step_metrics: dict | None, writer: metrics.MetricsWriter,
             evaluate: bool) -> None:
        record = {}
        if step_metrics is not None:
            self._check_finite(step_metrics, step)
            record = {k: float(step_metrics[k]) for k in LOGGED if k in step_metrics}
        if evaluate:
            self.last_eval = self.evaluate(state.params)
            record.update(self.last_eval)
            if self.mode != "reward" and self.config.eval.num_samples:
                self.samples = self._samples(state.params, step, writer)
        writer.write(step, record)
        if self.is_main:
            print(f"step {step}/{self.total} | " + " | ".join(f"{k} {v:.4g}" for k, v in record.items()), flush=True)
        if step_metrics is not None:
            self.last_log = record

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

    def _check_finite(self, step_metrics: dict, step: int) -> None:
        if not bool(step_metrics["is_finite"]):
            raise cli.UserError(f"the {self.mode} loss became NaN/inf at step {step}; stopping without saving it. "
                                "Lower optim.lr or set optim.clip.")


def train(mode: str, config: config_dict.ConfigDict, init_from: str, workdir: str) -> dict:
    """Post-train (`mode`: sft | dpo | reward | ppo) the model of `init_from` in `workdir`, or resume; the summary."""
    if mode == "ppo":
        from lmjax.posttrain import ppo_trainer

        return ppo_trainer.train(config, init_from, workdir)
    return PosttrainRun(mode, config, init_from, workdir).run()
