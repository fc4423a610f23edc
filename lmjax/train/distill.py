"""Knowledge distillation: the student learns the teacher's whole next-token distribution, not only the token.

With `distill.teacher_workdir` set, the trainer's objective becomes (Hinton et al. 2015)

    (1 - alpha) * CE(student, tokens) + alpha * T^2 * KL_mix(teacher_T, student_T)

where `_T` is the softmax at temperature T = `distill.temperature` (a higher T exposes the teacher's
ranking of unlikely tokens; T^2 keeps the soft gradients' scale independent of T) and KL_mix is
(1 - r) * KL(teacher || student) + r * KL(student || teacher), r = `distill.reverse_kl`: forward KL
covers every mode of the teacher, reverse KL (MiniLLM, Gu et al. 2024) concentrates on its main one.
The teacher is the newest checkpoint of its run, run online on each batch without gradients; it may
have any shape but must share the student's tokenizer. The `loss` metric stays the hard cross-entropy,
so runs with and without a teacher compare directly; the KL is reported as `kl`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.train.loss import cross_entropy_sums

TOKENIZER_PROBE = "def main(argv):\n    return {'x': [1, 2.5]}\n"


def check(config: Any) -> None:
    """ValueError naming the `distill.*` key whose value cannot work."""
    d = config.distill
    if not float(d.temperature) > 0:
        raise ValueError(f"config.distill.temperature={d.temperature} must be > 0")
    for key in ("alpha", "reverse_kl"):
        if not 0.0 <= float(d[key]) <= 1.0:
            raise ValueError(f"config.distill.{key}={d[key]} must be in [0, 1]")
    if d.teacher_workdir and tuple(config.train.early_exit_layers):
        raise ValueError("config.distill.teacher_workdir and config.train.early_exit_layers cannot be combined")


def kl_sum(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array, weights_BxL: jax.Array,
           temperature: float, reverse: float) -> jax.Array:
    """sum_t w_t * [(1 - reverse) KL(teacher_T || student_T) + reverse KL(student_T || teacher_T)], float32."""
    log_s_BxLxV = jax.nn.log_softmax(student_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    log_t_BxLxV = jax.nn.log_softmax(teacher_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    diff_BxLxV = log_t_BxLxV - log_s_BxLxV
    forward_BxL = jnp.sum(jnp.exp(log_t_BxLxV) * diff_BxLxV, axis=-1)
    reverse_BxL = -jnp.sum(jnp.exp(log_s_BxLxV) * diff_BxLxV, axis=-1)
    kl_BxL = (1.0 - reverse) * forward_BxL + reverse * reverse_BxL
    return jnp.sum(kl_BxL * weights_BxL.astype(jnp.float32))


def distill_loss_sums_fn(config: Any, model: nn.Module, teacher: nn.Module, teacher_params: Any) -> Callable:
    """(params, batch, dropout_key, step) -> (objective, sums) for `make_train_step`: the mix above."""
    check(config)
    temperature, alpha = float(config.distill.temperature), float(config.distill.alpha)
    reverse, z_weight = float(config.distill.reverse_kl), float(config.train.z_loss)
    deterministic = float(config.model.dropout) == 0.0

    def loss_sums(params: Any, batch: dict[str, jax.Array], dropout_key: jax.Array, step: jax.Array):
        where = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        teacher_logits_BxLxV = jax.lax.stop_gradient(
            teacher.apply({"params": teacher_params}, batch["inputs"], **where))
        logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                                   rngs={"dropout": dropout_key}, **where)
        loss_sum, weight_sum, z_sum = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
        soft_sum = kl_sum(logits_BxLxV, teacher_logits_BxLxV, batch["weights"], temperature, reverse)
        objective = (1.0 - alpha) * loss_sum + alpha * temperature**2 * soft_sum + z_weight * z_sum
        return objective, {"loss_sum": loss_sum, "weight_sum": weight_sum, "z_sum": z_weight * z_sum,
                           "kl_sum": soft_sum}

    return loss_sums


def load_teacher(setup: Any) -> tuple[nn.Module, Any]:
    """(teacher model, its params) from `distill.teacher_workdir`, after checking it reads the student's tokens."""
    from lmjax.train import workdir as workdir_lib  # workdir imports the train step, which needs no teacher

    teacher_dir = setup.config.distill.teacher_workdir
    teacher_config = workdir_lib.saved_config(teacher_dir)
    teacher_setup = workdir_lib.Setup(teacher_config, teacher_dir)
    same = (teacher_setup.config.model.vocab_size == setup.config.model.vocab_size
            and np.array_equal(teacher_setup.tokenizer.token_bytes(), setup.tokenizer.token_bytes())
            and teacher_setup.tokenizer.encode(TOKENIZER_PROBE) == setup.tokenizer.encode(TOKENIZER_PROBE))
    if not same:
        raise ValueError(
            f"config.distill.teacher_workdir={teacher_dir}: the teacher's tokenizer (vocab "
            f"{teacher_setup.config.model.vocab_size}) is not the student's (vocab {setup.config.model.vocab_size}); "
            f"train the student with --config.data.tokenizer_path={teacher_dir}/tokenizer.model")
    return teacher_setup.model, teacher_setup.restore(read_only=True).state.params


def trainer_loss_sums_fn(setup: Any) -> Callable | None:
    """The trainer's objective: distillation when `distill.teacher_workdir` is set, else None (the default)."""
    if not setup.config.distill.teacher_workdir:
        return None
    check(setup.config)
    teacher, teacher_params = load_teacher(setup)
    return distill_loss_sums_fn(setup.config, setup.model, teacher, teacher_params)
