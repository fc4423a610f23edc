"""Hugging Face GPT-2 and Llama checkpoints in and out of lmjax run directories.

    python -m lmjax.interop.hf import --from=DIR_OR_REPO_ID --workdir=DIR [--tokenizer=auto]
    python -m lmjax.interop.hf export --workdir=DIR --to=HF_DIR [--dtype=float32]

`import` reads `config.json` and `model.safetensors` (or the shards of `model.safetensors.index.json`),
downloading a Hub repo id through `huggingface_hub` when `--from` is not a local directory, and
writes a run directory exactly as training does: the checked config and a step-0 orbax checkpoint
(parameters in float32, a fresh optimizer state), so `lmjax.main --mode=eval|generate`, `lmjax.evals`
and `lmjax.serve` open it as they open a trained run; DIR/config.py holds the config as a preset (to
fine-tune). The checkpoint's config.json and tokenizer files are kept in DIR/hf/ (a SentencePiece
`tokenizer.model` also becomes the run's tokenizer). `export` writes the
reverse: `config.json` and `model.safetensors` in the Hub's (PyTorch) layout, of any run whose model
is a GPT-2 or a Llama, imported or trained here.

Every check (architecture, tensor names, shapes against config.json: see hub_files.py) runs before
anything is written, and the output directory is built beside its target and renamed into place: on
any error nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_dict

from lmjax import cli, model
from lmjax import config as config_lib
from lmjax.data import tokenizers
from lmjax.interop import gpt2, hub_files, llama
from lmjax.interop.errors import UnknownModelTypeError, UnsupportedConfigError
from lmjax.train import checkpointing
from lmjax.train import step as step_lib
from lmjax.train import workdir as workdir_lib
from lmjax.train.state import TrainState

ARCHITECTURES: dict[str, ModuleType] = {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama}
SOURCE_SUBDIR = "hf"  # the checkpoint's config.json and tokenizer files, kept with the run
PRESET_FILE = "config.py"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def mapping_for(hf_config: dict, directory: str) -> ModuleType:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnknownModelTypeError(f"{os.path.join(directory, hub_files.CONFIG)} has model_type={model_type!r}; "
                                    f"lmjax imports only {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


# --- import -----------------------------------------------------------------------------------------


def choose_tokenizer(requested: str, mapping: ModuleType, directory: str) -> str:
    """`data.tokenizer` for the run: `requested`, or (auto) the checkpoint's SentencePiece model, or the
    GPT-2 BPE for a GPT-2 when lmjax has it."""
    has_spm = os.path.isfile(os.path.join(directory, "tokenizer.model"))
    if requested == "auto":
        if has_spm:
            return "sentencepiece"
        if mapping is gpt2 and "gpt2" in tokenizers.TOKENIZERS:
            return "gpt2"
        raise ValueError(f"{directory} has no SentencePiece tokenizer.model and lmjax has no tokenizer for this "
                         f"{mapping.MODEL_TYPE} checkpoint's vocabulary: pass --tokenizer=byte to import the "
                         "weights anyway (text then decodes ids 0-255 as bytes: for checking the weights only)")
    if requested not in tokenizers.TOKENIZERS:
        raise ValueError(f"--tokenizer={requested!r}: expected auto or one of {', '.join(tokenizers.TOKENIZERS)}")
    if requested == "sentencepiece" and not has_spm:
        raise ValueError(f"--tokenizer=sentencepiece, but {directory} has no tokenizer.model")
    return requested


def lmjax_config(hf_config: dict, mapping: ModuleType, source: str, tokenizer: str) -> config_dict.ConfigDict:
    """The run's config: the defaults, the mapped architecture, float32, and the chosen tokenizer."""
    config = config_lib.default_config()
    config.name = f"hf:{source}"
    config.model.update(mapping.model_config(hf_config))
    config.model.update(dtype="float32", param_dtype="float32", dropout=0.0)
    config.data.tokenizer = tokenizer
    config.data.seq_len = min(int(config.model.max_len), 1024)
    config_lib.check(config)
    return config


def abstract_params(config: config_dict.ConfigDict) -> Any:
    """The run's parameter tree as float32 ShapeDtypeStructs (nothing is computed)."""
    return nn.unbox(step_lib.abstract_params(config, model.Transformer(config.model)))


