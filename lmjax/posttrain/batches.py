"""Examples -> numbered rows of fixed length -> the same deterministic, resumable batch stream as
pretraining (`lmjax.data.pipeline`: batch i is a pure function of i, the state is {"batch": i}).

SFT rows: each conversation becomes (inputs, targets, weights) of T - 1 positions (targets are
the ids shifted by one, weights the chat template's loss weight of each target). With packing,
first-fit-decreasing puts several conversations in one row: each is a segment (segment_ids 1, 2,
..., 0 for padding) with positions restarting at 0, so no conversation attends to another and
each is computed exactly as alone. Padding has weight 0.

Pair rows (DPO, reward model): [2, L] per field, row 0 the prompt + chosen response, row 1 the
prompt + rejected one; weights are 1 on response targets (the `<|end|>` included) and 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmjax.data import packing, pipeline
from lmjax.posttrain.chat import ChatTemplate

SFT_FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")


class ArrayRows:
    """Rows held as arrays (every field [R, ...]): the packer interface `pipeline.BatchFn` reads."""

    def __init__(self, rows: dict[str, np.ndarray], seq_len: int):
        self.fields = rows
        self.seq_len = seq_len
        self.num_rows = len(next(iter(rows.values())))

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {key: value[np.asarray(indices)] for key, value in self.fields.items()}


def _shifted(ids: np.ndarray, weights: np.ndarray, seq_len: int, what: str) -> tuple[np.ndarray, ...]:
    if len(ids) - 1 > seq_len:
        raise ValueError(f"{what} is {len(ids)} tokens, longer than the context: data.seq_len={seq_len} "
                         f"holds {seq_len + 1} (shorten it, or raise data.seq_len within model.max_len)")
    return ids[:-1], ids[1:], weights[1:]


def sft_rows(template: ChatTemplate, examples: Sequence[dict], seq_len: int, *, pad_id: int,
             prompt_loss_weight: float = 0.0, pack: bool = True) -> dict[str, np.ndarray]:
    """SFT rows [R, seq_len] of every field in SFT_FIELDS; with `pack`, several conversations a row."""
    pieces = []
    for i, example in enumerate(examples):
        ids, weights = template.encode(example["messages"], prompt_loss_weight=prompt_loss_weight)
        pieces.append(_shifted(ids, weights, seq_len, f"conversation {i}"))
    lengths = np.array([len(p[0]) for p in pieces], np.int64)
    row_of = packing.first_fit_decreasing(lengths, seq_len) if pack else np.arange(len(pieces))
    num_rows = int(row_of.max()) + 1
    out = {key: np.zeros((num_rows, seq_len), np.float32 if key == "weights" else np.int32) for key in SFT_FIELDS}
    out["inputs"][:] = out["targets"][:] = max(pad_id, 0)
    filled = np.zeros(num_rows, np.int64)
    segments = np.zeros(num_rows, np.int32)
    for (inputs, targets, weights), row in zip(pieces, row_of):
        start, n = filled[row], len(inputs)
        segments[row] += 1
        span = slice(start, start + n)
        out["inputs"][row, span], out["targets"][row, span], out["weights"][row, span] = inputs, targets, weights
        out["positions"][row, span] = np.arange(n)
        out["segment_ids"][row, span] = segments[row]
        filled[row] += n
    return out


def pair_rows(template: ChatTemplate, examples: Sequence[dict], seq_len: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """Pair rows: inputs, targets, weights [N, 2, seq_len] (index 0 chosen, 1 rejected)."""
    n = len(examples)
    out = {
        "inputs": np.full((n, 2, seq_len), max(pad_id, 0), np.int32),
        "targets": np.full((n, 2, seq_len), max(pad_id, 0), np.int32),
        "weights": np.zeros((n, 2, seq_len), np.float32),
    }
    for i, example in enumerate(examples):
        for j, key in enumerate(("chosen", "rejected")):
            messages = [*example["prompt"], {"role": "assistant", "content": example[key]}]
            ids, weights = template.encode(messages)
            fields = _shifted(ids, weights, seq_len, f"pair {i}: prompt + {key} response")
            for name, value in zip(("inputs", "targets", "weights"), fields):
                out[name][i, j, : len(value)] = value
    return out


def make_stream(rows: dict[str, np.ndarray], seq_len: int, batch_size: int, process_rows: tuple[int, int], *,
                seed: int, shuffle: bool = True) -> pipeline.Pipeline:
    """The endless, resumable batch iterator over `rows` (global `batch_size`; this process's part)."""
    packer = ArrayRows(rows, seq_len)
    batch_fn = pipeline.BatchFn(packer, int(batch_size), process_rows, (int(seed), 0), shuffle)
    weights = rows["weights"]
    return pipeline.Pipeline(batch_fn, split="train", num_tokens=int(np.count_nonzero(weights)), num_bytes=0)
