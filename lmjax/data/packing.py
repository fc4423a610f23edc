"""Packing: a tokenized split (documents, each ending in EOS) -> fixed-length training rows.

Both packers index rows by number, so a row is a pure function of its index: the pipeline only
has to decide the order of row indices (see pipeline.py), and resuming is exact.

  concat    the documents as one EOS-joined stream cut into windows of seq_len + 1 tokens with
            stride seq_len (inputs = window[:-1], targets = window[1:]): every token is an input once
            and a target once, and the last row is padded with weight 0. Attention crosses document
            boundaries, as in GPT-2/nanoGPT, so rows carry no positions or segment_ids: the model's
            defaults (0..L-1, plain causal attention) apply, and the causal kernels (is_causal,
            cuDNN's causal flash attention) are used instead of a dense [B, 1, L, L] mask.
  segments  whole documents packed into rows by first-fit-decreasing bin packing (n log n); a document longer
            than a row is cut into row-sized chunks first. Each chunk is one segment with its own
            segment_id (1, 2, ...) and positions restarting at 0; padding has segment_id 0 and
            weight 0, so with a segment-aware attention mask no token sees another document.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

PACKINGS = ("concat", "segments")


class Packer(Protocol):
    """Numbered rows of a packed split."""

    num_rows: int
    seq_len: int

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ConcatPacker:
    def __init__(self, tokens, seq_len: int, pad_id: int):
        self.tokens = tokens  # a numpy array, or anything with len() and contiguous slices (store.StoreTokens)
        self.seq_len = seq_len
        self.pad_id = max(pad_id, 0)
        n = len(tokens)
        self.num_rows = -(-(n - 1) // seq_len) if n >= 2 else 0

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        L, n = self.seq_len, len(self.tokens)
        window = np.full((len(indices), L + 1), self.pad_id, np.int32)
        valid = np.zeros((len(indices), L + 1), bool)
        for i, r in enumerate(np.asarray(indices, np.int64)):
            start = int(r) * L
            w = self.tokens[start : min(start + L + 1, n)]  # one contiguous read per row
            window[i, : len(w)] = w
            valid[i, : len(w)] = True
        return {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": valid[:, 1:].astype(np.float32)}


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Bin index of each item (sizes <= capacity), packing the largest items first into the
    first bin with room, in O(n log n).

    A max-tree over the room left in n bins finds the first bin with room in log n steps. Bins
    not yet opened have all their room, so the first bin with room is either an open one or the
    next one to open: the same choice as a linear scan over the open bins.
    """
    sizes = np.asarray(sizes, np.int64)
    order = np.argsort(-sizes, kind="stable")
    bin_of = np.empty(len(sizes), np.int64)
    width = 1
    while width < max(len(sizes), 1):
        width *= 2
    room = [int(capacity)] * (2 * width)  # room[node]: the most room left in a bin below node
    for item, size in zip(order.tolist(), sizes[order].tolist()):
        node = 1
        while node < width:
            node = 2 * node if room[2 * node] >= size else 2 * node + 1
        bin_of[item] = node - width
        room[node] -= size
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bin_of


class SegmentPacker:
    def __init__(self, tokens, doc_ends: np.ndarray, seq_len: int, pad_id: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.pad_id = max(pad_id, 0)
        L = seq_len
        starts = np.concatenate([[0], doc_ends[:-1]]).astype(np.int64)
        lengths = doc_ends.astype(np.int64) - starts
        # Cut each document into chunks of at most L + 1 tokens overlapping by one, so every
        # token is a target once; a chunk of n tokens fills n - 1 positions of a row.
        nchunks = np.where(lengths >= 2, -(-(lengths - 1) // L), 0)
        doc = np.repeat(np.arange(len(lengths)), nchunks)
        first = np.cumsum(nchunks) - nchunks
        j = np.arange(len(doc)) - np.repeat(first, nchunks)
        chunk_start = starts[doc] + j * L
        chunk_len = np.minimum(L + 1, lengths[doc] - j * L)
        row = first_fit_decreasing(chunk_len - 1, L)
        order = np.lexsort((np.arange(len(row)), row))
        self.seg_row, self.seg_start, self.seg_len = row[order], chunk_start[order], chunk_len[order]
        self.seg_doc = doc[order]
        self.num_rows = int(row.max()) + 1 if len(row) else 0
        self.row_ptr = np.searchsorted(self.seg_row, np.arange(self.num_rows + 1))

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        L, rows = self.seq_len, len(indices)
        out = {
            "inputs": np.full((rows, L), self.pad_id, np.int32),
            "targets": np.full((rows, L), self.pad_id, np.int32),
            "weights": np.zeros((rows, L), np.float32),
            "positions": np.zeros((rows, L), np.int32),
            "segment_ids": np.zeros((rows, L), np.int32),
        }
        for i, r in enumerate(indices):
            pos = 0
            for k in range(self.row_ptr[r], self.row_ptr[r + 1]):
                s, n = int(self.seg_start[k]), int(self.seg_len[k]) - 1
                chunk = self.tokens[s : s + n + 1]  # one contiguous read per segment
                out["inputs"][i, pos : pos + n] = chunk[:-1]
                out["targets"][i, pos : pos + n] = chunk[1:]
                out["weights"][i, pos : pos + n] = 1.0
                out["positions"][i, pos : pos + n] = np.arange(n)
                out["segment_ids"][i, pos : pos + n] = k - self.row_ptr[r] + 1
                pos += n
        return out


def make_packer(packing: str, tokens: np.ndarray, doc_ends: np.ndarray | None, seq_len: int, pad_id: int) -> Packer:
    """A packer with `num_rows` and `rows(indices) -> batch dict` over the tokenized split."""
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    if packing == "concat":
        return ConcatPacker(tokens, seq_len, pad_id)
    if packing == "segments":
        return SegmentPacker(tokens, doc_ends, seq_len, pad_id)
    raise ValueError(f"unknown data.packing {packing!r}: expected one of {PACKINGS}")