def hf_shapes(mapping: ModuleType, config: config_dict.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The Hugging Face tensors (name -> shape) of the model `config` describes."""
    return jax.eval_shape(lambda params: mapping.to_hf(params, config.model), abstract_params(config))


def from_hf(tensors: dict[str, np.ndarray], mapping: ModuleType, config: config_dict.ConfigDict) -> Any:
    """lmjax params from float32 Hugging Face tensors (named as `mapping.to_hf` names them).

    `to_hf` only reshapes, transposes, concatenates and slices (padding rows, which an import never
    has), so its linear transpose is its exact inverse: one mapping per architecture serves both
    directions, bit for bit.
    """
    to_hf = lambda params: mapping.to_hf(params, config.model)
    (params,) = jax.linear_transpose(to_hf, abstract_params(config))(tensors)
    return jax.device_get(params)


def import_checkpoint(source: str, workdir: str, tokenizer: str = "auto") -> config_dict.ConfigDict:
    """Convert the Hugging Face checkpoint `source` (a directory or a Hub repo id) into the new run
    directory `workdir`; returns the run's config."""
    directory = hub_files.resolve_source(source)
    hf_config = hub_files.read_config(directory)
    mapping = mapping_for(hf_config, directory)
    config = lmjax_config(hf_config, mapping, source, choose_tokenizer(tokenizer, mapping, directory))
    tensors = hub_files.read_tensors(directory, mapping, hf_config, hf_shapes(mapping, config))
    params = from_hf(tensors, mapping, config)
    with hub_files.new_directory(workdir) as building:
        os.makedirs(os.path.join(building, SOURCE_SUBDIR))
        for name in (hub_files.CONFIG, *hub_files.SIDE_FILES):
            if os.path.isfile(os.path.join(directory, name)):
                shutil.copyfile(os.path.join(directory, name), os.path.join(building, SOURCE_SUBDIR, name))
        if config.data.tokenizer == "sentencepiece":  # the run's tokenizer (see workdir.TOKENIZER_FILE)
            shutil.copyfile(os.path.join(directory, "tokenizer.model"),
                            os.path.join(building, workdir_lib.TOKENIZER_FILE))
        with open(os.path.join(building, PRESET_FILE), "w") as f:
            f.write(preset(config, source, workdir))
        write_checkpoint(config, params, building)
    return config


def preset(config: config_dict.ConfigDict, source: str, workdir: str) -> str:
    """The run's config as a preset file: what differs from the defaults, for `--config=` (to fine-tune,
    or to override a key for an evaluation)."""
    defaults = config_lib.to_json(config_lib.default_config())
    current = config_lib.to_json(config)
    changed = {section: {key: value for key, value in current[section].items() if value != defaults[section][key]}
               for section in ("model", "data")}
    return (
        f'"""The run imported from {source} by lmjax.interop.hf, as a preset. To fine-tune it:\n'
        f'python -m lmjax.main --config={os.path.join(workdir, PRESET_FILE)} --workdir={workdir} '
        f'--config.data.source=...\n"""\n\n'
        "from lmjax.config import default_config\n\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.name = {config.name!r}\n"
        f"    c.model.update({changed['model']!r})\n"
        f"    c.data.update({changed['data']!r})\n"
        "    return c\n"
    )


def write_checkpoint(config: config_dict.ConfigDict, params: Any, workdir: str) -> None:
    """Step 0 of a run of `config` holding `params`, saved as the trainer saves its steps: a fine-tuning
    run on this workdir resumes from it with a fresh optimizer, at the start of its data."""
    setup = workdir_lib.Setup(config, workdir)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), setup.abstract_state.params)
    have = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    if want != have:
        raise RuntimeError("the mapped parameters do not form the model's tree (a bug in lmjax.interop)")
    params = jax.device_put(params, setup.state_shardings.params)
    tx, _ = step_lib.make_tx(setup.config, step_lib.abstract_params(setup.config, setup.model))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(int(config.train.seed)))
    state = jax.device_put(state, setup.state_shardings)
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint)
    try:
        # `config`, not setup.config: that one pins a tokenizer path inside the directory being built.
        checkpointing.save(manager, 0, state, config=config_lib.to_json(config),
                           data_state={"pipeline": {"batch": 0}, "wall_time_s": 0.0})
        manager.wait_until_finished()
    finally:
        manager.close()


