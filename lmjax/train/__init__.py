"""Training: the step and its parts, and the loop around it.

The step (imported here):
  loss.py          cross-entropy as (sum, weight) so any split of a batch adds up exactly
  optimizer.py     clipping, AdamW / Adafactor / Lion / SGD with masked, decoupled decay
  schedules.py     warmup, then cosine / linear / constant / WSD
  state.py         TrainState: params, optimizer state, step, rng as one pytree
  step.py          the sharded state and the jitted train and eval steps
  scheduled_sampling.py  training on inputs mixed with the model's own guesses (off by default)
  mfu.py           model FLOPs utilization
The loop (import the modules themselves, e.g. `from lmjax.train import trainer`):
  workdir.py       opening a run directory: checked config, tokenizer, mesh, model, restore
  trainer.py       `train(config, workdir)`: the loop, logging, evaluation, checkpoints, summary
  validation.py    the fixed validation sample, loss / perplexity / bits per byte, `--mode=eval`
  checkpointing.py orbax checkpoints that resume, and survive kills and bad reads
  metrics.py       metrics.jsonl, TensorBoard, summary.json, the console line
  preemption.py    SIGTERM and the multi-host preemption sync point
  wsd.py           WSD decay points: shorter token budgets reported by one run
  distill.py       knowledge distillation from a teacher run's logits (`distill.teacher_workdir`)
  pruning.py       magnitude / Wanda / 2:4 / head masks, fine-tuned with the mask fixed (`prune.from_workdir`)
"""

from lmjax.train.loss import cross_entropy_sums, safe_mean
from lmjax.train.mfu import mfu
from lmjax.train.optimizer import decay_mask, make_optimizer
from lmjax.train.schedules import make_schedule
from lmjax.train.state import TrainState
from lmjax.train.step import (
    METRICS,
    abstract_params,
    abstract_train_state,
    create_train_state,
    make_eval_step,
    make_train_step,
    make_tx,
)

__all__ = [
    "METRICS",
    "TrainState",
    "abstract_params",
    "abstract_train_state",
    "create_train_state",
    "cross_entropy_sums",
    "decay_mask",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "make_tx",
    "mfu",
    "safe_mean",
]
