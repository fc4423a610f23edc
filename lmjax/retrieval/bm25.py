"""BM25 over passage texts, through the maintained `bm25s` library (sparse, exact, fast on a CPU).

Texts and queries are split into words by bm25s's own tokenizer (lowercased runs of two or more
word characters, English stop words removed), which suits code too: identifiers are words.
A passage that shares no word with a query scores 0 and is never returned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np


def _bm25s():
    try:
        import bm25s
    except ImportError as e:
        raise ImportError("BM25 retrieval needs the bm25s library: pip install -e '.[rag]'") from e
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every query without a known word
    return bm25s


class BM25Retriever:
    """`search(queries, k)` -> (passage ids [W, k], scores [W, k]); id -1 where fewer than k match."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if not texts:
            raise ValueError("BM25Retriever needs at least one passage")
        bm25s = _bm25s()
        self.num_passages = len(texts)
        self._index = bm25s.BM25(k1=k1, b=b)
        self._index.index(bm25s.tokenize(list(texts), show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if not 1 <= k <= self.num_passages:
            raise ValueError(f"k={k} passages asked of a collection of {self.num_passages}")
        words = _bm25s().tokenize(list(queries), return_ids=False, show_progress=False)
        ids, scores = self._index.retrieve(words, k=k, show_progress=False)
        ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
        return np.where(scores > 0, ids, -1), np.where(scores > 0, scores, 0.0)