# --- export -----------------------------------------------------------------------------------------


def mapping_of_model(m: Any, workdir: str) -> ModuleType:
    """The architecture the lmjax model `m` (config.model) is an instance of."""
    problems = {}
    for mapping in ARCHITECTURES.values():
        problems[mapping.MODEL_TYPE] = mapping.misfits(m)
        if not problems[mapping.MODEL_TYPE]:
            return mapping
    raise UnsupportedConfigError(f"the model of {workdir} is neither a GPT-2 nor a Llama: "
                                 + "; ".join(f"not {kind}: {', '.join(p)}" for kind, p in problems.items()))


def unscanned(params: dict, m: Any) -> dict:
    """`params` with a scanned stack of blocks (model.scan_layers) split into block_0 ... block_N-1."""
    if "blocks" not in params:
        return params
    params = dict(params)
    blocks = params.pop("blocks")
    for i in range(m.num_layers):
        params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    return params


def export_checkpoint(workdir: str, out: str, dtype: str = "float32") -> dict:
    """Write the newest checkpoint of the run `workdir` to the new Hugging Face model directory `out`;
    returns the config.json written."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    config = workdir_lib.saved_config(workdir)
    mapping = mapping_of_model(config.model, workdir)
    setup = workdir_lib.Setup(config, workdir)
    restored = setup.restore(read_only=True)
    m = setup.config.model
    params = unscanned(jax.device_get(restored.state.params), m)
    tensors = {name: np.asarray(x).astype(jnp.dtype(dtype)) for name, x in mapping.to_hf(params, m).items()}
    source = os.path.join(workdir, SOURCE_SUBDIR)
    base = hub_files.read_config(source) if os.path.isfile(os.path.join(source, hub_files.CONFIG)) else {
        key: value for key, value in (("bos_token_id", setup.tokenizer.bos_id), ("eos_token_id", setup.tokenizer.eos_id))
        if value >= 0
    }
    hf_config = {**base, **mapping.hf_config(m), "torch_dtype": dtype}
    with hub_files.new_directory(out) as building:
        hub_files.write(building, hf_config, tensors)
        for name in hub_files.SIDE_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(building, name))
    return hf_config


# --- the command ------------------------------------------------------------------------------------

COMMANDS = ("import", "export")


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing this module defines none, so it
    goes along with other entry points (whose --workdir it would clash with) in one process."""
    flags.DEFINE_string("from", None, "import: a Hugging Face model directory, or a Hub repo id to download.")
    flags.DEFINE_string("workdir", None, "import: the run directory to create; export: the run to export.")
    flags.DEFINE_string("to", None, "export: the Hugging Face model directory to create.")
    flags.DEFINE_string("tokenizer", "auto", "import: the run's data.tokenizer; auto: the checkpoint's SentencePiece "
                        "tokenizer.model, or for GPT-2 lmjax's GPT-2 BPE where it has one.")
    flags.DEFINE_enum("dtype", "float32", list(EXPORT_DTYPES), "export: dtype of the written tensors.")


def _flag(name: str) -> Any:
    value = flags.FLAGS[name].value
    if value is None:
        raise ValueError(f"--{name} is required")
    return value


def _run(command: str) -> None:
    if command == "import":
        source, workdir = _flag("from"), _flag("workdir")
        config = import_checkpoint(source, workdir, _flag("tokenizer"))
        print(f"imported {source} ({model.param_count(config.model):,} parameters, tokenizer "
              f"{config.data.tokenizer}) into {workdir}\n"
              f"  python -m lmjax.main --mode=generate --workdir={workdir} --prompt='...'")
    else:
        workdir, out = _flag("workdir"), _flag("to")
        hf_config = export_checkpoint(workdir, out, _flag("dtype"))
        print(f"exported {workdir} as a {hf_config['architectures'][0]} to {out}")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected one command, import or export; got {' '.join(argv[1:]) or 'none'}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    cli.run(lambda: _run(argv[1]))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
