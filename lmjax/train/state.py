"""The train state: everything a step reads and writes, as one plain pytree."""

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """`step` counts optimizer updates (int32 scalar); `params` is the unboxed parameter tree;
    `opt_state` is optax's state; `rng` is a raw uint32 key that never changes: each step folds
    in its step number (and each microbatch its index), so a resumed run draws the same dropout
    masks as the uninterrupted one, and a raw key checkpoints like any other array."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
