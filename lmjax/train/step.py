"""Creating the sharded train state, and the jitted train and eval steps.

The pattern (MaxText, Flax lm1b): trace `model.init` abstractly, read the logical names of every
parameter, turn them into shardings with the rules table, then `jax.jit(init, out_shardings=...)`
so each device creates only its own shards. The steps are jitted with the same shardings, the state
donated, and the microbatch loop is a `lax.scan` inside the one compiled step.

Nothing here needs concrete arrays or local devices until a function is called, so the steps lower
on `jax.ShapeDtypeStruct` inputs over compile-only devices (`abstract_train_state` gives them).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lmjax import sharding
from lmjax.model import moe as moe_lib
from lmjax.model import early_exit
from lmjax.train import scheduled_sampling
from lmjax.train.loss import cross_entropy_sums, safe_mean
from lmjax.train.optimizer import decay_mask, make_optimizer
from lmjax.train.schedules import make_schedule
from lmjax.train.state import TrainState

METRICS = ("loss", "grad_norm", "update_norm", "lr", "is_finite", "weight_sum", "z_loss")


def abstract_params(config: Any, model: nn.Module) -> Any:
    """The boxed (`nn.Partitioned`) parameter tree as ShapeDtypeStructs; costs no FLOPs."""
    tokens_1xL = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with nn.logical_axis_rules(()):  # no activation constraints: a batch of 1 does not split
        return jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, tokens_1xL)["params"], key)


def make_tx(config: Any, boxed_params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule, as both the state creation and the step must agree on."""
    schedule = make_schedule(config.optim, int(config.train.steps))
    mask = decay_mask(boxed_params, bool(config.optim.decay_embeddings))
    return make_optimizer(config.optim, schedule, mask), schedule


def _like_params(tree: Any, params: Any, param_shardings: Any, replicated: Any) -> Any:
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and has
    its shape (Adam's mu and nu, Lion's momentum, ...) is sharded like that parameter; anything
    else (step counts, Adafactor's factored row/column statistics) is replicated."""
    by_path = {
        path: (leaf.shape, shard)
        for (path, leaf), shard in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings)
        )
    }

    def pick(path: tuple[Any, ...], leaf: Any) -> Any:
        for start in range(len(path)):
            shape, shard = by_path.get(path[start:], (None, None))
            if shard is not None and shape == leaf.shape:
                return shard
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract_train_state(config: Any, model: nn.Module, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """(state as ShapeDtypeStructs carrying their shardings, the matching tree of NamedShardings)."""
    rules = sharding.rules(config.mesh)
    boxed = abstract_params(config, model)
    tx, _ = make_tx(config, boxed)
    param_shardings = sharding.param_shardings(boxed, mesh, rules)
    params = nn.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    replicated = sharding.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=_like_params(opt_state, params, param_shardings, replicated),
        rng=replicated,
    )
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return abstract, shardings


def create_train_state(config: Any, model: nn.Module, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """(state, state_shardings): fresh parameters from `config.train.seed`, created sharded."""
    _, shardings = abstract_train_state(config, model, mesh)
    tx, _ = make_tx(config, abstract_params(config, model))
    tokens_1xL = jnp.zeros((1, config.data.seq_len), jnp.int32)

    def init(seed_key: jax.Array) -> TrainState:
        params_key, dropout_key, state_key = jax.random.split(seed_key, 3)
        with nn.logical_axis_rules(()):  # as in abstract_params
            boxed = model.init({"params": params_key, "dropout": dropout_key}, tokens_1xL)["params"]
        params = nn.unbox(boxed)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_key)

    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(int(config.train.seed)))
    return state, shardings


