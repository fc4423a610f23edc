"""Training: optimizer, schedules, loss, the sharded train state and the jitted steps."""

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
