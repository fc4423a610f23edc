"""The start of a post-training run: the pretrained (or SFT) parameters of `--init_from`, grown to
the run's vocabulary, placed on the run's mesh, with a fresh optimizer state.

The checkpoint is read through `Setup(init_config, init_from).restore`, which checks that it holds
the model its config describes; the parameters land directly on this run's shardings. New
vocabulary rows (the chat template's special ids) start at the mean of the pretrained rows: an
"average token", neither random nor zero.

Which kind of model a checkpoint holds (a language model, a reward model, PPO's policy and value
network) is read from its parameter names in the checkpoint's metadata, without loading arrays,
so that pointing `--init_from` or `ppo.reward_from` at the wrong run fails with one clear line
before anything is built, not with orbax's tree mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from ml_collections import config_dict

from lmjax.model import padded_vocab_size
from lmjax.train import checkpointing
from lmjax.train import step as step_lib
from lmjax.train.state import TrainState
from lmjax.train.workdir import Setup


def load_params(source_config: config_dict.ConfigDict, init_from: str) -> Any:
    """The parameters of the newest checkpoint of `init_from` (sharded on `source_config.mesh`)."""
    restored = Setup(source_config, init_from).restore(read_only=True)
    if restored is None:
        raise FileNotFoundError(f"--init_from={init_from} holds no checkpoint")
    return restored.state.params


LANGUAGE_MODEL, REWARD_MODEL, ACTOR_CRITIC = "language model", "reward model", "PPO policy and value network"


def model_kind(workdir: str) -> str:
    """What the newest checkpoint of `workdir` holds: LANGUAGE_MODEL, REWARD_MODEL or ACTOR_CRITIC."""
    step = checkpointing.committed_steps(workdir)[-1]
    with ocp.StandardCheckpointer() as reader:
        metadata = reader.metadata(checkpointing.checkpoint_dir(workdir) / str(step) / "state")
    names = set(metadata.item_metadata.tree["params"])
    if names == {"transformer", "reward_head"}:
        return REWARD_MODEL
    if names == {"policy", "value"}:
        return ACTOR_CRITIC
    return LANGUAGE_MODEL


def require_kind(workdir: str, kind: str, flag: str, hint: str) -> None:
    """A ValueError naming `flag` when the newest checkpoint of `workdir` holds another kind of model."""
    found = model_kind(workdir)
    if found != kind:
        raise ValueError(f"{flag}={workdir} holds a {found}, not a {kind}: {hint}")


def grow_vocab(params: Any, vocab_size: int) -> Any:
    """`embedding` [V0, D] (and an untied `head` [D, V0]) with rows added up to `vocab_size`."""

    def grow(path: tuple, leaf: jax.Array) -> jax.Array:
        name = str(getattr(path[-1], "key", ""))
        if len(path) != 1 or name not in ("embedding", "head"):
            return leaf
        axis = 0 if name == "embedding" else 1
        extra = vocab_size - leaf.shape[axis]
        if extra < 0:
            raise ValueError(f"cannot shrink {name} {leaf.shape} to a vocabulary of {vocab_size}")
        mean = jnp.mean(leaf, axis=axis, keepdims=True)
        return jnp.concatenate([leaf, jnp.repeat(mean, extra, axis=axis)], axis=axis)

    return jax.tree_util.tree_map_with_path(grow, params)


def _into(fresh: Any, pretrained: Any, where: str) -> Any:
    """`fresh` with every leaf that `pretrained` also has replaced by it (shapes must agree)."""
    if not isinstance(fresh, Mapping):
        if fresh.shape != pretrained.shape:
            raise ValueError(f"--init_from parameter {where} has shape {pretrained.shape}, this model needs {fresh.shape}")
        return pretrained
    missing = [key for key in fresh if key not in pretrained]
    if missing:
        raise ValueError(f"--init_from has no parameter {where}/{missing[0]}: it holds another kind of model")
    return {key: _into(value, pretrained[key], f"{where}/{key}") for key, value in fresh.items()}


def initial_state(config: config_dict.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                  state_shardings: TrainState, pretrained: Any, subtree: str | tuple[str, ...] | None = None
                  ) -> TrainState:
    """Step 0 of a post-training run: `pretrained` params and a fresh optimizer state. With `subtree`
    they go under `params[subtree]` (a reward model's trunk; with a tuple of names, `pretrained` is a
    tuple of trees, e.g. PPO's policy and value network) and the other parameters are freshly
    initialised."""
    boxed = step_lib.abstract_params(config, model)
    tx, _ = step_lib.make_tx(config, boxed)
    vocab_size = padded_vocab_size(config.model)
    names = (subtree,) if isinstance(subtree, str) else subtree
    trees = (pretrained,) if isinstance(subtree, str) else pretrained
    if subtree is None:
        names, trees = None, pretrained
    if names is None or set(names) == set(boxed):  # every parameter is pretrained: shapes suffice
        fresh = {"params": nn.unbox(boxed), "rng": jax.random.PRNGKey(int(config.train.seed))}
    else:
        state = step_lib.create_train_state(config, model, mesh)[0]
        fresh = {"params": state.params, "rng": state.rng}

    def build(fresh: dict, trees: Any) -> TrainState:
        if names is None:
            params = _into(fresh["params"], grow_vocab(trees, vocab_size), "")
        else:
            params = dict(fresh["params"])
            for name, tree in zip(names, trees):
                params[name] = _into(params[name], grow_vocab(tree, vocab_size), name)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), fresh["rng"])

    if isinstance(jax.tree.leaves(fresh["params"])[0], jax.ShapeDtypeStruct):  # nothing to donate
        return jax.jit(lambda trees: build(fresh, trees), out_shardings=state_shardings)(trees)
    return jax.jit(build, out_shardings=state_shardings, donate_argnums=(0,))(fresh, trees)