def lm_loss_sums_fn(config: Any, model: nn.Module) -> Callable[..., Any]:
    """(params, batch, dropout_key, step) -> (objective, sums) for value_and_grad: the next-token loss.

    `sums` holds `loss_sum`, `weight_sum` and `z_sum`; a loss of another kind (post-training's
    pairwise losses) has the same form, and may add sums of its own (see make_train_step).
    A MoE model's router losses (means over its layers) enter the objective weighted by the batch's
    token weight, so that dividing by the total weight leaves them as configured; they and the
    per-expert load come back as `moe_<stat>_sum`, hence the metrics `moe_<stat>`.
    With `train.early_exit_layers`, the objective is lmjax.model.early_exit's weighted sum over exits."""
    z_weight = float(config.train.z_loss)
    moe = moe_lib.enabled(config.model)
    deterministic = float(config.model.dropout) == 0.0
    sampling = config.train.scheduled_sampling != "none"
    exits = early_exit.check_exits(config.model, config.train.early_exit_layers)
    if exits and moe:
        raise ValueError("config.train.early_exit_layers does not support a Mixture-of-Experts model (model.moe)")
    num_layers = int(config.model.num_layers)
    exit_weights = early_exit.exit_weights(num_layers, exits, float(config.train.early_exit_scale))

    def loss_sums(params: Any, batch: dict[str, jax.Array], dropout_key: jax.Array, step: jax.Array):
        inputs = batch["inputs"]
        if sampling:  # a first pass, without gradients, guesses every input; the second trains on a mix
            guess_logits_BxLxV = model.apply({"params": jax.lax.stop_gradient(params)}, inputs,
                                             positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
            probability = scheduled_sampling.replace_probability(config.train, step)
            inputs = scheduled_sampling.mix_inputs(inputs, jnp.argmax(guess_logits_BxLxV, axis=-1), batch["weights"],
                                                   probability, jax.random.fold_in(dropout_key, 1))
        forward = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                       deterministic=deterministic, rngs={"dropout": dropout_key})
        if exits:
            return _early_exit_sums(params, inputs, batch, forward)
        logits_BxLxV = model.apply({"params": params}, inputs, **forward,
                                   mutable=[moe_lib.COLLECTION] if moe else False)
        if moe:
            logits_BxLxV, sown = logits_BxLxV
            router_stats = moe_lib.layer_means(sown[moe_lib.COLLECTION])
        loss_sum, weight_sum, z_sum = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
        objective = loss_sum + z_weight * z_sum if z_weight else loss_sum
        sums = {"loss_sum": loss_sum, "weight_sum": weight_sum, "z_sum": z_weight * z_sum}
        if moe:
            objective = objective + weight_sum * moe_lib.aux_loss(config.model.moe, router_stats)
            sums.update({f"moe_{name}_sum": weight_sum * value for name, value in router_stats.items()})
        return objective, sums

    def _early_exit_sums(params: Any, inputs: jax.Array, batch: dict[str, jax.Array], forward: dict):
        """The weighted sum of every exit's loss; `loss` stays the full model's, each exit is a metric."""
        logits = early_exit.exit_logits(model, params, inputs, exits, **forward)
        loss_sum, weight_sum, z_sum = cross_entropy_sums(logits.pop(num_layers), batch["targets"], batch["weights"])
        objective = exit_weights[num_layers] * loss_sum + z_weight * z_sum
        sums = {"loss_sum": loss_sum, "weight_sum": weight_sum, "z_sum": z_weight * z_sum}
        for layers, logits_BxLxV in logits.items():
            exit_sum, _, _ = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
            objective = objective + exit_weights[layers] * exit_sum
            sums[f"exit{layers}_loss_sum"] = exit_sum
        return objective, sums

    return loss_sums


