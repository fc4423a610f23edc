"""Dense retrieval with the model's own embeddings: a text is the mean of its final hidden states,
scaled to unit length, and passages are ranked by L2 distance to the query's (cosine similarity).

No encoder is trained: this asks whether the LM's own representation finds useful passages, at the
cost of one forward pass over the collection (BM25 needs none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import data
from lmjax.retrieval.knn import ExactIndex
from lmjax.retrieval.passages import Passages


class DenseRetriever:
    """`search(queries, k)` -> (passage ids [W, k], cosine similarities [W, k])."""

    def __init__(self, model: nn.Module, params: Any, tokenizer: data.Tokenizer, passages: Passages,
                 batch_size: int = 64):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.length = int(np.diff(passages.starts).max())
        self._params = params

        @jax.jit
        def mean_features(params, tokens_BxL, mask_BxL):
            x_BxLxD = model.apply({"params": params}, tokens_BxL, features=True).astype(jnp.float32)
            mean_BxD = jnp.einsum("bld,bl->bd", x_BxLxD, mask_BxL) / jnp.maximum(mask_BxL.sum(1, keepdims=True), 1.0)
            return mean_BxD / jnp.maximum(jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True), 1e-6)

        self._mean_features = mean_features
        self.index = ExactIndex(self.embed([passages.ids(i) for i in range(len(passages))]))

    def embed(self, texts_ids: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-length mean hidden states [N, D] of token sequences (each cut to its last `length` tokens)."""
        out = []
        pad = max(self.tokenizer.pad_id, 0)
        for first in range(0, len(texts_ids), self.batch_size):
            batch = texts_ids[first : first + self.batch_size]
            tokens = np.full((self.batch_size, self.length), pad, np.int32)
            mask = np.zeros((self.batch_size, self.length), np.float32)
            for i, ids in enumerate(batch):
                ids = np.asarray(ids, np.int32)[-self.length :]
                tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1.0
            out.append(np.asarray(self._mean_features(self._params, tokens, mask))[: len(batch)])
        return np.concatenate(out)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = [self.tokenizer.encode(q) or [self.tokenizer.eos_id] for q in queries]
        distances, indices = self.index.search(self.embed(ids), k)
        return indices.astype(np.int64), 1.0 - distances / 2.0
