"""In-context retrieval augmentation (Ram et al. 2023): retrieved passages prepended to the model's
input, the model unchanged.

For each window the query (the tokens before its scored span, `Windows.queries`) is decoded and
sent to the retriever; the passages it returns, best first, are placed so that the best one is
nearest the text, each followed by EOS (the token that ends a training document), as many whole
passages as fit in `passage_tokens` (the best one cut to fit if it alone does not). The row keeps
its length (the model's context): the passages take room from the far end of the preceding text,
and the scored span is the same tokens with the same weights as without retrieval, so the losses
of the two compare token for token. With no passage a row is exactly `Windows.plain_rows`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lmjax import data
from lmjax.retrieval.passages import Passages
from lmjax.retrieval.windows import Windows


class Retriever(Protocol):
    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


def prepended(passage_ids: Sequence[np.ndarray], budget: int, eos_id: int) -> np.ndarray:
    """The tokens to prepend: passages (best first in `passage_ids`) each followed by EOS, the best
    last, at most `budget` tokens."""
    pieces, used = [], 0
    for ids in passage_ids:
        room = budget - used - 1
        if room < 1:
            break
        if len(ids) > room:
            if pieces:
                break
            ids = ids[:room]
        pieces.append(np.append(ids, eos_id).astype(np.int32))
        used += len(ids) + 1
    return np.concatenate(pieces[::-1]) if pieces else np.zeros(0, np.int32)


def augmented_rows(windows: Windows, prefixes: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of the model's context length: window i's `prefixes[i]`, then as much of the text before
    its span as fits, then the span; inputs, targets, weights [W, context] (weights 1 on the span) and
    the number of prepended tokens [W]."""
    C, P = windows.context, windows.span
    inputs = np.empty((len(windows), C), np.int32)
    targets = np.empty((len(windows), C), np.int32)
    for i, (t, prefix) in enumerate(zip(windows.starts, prefixes)):
        if len(prefix) > C - P:
            raise ValueError(f"{len(prefix)} prepended tokens leave no room for the span of {P} in a context of {C}")
        text = windows.stream[t + P - 1 - (C - len(prefix)) : t + P]
        row = np.concatenate([prefix, text])
        inputs[i], targets[i] = row[:-1], row[1:]
    weights = np.zeros((len(windows), C), np.float32)
    weights[:, -P:] = 1.0
    prepended = np.array([len(p) for p in prefixes], np.int64)
    return {"inputs": inputs, "targets": targets, "weights": weights, "prepended": prepended}


def retrieve(retriever: Retriever, passages: Passages, windows: Windows, tokenizer: data.Tokenizer, *,
             query_tokens: int, num_passages: int) -> list[list[np.ndarray]]:
    """The passages (token ids, best first) retrieved for each window with its query."""
    queries = [tokenizer.decode(q.tolist()) for q in windows.queries(query_tokens)]
    ids, _ = retriever.search(queries, num_passages)
    return [[passages.ids(j) for j in row if j >= 0] for row in ids]


def incontext_rows(retriever: Retriever, passages: Passages, windows: Windows, tokenizer: data.Tokenizer, *,
                   query_tokens: int, num_passages: int, passage_tokens: int) -> dict[str, np.ndarray]:
    """Rows with the retrieved passages prepended (see the module docstring)."""
    if not 0 <= passage_tokens <= windows.context - windows.span:
        raise ValueError(f"passage_tokens={passage_tokens} must be between 0 and context - span = "
                         f"{windows.context - windows.span}")
    if num_passages == 0 or passage_tokens < 2:
        return augmented_rows(windows, [np.zeros(0, np.int32)] * len(windows))
    retrieved = retrieve(retriever, passages, windows, tokenizer, query_tokens=query_tokens, num_passages=num_passages)
    prefixes = [prepended(ids, passage_tokens, tokenizer.eos_id) for ids in retrieved]
    return augmented_rows(windows, prefixes)
