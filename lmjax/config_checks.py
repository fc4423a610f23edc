"""Checking a config before a job writes anything: each bad value named with what would work.

`check_config` is the one place that knows the valid values of the enumerated keys and the ranges
of the numeric ones, so `lmjax.main` can fail in its first second, not after building a tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

from ml_collections import config_dict

from lmjax import data

CHOICES = {
    "model.position": ("learned", "sinusoidal", "rope", "alibi", "none"),
    "model.rope_scaling": ("none", "linear", "ntk"),
    "model.mlp": ("gelu", "gelu_tanh", "relu", "swiglu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.attention": ("einsum", "dot_product", "cudnn"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "data.tokenizer": ("sentencepiece", "byte", "char"),
    "data.spm_model_type": ("bpe", "unigram"),
    "data.packing": ("concat", "segments"),
    "data.doc_split": ("file", "blank_line"),
    "data.text_split": ("hash", "tail"),
    "optim.name": ("adamw", "adafactor", "lion", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
}
# Model keys that change how the parameters are used, not what they are: free to differ from the
# checkpoint's (e.g. evaluate in bfloat16 a model trained in float32).
RUNTIME_MODEL_KEYS = ("dropout", "dtype", "attention", "remat")
AT_LEAST_ONE = (
    "model.num_layers", "model.embed_dim", "model.num_heads", "model.num_kv_heads", "model.max_len",
    "data.seq_len", "train.steps", "train.batch_size", "train.microbatches", "train.log_every",
    "checkpoint.every_steps", "checkpoint.max_to_keep", "eval.every_steps",
)
AT_LEAST_ZERO = (
    "optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip", "train.z_loss",
    "eval.steps", "eval.num_samples", "eval.sample_tokens", "eval.sample_temperature", "data.grain_workers",
)


def _get(config: config_dict.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check_config(config: config_dict.ConfigDict) -> None:
    """Raise ValueError naming the first key whose value cannot work (the valid values included)."""
    for key, valid in CHOICES.items():
        if _get(config, key) not in valid:
            raise ValueError(f"config.{key}={_get(config, key)!r} is not valid; choose one of: {', '.join(valid)}")
    for key in AT_LEAST_ONE:
        if _get(config, key) < 1:
            raise ValueError(f"config.{key}={_get(config, key)} must be >= 1")
    for key in AT_LEAST_ZERO:
        if _get(config, key) < 0:
            raise ValueError(f"config.{key}={_get(config, key)} must be >= 0")
    if config.optim.warmup_steps > config.train.steps:
        raise ValueError(
            f"config.optim.warmup_steps={config.optim.warmup_steps} exceeds config.train.steps={config.train.steps}"
        )
    if not 0.0 <= config.model.dropout < 1.0:
        raise ValueError(f"config.model.dropout={config.model.dropout} must be in [0, 1)")
    if config.model.vocab_size is not None and config.model.vocab_size < 1:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} must be >= 1 (or unset)")
    if config.model.position == "learned" and config.data.seq_len > config.model.max_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len={config.model.max_len}, "
            "the size of the learned position table"
        )
    source_kinds = ("pystdlib", "text:", "tfds:", "prepared:")
    if not config.data.source.startswith(source_kinds):
        raise ValueError(
            f"config.data.source={config.data.source!r}: expected pystdlib, text:<glob>, tfds:<name> or prepared:<dir>"
        )
    check_decay_points(config)


def decay_start(optim_cfg: Any, point: int) -> int:
    """The step where a WSD run of `point` steps leaves its stable phase (the schedule's rounding)."""
    return point - round(float(optim_cfg.decay_fraction) * point)


def check_decay_points(config: config_dict.ConfigDict) -> None:
    """`optim.wsd_decay_points` must be whole step counts below `train.steps` whose decay phase has
    at least one step and starts after warmup; only a WSD run has a stable phase to branch from."""
    points = tuple(config.optim.wsd_decay_points or ())
    if not points:
        return
    key = f"config.optim.wsd_decay_points={points}"
    if config.optim.schedule != "wsd":
        raise ValueError(f"{key} needs config.optim.schedule='wsd' (it is {config.optim.schedule!r}): "
                         "only a warmup-stable-decay run can be decayed early")
    total, warmup = int(config.train.steps), int(config.optim.warmup_steps)
    for point in points:
        if isinstance(point, bool) or not float(point).is_integer():
            raise ValueError(f"{key}: {point!r} is not a whole number of steps")
        point = int(point)
        if point >= total:
            raise ValueError(f"{key}: {point} must be < config.train.steps={total} (the final budget is the run itself)")
        start = decay_start(config.optim, point)
        if start == point or start < warmup:
            raise ValueError(
                f"{key}: {point} is too small: its decay (config.optim.decay_fraction={config.optim.decay_fraction}"
                f" of {point} steps) would start at step {start}, but it needs >= 1 decay step starting at or "
                f"after config.optim.warmup_steps={warmup}"
            )


def fill_vocab_size(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> None:
    """model.vocab_size defaults to the tokenizer's; a smaller explicit value would drop token ids."""
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids (data.tokenizer={config.data.tokenizer!r}); leave it unset "
            f"to use the tokenizer's size or set it >= {tokenizer.vocab_size}"
        )


def config_json(config: config_dict.ConfigDict) -> dict:
    """The config as plain JSON (stored with each checkpoint and in summary.json)."""
    return json.loads(config.to_json_best_effort())