def _check_batch_split(config: Any, mesh: Mesh, rules: sharding.Rules) -> None:
    batch_ways = sharding.axes_size(mesh, sharding.batch_sharding(mesh, rules).spec[0])
    microbatches = int(config.train.microbatches)
    rows = int(config.train.batch_size)
    if rows % microbatches or (rows // microbatches) % batch_ways:
        raise ValueError(
            f"config.train.batch_size={rows} / microbatches={microbatches} must give a whole "
            f"microbatch whose rows split over the {batch_ways} devices of the 'batch' mesh axes."
        )


def make_train_step(
    config: Any, model: nn.Module, mesh: Mesh, state_shardings: TrainState, loss_sums_fn: Callable | None = None
) -> Callable:
    """The jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

    `loss_sums_fn` (default: `lm_loss_sums_fn`, the next-token loss) maps (params, batch,
    dropout_key, step) to (objective, sums); every extra `<name>_sum` in `sums` is reported as the
    metric `<name>` = sum / weight_sum, e.g. the pairwise accuracy of a reward model.

    `batch` holds [B, L] arrays `inputs`, `targets`, `weights` (+ optional `positions`,
    `segment_ids`), sharded over rows by the 'batch' rule. With k = `train.microbatches`, the rows
    are split into k interleaved chunks (chunk i = rows i, i+k, ...: every device keeps its own
    rows, no data moves) and scanned; gradients and loss/weight sums add up, and are divided by the
    total weight once, so the step equals one step on the whole batch.
    """
    rules = sharding.rules(config.mesh)
    tx, schedule = make_tx(config, abstract_params(config, model))
    grad_fn = jax.value_and_grad(loss_sums_fn or lm_loss_sums_fn(config, model), has_aux=True)
    microbatches = int(config.train.microbatches)
    _check_batch_split(config, mesh, rules)
    batch_ways = sharding.batch_sharding(mesh, rules).spec[0]
    chunked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, batch_ways))

    def accumulate(params: Any, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array):
        if microbatches == 1:
            (_, sums), grads = grad_fn(params, batch, key, step)
            return grads, sums

        def to_chunks(x_BxL: jax.Array) -> jax.Array:
            x_kxBk = x_BxL.reshape(x_BxL.shape[0] // microbatches, microbatches, *x_BxL.shape[1:])
            return jax.lax.with_sharding_constraint(jnp.swapaxes(x_kxBk, 0, 1), chunked)

        def body(carry, chunk_and_index):
            grads_acc, sums_acc = carry
            chunk, i = chunk_and_index
            (_, sums), grads = grad_fn(params, chunk, jax.random.fold_in(key, i), step)
            return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

        zeros = jax.lax.with_sharding_constraint(
            jax.tree.map(jnp.zeros_like, params), state_shardings.params
        )
        chunks = (jax.tree.map(to_chunks, batch), jnp.arange(microbatches))
        first = jax.tree.map(lambda x: x[0], chunks[0])
        sums_shape = jax.eval_shape(grad_fn, params, first, key, step)[0][1]
        init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
        (grads, sums), _ = jax.lax.scan(body, init, chunks)
        return grads, sums

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        with sharding.activation_sharding(mesh, rules):
            key = jax.random.fold_in(state.rng, state.step)
            grads, sums = accumulate(state.params, batch, key, state.step)
            loss_sum, weight_sum, z_sum = sums["loss_sum"], sums["weight_sum"], sums["z_sum"]
            # One scalar for every element (a division per element is a pass of its own on CPU).
            per_weight = safe_mean(jnp.float32(1.0), weight_sum)
            grads = jax.tree.map(lambda g: g * per_weight.astype(g.dtype), grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        loss, grad_norm = safe_mean(loss_sum, weight_sum), optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "lr": schedule(state.step),
            "is_finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
            "weight_sum": weight_sum,
            "z_loss": safe_mean(z_sum, weight_sum),
        }
        for name, total in sums.items():
            if name not in ("loss_sum", "weight_sum", "z_sum"):
                metrics[name.removesuffix("_sum")] = safe_mean(total, weight_sum)
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(config: Any, model: nn.Module, mesh: Mesh, state_shardings: TrainState) -> Callable:
    """The jitted `eval_step(params, batch) -> {'loss_sum', 'weight_sum', 'bytes_sum'}` (sum these over
    the eval batches, then divide once; the z-loss is not part of it). `bytes_sum` adds up the batch's
    optional `target_bytes` field: the UTF-8 bytes of each weighted target token."""
    rules = sharding.rules(config.mesh)

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        with sharding.activation_sharding(mesh, rules):
            logits_BxLxV = model.apply(
                {"params": params},
                batch["inputs"],
                positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"),
                deterministic=True,
            )
        loss_sum, weight_sum, _ = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
        bytes_sum = jnp.sum(batch["target_bytes"]) if "target_bytes" in batch else jnp.float32(0)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "bytes_sum": bytes_sum}

    return jax.jit(
        eval_step,
        in_shardings=(state_shardings.params, sharding.batch_sharding(mesh, rules)),
        out_shardings=sharding.replicated(mesh),
    )
