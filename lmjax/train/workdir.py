"""A run directory, and what every job on it needs: the checked config, tokenizer, mesh, model and the
layout of the train state.

Training, `--mode=eval`, `--mode=generate`, and every later stage that reads a trained run, open a
workdir through `Setup`. It checks the whole config before anything is written, joins the other
hosts of a multi-host run, pins the tokenizer the run was trained with, and restores the newest
checkpoint after checking that it holds this config's model.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
from etils import epath
from ml_collections import config_dict

from lmjax import config as config_lib
from lmjax import data, distributed, host_memory, model, sharding
from lmjax.train import checkpointing
from lmjax.train import step as step_lib

TOKENIZER_FILE = "tokenizer.model"


class Setup:
    """The completed config, tokenizer, mesh, rules, model and abstract (sharded) train state of a run."""

    def __init__(self, config: config_dict.ConfigDict, workdir: str):
        config_lib.check(config)
        distributed.initialize()
        host_memory.reuse_freed_host_memory()
        self.config = config = copy.deepcopy(config)
        self.workdir = workdir
        _pin_tokenizer(config, workdir)
        self.tokenizer = data.build_tokenizer(config.data, verbose=jax.process_index() == 0)
        config_lib.fill_vocab_size(config, self.tokenizer.vocab_size)
        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.rules(config.mesh)
        self.model = model.Transformer(config.model)
        self.abstract_state, self.state_shardings = step_lib.abstract_train_state(config, self.model, self.mesh)

    def batch_rows(self, global_rows: int) -> tuple[int, int]:
        """The rows [start, stop) of every global batch of `global_rows` this process feeds."""
        return sharding.process_rows(self.mesh, self.rules, int(global_rows))

    def save_tokenizer(self) -> None:
        """Keep the run's SentencePiece model with the run (process 0 writes it)."""
        if jax.process_index() == 0 and hasattr(self.tokenizer, "save") and not self.config.data.tokenizer_path:
            self.tokenizer.save(os.path.join(self.workdir, TOKENIZER_FILE))

    def restore(self, *, read_only: bool) -> checkpointing.Restored | None:
        """The newest good checkpoint, after checking it holds this config's model."""
        manager = checkpointing.make_manager(self.workdir, self.config.checkpoint, read_only=read_only)
        try:
            for step in sorted(manager.all_steps(), reverse=True)[:1]:
                self._check_same_model(manager, step)
            return checkpointing.restore_latest(manager, self.abstract_state, move_corrupt=not read_only)
        finally:
            manager.close()

    def _check_same_model(self, manager: Any, step: int) -> None:
        """A clear error instead of orbax's shape mismatch when the config describes another model."""
        saved = checkpointing.saved_config(manager, step)
        if saved is None:
            return  # unreadable: restore_latest reports it
        current = config_lib.to_json(self.config)["model"]
        # A key added after the checkpoint was written held its default value there.
        defaults = config_lib.to_json(config_lib.default_config())["model"]
        saved_model = {**defaults, **saved["model"]}
        diffs = [
            f"model.{key}: checkpoint {saved_model.get(key)!r}, config {value!r}"
            for key, value in current.items()
            if key not in config_lib.RUNTIME_MODEL_KEYS and saved_model.get(key) != value
        ]
        if diffs:
            raise ValueError(f"the checkpoint in {manager.directory} holds a different model: " + "; ".join(diffs))


def require_checkpoint(workdir: str) -> None:
    """Fail before building anything when a read-only job is pointed at a workdir with no checkpoint."""
    if not checkpointing.committed_steps(workdir):
        raise FileNotFoundError(
            f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}: train first "
            f"(--mode=train with the same --config and --workdir)"
        )


def _pin_tokenizer(config: config_dict.ConfigDict, workdir: str) -> None:
    """A run keeps using the SentencePiece model it started with (saved as DIR/tokenizer.model),
    even if the cache is cleared or `data.source` points elsewhere for an evaluation."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_path and epath.Path(path).exists():
        config.data.tokenizer_path = path


def saved_config(workdir: str) -> config_dict.ConfigDict:
    """The config stored with the newest checkpoint of `workdir`, over today's defaults: a job that
    only reads a trained run (serving) needs nothing but its directory."""
    require_checkpoint(workdir)
    manager = checkpointing.make_manager(workdir, None, read_only=True)
    try:
        step = max(manager.all_steps())
        saved = checkpointing.saved_config(manager, step)
    finally:
        manager.close()
    if saved is None:
        raise ValueError(f"the config stored with checkpoint step {step} in {manager.directory} cannot be read")
    config = config_lib.default_config()
    try:
        config.update(saved)
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"the config stored with checkpoint step {step} in {manager.directory} does not fit "
                         f"this version's config keys: {e}") from e
    return config
