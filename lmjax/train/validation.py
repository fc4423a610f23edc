"""The held-out set every evaluation of a run uses, what is measured on it, and the `--mode=eval` job.

The validation set is a fixed, seeded sample of rows drawn from the whole packed validation split
(a permutation seeded by `data.seed`, cut to `eval.steps` batches; `eval.steps=-1` takes every row,
`0` disables validation). The rows do not depend on the process count: every process draws the
same global sample and feeds the rows of each batch its devices hold. Taking the first batches of
the unshuffled split instead would evaluate on the alphabetically first documents only.

Reported: loss (nats per target token), perplexity, and bits per byte, which divides the summed
loss by the UTF-8 bytes of exactly the target tokens evaluated (`Tokenizer.token_bytes`), so it
compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from ml_collections import config_dict

from lmjax import data, sharding
from lmjax.data import pipeline as pipeline_lib
from lmjax.train import step as step_lib
from lmjax.train import workdir as workdir_lib

SAMPLE_STREAM = 7919  # mixed into the sample's seed so it never equals a training shuffle order


class ValidationSet:
    """This process's part of the fixed validation batches; iterate to get them (numpy, re-packed
    on each pass, so a full-split evaluation never holds the split's rows in memory)."""

    def __init__(self, config: config_dict.ConfigDict, tokenizer: data.Tokenizer, rows: tuple[int, int] | None = None):
        self.batch_size = eval_batch_size(config)
        self.packer, _ = pipeline_lib.packed_split(config.data, tokenizer, "validation")
        order = np.random.default_rng([int(config.data.seed), SAMPLE_STREAM]).permutation(self.packer.num_rows)
        steps = int(config.eval.steps)
        self.sample = order if steps == -1 else order[: steps * self.batch_size]
        self.num_batches = -(-len(self.sample) // self.batch_size)
        self.rows = (0, self.batch_size) if rows is None else rows
        self.token_bytes = np.zeros(int(config.model.vocab_size or tokenizer.vocab_size), np.float32)
        self.token_bytes[: tokenizer.vocab_size] = tokenizer.token_bytes()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        start, stop = self.rows
        for b in range(self.num_batches):
            indices = self.sample[b * self.batch_size : (b + 1) * self.batch_size]
            real = np.arange(self.batch_size) < len(indices)  # the last batch is padded with weight 0
            indices = np.resize(indices, self.batch_size)[start:stop]
            batch = self.packer.rows(indices)
            batch["weights"] = batch["weights"] * real[start:stop, None]
            batch["target_bytes"] = self.token_bytes[batch["targets"]] * batch["weights"]
            yield batch


def validation_set(config: config_dict.ConfigDict, tokenizer: data.Tokenizer,
                   rows: tuple[int, int] | None = None) -> ValidationSet | None:
    """The run's validation set (None when `eval.steps` is 0); `rows` is this process's part of each batch."""
    return None if int(config.eval.steps) == 0 else ValidationSet(config, tokenizer, rows)


def evaluate_params(eval_step: Any, params: Any, val_set: ValidationSet, mesh, rules) -> dict:
    """Validation loss (nats/token), perplexity, bits per byte, and the number of target tokens."""
    loss_sum = weight_sum = bytes_sum = 0.0
    for batch in val_set:
        sums = eval_step(params, sharding.shard_batch(batch, mesh, rules))
        loss_sum += float(sums["loss_sum"])
        weight_sum += float(sums["weight_sum"])
        bytes_sum += float(sums["bytes_sum"])
    if weight_sum == 0:
        raise ValueError("the validation sample has no target tokens: raise config.eval.steps or check the data")
    loss = loss_sum / weight_sum
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
            "val_bpb": loss_sum / math.log(2) / max(bytes_sum, 1.0), "val_tokens": int(weight_sum)}


def evaluate(config: config_dict.ConfigDict, workdir: str) -> dict:
    """The `--mode=eval` job: loss, perplexity and bits/byte of the newest checkpoint."""
    if int(config.eval.steps) == 0:
        raise ValueError("config.eval.steps=0 disables validation: set it to a number of batches, or -1 for the "
                         "whole validation split")
    workdir_lib.require_checkpoint(workdir)
    setup = workdir_lib.Setup(config, workdir)
    restored = setup.restore(read_only=True)
    val_set = ValidationSet(setup.config, setup.tokenizer, setup.batch_rows(eval_batch_size(setup.config)))
    eval_step = step_lib.make_eval_step(setup.config, setup.model, setup.mesh, setup.state_shardings)
    result = evaluate_params(eval_step, restored.state.params, val_set, setup.mesh, setup.rules)
    return {"step": restored.step, **result}


def eval_batch_size(config: config_dict.ConfigDict) -> int:
    """Rows per validation batch: `eval.batch_size`, or the training batch size."""
    return int(config.eval.batch_size or config.train.batch_size)


def unigram_entropy(config: config_dict.ConfigDict, tokenizer: data.Tokenizer) -> float:
    """Entropy (nats/token) of the train split's token frequencies: the loss of a model that ignores
    context, the baseline a language model must beat. Read from the pipeline's cached token array."""
    data = pipeline_lib.tokenize_split(config.data, "train", tokenizer, doc_ends=False)
    counts = data["counts"] if "counts" in data else np.bincount(data["tokens"], minlength=tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
