"""Measuring a model: loss, perplexity and bits per byte on the fixed held-out set, sampled
continuations, and the unigram baseline a language model must beat."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import config_dict

from lmjax import data, metrics, model, sharding
from lmjax.data import pipeline as pipeline_lib


def eval_batches(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> tuple[list[dict], float]:
    """The fixed held-out set: the first `eval.steps` batches of an unshuffled validation pipeline."""
    batch_size = config.eval.batch_size or config.train.batch_size
    pipeline = data.make_pipeline(config.data, tokenizer, "validation", batch_size, shuffle=False)
    return [next(pipeline) for _ in range(config.eval.steps)], pipeline.bytes_per_token


def evaluate_params(eval_step: Any, params: Any, batches: Sequence[dict], bytes_per_token: float, mesh, rules) -> dict:
    """Validation loss (nats/token), perplexity, and bits per byte (tokenizer-independent)."""
    loss_sum = weight_sum = 0.0
    for batch in batches:
        sums = eval_step(params, sharding.shard_batch(batch, mesh, rules))
        loss_sum += float(sums["loss_sum"])
        weight_sum += float(sums["weight_sum"])
    loss = loss_sum / max(weight_sum, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": loss / math.log(2) / bytes_per_token}


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
) -> list[str]:
    """Continuations of `prompts` (new text only) through the model's KV-cache decoder.

    Each prompt is preceded by EOS: training documents start right after one, so the model reads
    the prompt as the start of a file.
    """
    start = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    ids = [start + tokenizer.encode(p) for p in prompts]
    new = model.generate(
        config.model, params, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        rng=jax.random.key(seed), eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
    )
    return [tokenizer.decode(tokens) for tokens in new]


def log_samples(config: config_dict.ConfigDict, params: Any, tokenizer: data.Tokenizer,
                writer: metrics.MetricsWriter, step: int) -> list[str]:
    """`eval.num_samples` continuations of `eval.sample_prompt`, printed and sent to TensorBoard.

    Every process takes part (the params may be sharded across hosts); process 0 prints.
    """
    prompt = config.eval.sample_prompt
    texts = sample_texts(config, params, tokenizer, [prompt] * config.eval.num_samples, config.eval.sample_tokens,
                         temperature=config.eval.sample_temperature, seed=step)
    samples = [prompt + text for text in texts]
    for i, sample in enumerate(samples):
        writer.write_text(step, f"sample_{i}", sample)
        if jax.process_index() == 0:
            print(f"--- sample {i} at step {step}:\n{sample}", flush=True)
    return samples


def unigram_entropy(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> float:
    """Entropy (nats/token) of the train split's token frequencies: the loss of a model that ignores
    context, the baseline a language model must beat. Read from the pipeline's cached token array."""
    tokens = pipeline_lib.tokenize_split(config.data, "train", tokenizer)["tokens"]
    counts = np.bincount(tokens, minlength=tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
