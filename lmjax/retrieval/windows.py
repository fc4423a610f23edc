"""Evaluation windows over a token stream: what is scored, what the model sees, what is retrieved with.

Window i scores the `span` tokens `stream[t : t + span]` (t = starts[i]) with the model reading
`context` tokens that end just before the last of them, so every scored token has at least
`context - span` tokens of context (a sliding-window evaluation with stride `span`). The retrieval
query is the `query_tokens` tokens just before t: the text already read, never a scored token.
The stream is the validation split as `tokenize_split` gives it (EOS-joined documents), so
context and query may cross a document boundary, as training rows do.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Windows:
    stream: np.ndarray
    starts: np.ndarray  # [W] index in `stream` of each window's first scored token
    span: int
    context: int

    def __len__(self) -> int:
        return len(self.starts)

    def targets(self) -> np.ndarray:
        """The scored tokens [W, span]."""
        return self.stream[self.starts[:, None] + np.arange(self.span)]

    def plain_rows(self) -> dict[str, np.ndarray]:
        """Model rows without retrieval: inputs, targets, weights [W, context] (weights 1 on the span)."""
        first = self.starts + self.span - 1 - self.context
        window = self.stream[first[:, None] + np.arange(self.context + 1)]
        weights = np.zeros((len(self), self.context), np.float32)
        weights[:, -self.span :] = 1.0
        return {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": weights}

    def queries(self, query_tokens: int) -> list[np.ndarray]:
        """The retrieval query of every window: the `query_tokens` tokens before its first scored one."""
        return [self.stream[max(0, t - query_tokens) : t] for t in self.starts]

    def held_out(self) -> np.ndarray:
        """[W] bool: the windows in the first half of the stream. Choices made on them (kNN-LM's lambda
        and temperature) are reported on the others, the second half."""
        return self.starts < len(self.stream) // 2


def sample_windows(stream: np.ndarray, num_windows: int, span: int, context: int, seed: int = 0) -> Windows:
    """`num_windows` non-overlapping windows (-1: every one) at seeded places in `stream`, in order."""
    if not 1 <= span <= context:
        raise ValueError(f"span={span} must be between 1 and the context length {context}")
    stream = np.asarray(stream, np.int32)
    candidates = np.arange(context, len(stream) - span + 1, span)
    if num_windows == -1:
        num_windows = len(candidates)
    if not 1 <= num_windows <= len(candidates):
        raise ValueError(f"num_windows={num_windows}: the stream of {len(stream)} tokens holds "
                         f"{len(candidates)} windows of span {span} after a context of {context}")
    chosen = np.random.default_rng(seed).choice(len(candidates), num_windows, replace=False)
    return Windows(stream, candidates[np.sort(chosen)], span, context)
