"""The retrieval collection: every train document cut into passages of at most `chunk_tokens` tokens.

Passages are cut by tokens, not characters, because they are prepended to the model's input as
tokens: a passage's length is then exactly the context it costs. A passage never spans two
documents (a document's last passage is shorter) and never holds the EOS that ends a document.
Its text (for BM25) is the decoded tokens.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from lmjax import data


@dataclasses.dataclass
class Passages:
    """Passage i is `tokens[starts[i]:starts[i + 1]]`, with text `texts[i]`."""

    tokens: np.ndarray
    starts: np.ndarray
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i + 1]]


def chunk_bounds(doc_ends: np.ndarray, chunk_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of every passage in a stream of documents that each end in one EOS token,
    whose end offsets (EOS included) are `doc_ends`."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    doc_ends = np.asarray(doc_ends, np.int64)
    doc_starts = np.concatenate([[0], doc_ends[:-1]])
    lengths = doc_ends - 1 - doc_starts  # without the EOS
    counts = -(-lengths // chunk_tokens)
    doc = np.repeat(np.arange(len(lengths)), counts)
    j = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = doc_starts[doc] + j * chunk_tokens
    stops = np.minimum(starts + chunk_tokens, doc_ends[doc] - 1)
    return starts, stops


def make_passages(tokens: np.ndarray, doc_ends: np.ndarray, tokenizer: data.Tokenizer,
                  chunk_tokens: int) -> Passages:
    """The passages of a tokenized split (`lmjax.data.pipeline.tokenize_split`'s tokens and doc_ends)."""
    starts, stops = chunk_bounds(doc_ends, chunk_tokens)
    lengths = stops - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    passage_tokens = np.asarray(tokens)[gather].astype(np.int32)
    texts = [tokenizer.decode(passage_tokens[a:b].tolist()) for a, b in itertools.pairwise(offsets)]
    return Passages(passage_tokens, offsets, texts)
