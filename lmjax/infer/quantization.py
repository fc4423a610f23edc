"""A trained run's weights quantized (int8, int4), kept beside its checkpoints, for generate and eval.

The quantized tree is written once per (checkpoint step, mode, group) with orbax under
`WORKDIR/quantized/` and read back on later calls, so a deployment can load the small weights
alone. The quantization itself is lmjax.model.quantization (qwix).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import config_dict

from lmjax import sharding
from lmjax.model import quantization as quant_lib
from lmjax.train import step as step_lib
from lmjax.train import validation
from lmjax.train import workdir as workdir_lib


def quantized_dir(workdir: str, step: int, mode: str, group: int) -> epath.Path:
    """WORKDIR/quantized/MODE[_gGROUP]/STEP, absolute as orbax needs (gs:// paths pass through)."""
    suffix = "" if mode == "int8" else f"_g{group}"
    directory = epath.Path(workdir) / "quantized" / f"{mode}{suffix}" / str(step)
    return directory if str(directory).startswith("gs://") else directory.resolve()


def save(directory: str | epath.Path, qparams: Any) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, qparams)
    checkpointer.wait_until_finished()


def restore(directory: str | epath.Path, model_cfg, mode: str, group: int = quant_lib.DEFAULT_GROUP) -> Any:
    """Quantized params saved by `save`, restored onto the tree `quant_lib.quantize_params` makes."""
    abstract = nn.unbox(quant_lib.abstract_quantized_params(model_cfg, mode, group))
    return ocp.StandardCheckpointer().restore(directory, abstract)


def load_or_quantize(setup: workdir_lib.Setup, step: int, params: Any, mode: str,
                     group: int = quant_lib.DEFAULT_GROUP) -> Any:
    """The quantized params of checkpoint `step`: read back if saved, else made from `params` and saved."""
    directory = quantized_dir(setup.workdir, step, mode, group)
    if directory.exists():
        return restore(directory, setup.config.model, mode, group)
    qparams = quant_lib.quantize_params(setup.config.model, params, mode, group)
    if jax.process_index() == 0:
        save(directory, qparams)
    return qparams


def restore_run(config: config_dict.ConfigDict, workdir: str, mode: str):
    """(setup, step, params, model config) of the newest checkpoint, quantized unless mode is "none"."""
    quant_lib.check_mode(mode)
    workdir_lib.require_checkpoint(workdir)
    setup = workdir_lib.Setup(config, workdir)
    restored = setup.restore(read_only=True)
    params = restored.state.params
    if mode == "none":
        return setup, restored.step, params, setup.config.model
    qparams = load_or_quantize(setup, restored.step, params, mode)
    return setup, restored.step, qparams, quant_lib.with_quantization(setup.config.model, mode)


def evaluate_params(setup: workdir_lib.Setup, params: Any, model_cfg) -> dict:
    """Validation loss and bits/byte of `params` run by `model_cfg` (quantized or not), the run's sample."""
    shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(setup.mesh), params)
    eval_step = step_lib.make_eval_step(
        setup.config, quant_lib.model_for(model_cfg), setup.mesh, setup.state_shardings.replace(params=shardings)
    )
    val_set = validation.ValidationSet(
        setup.config, setup.tokenizer, setup.batch_rows(validation.eval_batch_size(setup.config))
    )
    return validation.evaluate_params(eval_step, params, val_set, setup.mesh, setup.rules)


def evaluate(config: config_dict.ConfigDict, workdir: str, mode: str) -> dict:
    """The `--mode=eval --quantize=MODE` job: the newest checkpoint's validation figures, quantized."""
    if int(config.eval.steps) == 0:
        raise ValueError("config.eval.steps=0 disables validation: set it to a number of batches, or -1")
    setup, step, params, model_cfg = restore_run(config, workdir, mode)
    return {"step": step, **evaluate_params(setup, params, model_cfg)}
