"""The kNN-LM datastore: for every token of a text, the model's final hidden state at the position
before it (the key) and the token itself (the value), as Khandelwal et al. (2020) build it.

`build_datastore` takes any rows (inputs, targets, weights), so a test can build one from the very
text it evaluates; `train_rows` gives the rows of the train split, as the concat packer cuts them
(every token a target once, each with the context of its row), optionally a seeded sample of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lmjax.data import packing
from lmjax.retrieval.scoring import score_rows


@dataclasses.dataclass
class Datastore:
    keys: np.ndarray  # [M, D] float32 hidden states
    values: np.ndarray  # [M] int32 next tokens

    def __len__(self) -> int:
        return len(self.values)


def build_datastore(score_fn: Callable, rows: dict[str, np.ndarray], batch_size: int) -> Datastore:
    """(hidden state, target) of every position with weight > 0 of `rows`; `score_fn` must return the
    features of all positions (`make_score_fn(..., features_last=row length)`)."""
    _, features_RxLxD = score_rows(score_fn, rows["inputs"], rows["targets"], batch_size)
    keep_RxL = rows["weights"] > 0
    return Datastore(features_RxLxD[keep_RxL], rows["targets"][keep_RxL].astype(np.int32))


def train_rows(tokens: np.ndarray, seq_len: int, pad_id: int, max_tokens: int = -1, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of `seq_len` over a token stream (-1: all; else a seeded sample of about `max_tokens` tokens)."""
    packer = packing.ConcatPacker(np.asarray(tokens, np.int32), seq_len, pad_id)
    num_rows = packer.num_rows
    if max_tokens != -1:
        if max_tokens < seq_len:
            raise ValueError(f"datastore_tokens={max_tokens} is less than one row of {seq_len} tokens")
        num_rows = min(num_rows, max_tokens // seq_len)
    chosen = np.sort(np.random.default_rng(seed).permutation(packer.num_rows)[:num_rows])
    return packer.rows(chosen)
