"""Sampling text from a model: prompts in, continuations out, through the KV-cache decoder."""

from __future__ import annotations

from typing import Any, Sequence

import jax
from ml_collections import config_dict

from lmjax import data, model
from lmjax.infer import quantization


def prompt_ids(tokenizer: data.Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids, preceded by EOS: training documents start right after one, so the model
    reads the prompt as the start of a file."""
    start = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    return start + tokenizer.encode(prompt)


def sample_texts(
    config: config_dict.ConfigDict,
    params: Any,
    tokenizer: data.Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    model_config: config_dict.ConfigDict | None = None,
) -> list[str]:
    """Continuations of `prompts` (the new text only); temperature 0 is greedy, the same seed gives
    the same text. `model_config` (default config.model) may run quantized params
    (lmjax.model.quantization.with_quantization)."""
    model_config = config.model if model_config is None else model_config
    new = model.generate(
        model_config, params, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(seed),
        eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
    )
    return [tokenizer.decode(tokens) for tokens in new]


def generate_text(config: config_dict.ConfigDict, workdir: str, prompts: Sequence[str], quantize: str = "none",
                  **sampling: Any) -> list[str]:
    """The `--mode=generate` job: continuations of `prompts` from the newest checkpoint in `workdir`,
    its weights quantized to `quantize` (none | int8 | int4); `sampling`: the keyword arguments of
    `sample_texts`."""
    setup, _, params, model_config = quantization.restore_run(config, workdir, quantize)
    return sample_texts(setup.config, params, setup.tokenizer, prompts, model_config=model_config, **sampling)
