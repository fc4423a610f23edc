"""A Hugging Face model directory: found on disk or downloaded from the Hub, its `config.json` and
safetensors read (names and shapes checked before any tensor is), and one written in the Hub's layout.
Also `new_directory`, which makes any output directory appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from types import ModuleType

import numpy as np

from lmjax import cli, fileio
from lmjax.interop.errors import InteropError, MissingTensorError, TensorShapeError, UnexpectedTensorError

WEIGHTS, WEIGHTS_INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
# What travels with the weights: kept in a run's DIR/hf/ on import, written back on export.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _safetensors() -> ModuleType:
    try:
        import safetensors.numpy
    except ImportError as e:
        raise cli.UserError("reading and writing Hugging Face weights needs safetensors: "
                            "pip install 'lmjax[hf]'") from e
    return safetensors


def resolve_source(source: str) -> str:
    """The local directory of `source`: itself, or a Hub repo id's snapshot (downloaded once)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    if not _REPO_ID.match(source):
        raise FileNotFoundError(f"--from={source}: no such directory (nor a Hub repo id such as openai-community/gpt2)")
    try:
        import huggingface_hub
    except ImportError as e:
        raise cli.UserError(f"--from={source} is not a local directory; downloading it from the Hugging Face Hub "
                            "needs huggingface_hub: pip install 'lmjax[hf]'") from e
    try:
        return huggingface_hub.snapshot_download(
            repo_id=source, allow_patterns=[CONFIG, WEIGHTS_INDEX, "*.safetensors", *SIDE_FILES])
    except Exception as e:  # noqa: BLE001 - any failure of the download is reported as one
        raise InteropError(f"--from={source} is not a local directory, and downloading it from the Hugging Face "
                           f"Hub failed: {type(e).__name__}: {e}") from e


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a Hugging Face model directory has a config.json")
    with open(path) as f:
        return json.load(f)


def weight_files(directory: str) -> list[str]:
    """`model.safetensors`, or the shards `model.safetensors.index.json` lists."""
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, name) for name in names]
    else:
        files = [os.path.join(directory, WEIGHTS)]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (only safetensors weights are read: a "
                                    "pytorch_model.bin must be converted first)")
    return files


def read_tensors(directory: str, mapping: ModuleType, hf_config: dict, expected: dict) -> dict[str, np.ndarray]:
    """The tensors `expected` names (name -> ShapeDtypeStruct), as float32 numpy arrays, after checking
    names and shapes from the files' headers (nothing large is read from a file that fails)."""
    safetensors = _safetensors()
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for path in weight_files(directory):
        with safetensors.safe_open(path, framework="np") as f:
            for stored in f.keys():
                name = mapping.hf_name(stored)
                if name is None or (name == "lm_head.weight" and name not in expected):
                    continue  # a buffer, or a tied head saved anyway: not a parameter of its own
                found[name] = (path, stored, tuple(f.get_slice(stored).get_shape()))
    implied = "config.json (" + ", ".join(f"{k}={hf_config.get(k, mapping.DEFAULTS[k])!r}" for k in mapping.SHAPE_KEYS) + ")"
    missing = [name for name in expected if name not in found]
    if missing:
        raise MissingTensorError(f"the weights in {directory} lack {len(missing)} tensor(s) that {implied} implies: "
                                 + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    unexpected = [found[name][1] for name in found if name not in expected]
    if unexpected:
        raise UnexpectedTensorError(f"the weights in {directory} hold {len(unexpected)} tensor(s) that {implied} "
                                    "does not have: " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    for name in sorted(found):
        path, stored, shape = found[name]
        if shape != expected[name].shape:
            raise TensorShapeError(f"{stored} in {path} has shape {shape}, but {implied} implies {expected[name].shape}")
    tensors = {}
    for path in sorted({path for path, _, _ in found.values()}):
        with safetensors.safe_open(path, framework="np") as f:
            for name, (where, stored, _) in found.items():
                if where == path:
                    tensors[name] = f.get_tensor(stored).astype(np.float32)
    return tensors


def write(directory: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """config.json and model.safetensors (one file, PyTorch names, as `save_pretrained` writes them)."""
    # Contiguous: safetensors writes an array's buffer as it lies, and a transpose is a strided view.
    tensors = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    _safetensors().numpy.save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


@contextlib.contextmanager
def new_directory(path: str) -> Iterator[str]:
    """A directory that appears at `path` complete or not at all: it is built in a sibling (the yielded
    path) and renamed into place; on any error the sibling, and any parent made for it, are removed."""
    if fileio.is_remote(path):
        raise ValueError(f"{path}: write a local directory, then copy it to the bucket")
    final = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(final) and not (os.path.isdir(final) and not os.listdir(final)):
        raise ValueError(f"{path} exists and is not an empty directory: name a new one")
    made, parent = None, os.path.dirname(final)  # made: the highest missing parent, created here
    while not os.path.exists(parent):
        made, parent = parent, os.path.dirname(parent)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    building = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{secrets.token_hex(4)}")
    os.mkdir(building)  # not tempfile.mkdtemp, whose 0700 mode would become the run directory's
    try:
        yield building
        if os.path.isdir(final):
            os.rmdir(final)
        os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
