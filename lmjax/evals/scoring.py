"""Scoring text under a model: log-likelihoods of continuations, and greedy continuations.

Context and continuation are tokenized together and split at the character boundary: a token that
straddles it (a BPE merge across the join) belongs to the continuation, so the continuation's
tokens are those a model trained on the joined text would have to predict, never a tokenization
that cannot occur. Every sequence starts with EOS, the token training documents follow.

Rows are right-padded and scored in one jitted forward pass per batch. Padding never changes a
score: attention is causal, so tokens after a row's end cannot reach it, and padded rows and
positions carry zero weight. Batch rows and lengths are rounded up to a few sizes, so a whole task
compiles a handful of programs. On a mesh, rows are split over its batch axes like training batches.

Prompts longer than the model's context (`config.model.max_len`) are cut from the left, keeping
the end of the prompt next to the answer, with a warning (the number cut is also reported); a
continuation that alone does not fit raises `TooLongError`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import FrozenConfigDict

from lmjax import data, model, sharding
from lmjax.model import quantization as quant_lib

MIN_LENGTH = 16  # the shortest padded row length (lengths are powers of two from here)


class TooLongError(ValueError):
    """A continuation (or a generation budget) that does not fit in the model's context."""


def split_tokens(tokenizer: data.Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `context + continuation` tokenized as one text, split where
    the context's characters end; the context starts with EOS."""
    whole = tokenizer.encode(context + continuation)
    boundary = min(len(tokenizer.encode(context)), len(whole))
    while boundary > 0 and not context.startswith(tokenizer.decode(whole[:boundary])):
        boundary -= 1
    while boundary < len(whole) and context.startswith(tokenizer.decode(whole[: boundary + 1])):
        boundary += 1
    start = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    context_ids, continuation_ids = start + whole[:boundary], whole[boundary:]
    if not context_ids:
        raise ValueError(f"context {context!r} has no tokens and the tokenizer has no EOS to start from")
    if continuation and not continuation_ids:
        raise ValueError(f"continuation {continuation!r} has no tokens of its own after {context[-20:]!r}")
    return context_ids, continuation_ids


def fit_context(context_ids: list[int], room: int, what: str) -> tuple[list[int], bool]:
    """The last `room` context tokens (at least one must fit), and whether any were cut."""
    if room < 1:
        raise TooLongError(f"{what} leaves no room for any context in the model's context window")
    return context_ids[-room:], len(context_ids) > room


def _bucket(n: int, cap: int) -> int:
    return min(max(MIN_LENGTH, 1 << (max(n, 1) - 1).bit_length()), cap)


@dataclasses.dataclass(frozen=True)
class Score:
    """A continuation's summed log-probability (nats), its token count, whether every one of its
    tokens is the model's argmax given the gold tokens before it (greedy decoding would produce it),
    and that for each token (teacher-forced accuracy, which exposure-bias studies compare with free
    running)."""

    logprob: float
    num_tokens: int
    is_greedy: bool
    argmax_hits: tuple[bool, ...]


class Scorer:
    """Log-likelihoods and greedy continuations from one model's parameters (quantized ones with a
    config from `quant_lib.with_quantization`)."""

    def __init__(self, model_cfg: Any, params: Any, tokenizer: data.Tokenizer, *, batch_size: int = 16,
                 mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None):
        self.cfg = FrozenConfigDict(model_cfg)
        self.params = nn.unbox(params)
        self.tokenizer = tokenizer
        self.max_len = int(model_cfg.max_len)
        self.mesh, self.rules = mesh, rules
        ways = 1 if mesh is None else sharding.axes_size(mesh, sharding.batch_sharding(mesh, rules).spec[0])
        self.row_multiple = ways
        self.batch_size = -(-int(batch_size) // ways) * ways
        self.truncated = 0  # prompts cut from the left so far

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch split over the mesh's batch axes like a training batch (each process
        feeds its own rows); unplaced without a mesh."""
        if self.mesh is None:
            return batch
        start, stop = sharding.process_rows(self.mesh, self.rules, len(batch["inputs"]))
        return sharding.shard_batch({k: v[start:stop] for k, v in batch.items()}, self.mesh, self.rules)

    def prepare(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The ids of one request, the context cut from the left if the pair exceeds the context window."""
        context_ids, continuation_ids = split_tokens(self.tokenizer, context, continuation)
        room = self.max_len + 1 - len(continuation_ids)  # the model reads every token but the last
        self._note_cut(len(context_ids), room)
        context_ids, _ = fit_context(context_ids, room, f"a continuation of {len(continuation_ids)} tokens")
        return context_ids, continuation_ids

    def _note_cut(self, length: int, room: int) -> None:
        """Count a prompt cut from the left; the first cut of this scorer is also logged."""
        if length > room >= 1:
            if not self.truncated:
                logging.warning("a prompt of %d tokens was cut from the left to the %d that fit max_len=%d "
                                "(further cuts are counted, not logged)", length, room, self.max_len)
            self.truncated += 1

    def loglikelihoods(self, groups: Sequence[Sequence[tuple[str, str]]]) -> list[list[Score]]:
        """Scores of (context, continuation) requests; each group (e.g. one example's choices) is
        scored in one batch, several small groups sharing a batch."""
        pairs = [[self.prepare(c, x) for c, x in group] for group in groups]
        out: list[list[Score]] = [[] for _ in groups]
        batch: list[tuple[int, list[int], list[int]]] = []

        def flush():
            if batch:
                for (g, _, _), score in zip(batch, self._score_rows([(c, x) for _, c, x in batch])):
                    out[g].append(score)
                batch.clear()

        for g, group in enumerate(pairs):
            if batch and len(batch) + len(group) > self.batch_size:
                flush()
            batch.extend((g, c, x) for c, x in group)
        flush()
        return out

    def score_ids(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """Scores of (context ids, continuation ids) rows that already fit the context window."""
        for c, x in rows:
            if not c or len(c) + len(x) - 1 > self.max_len:
                raise TooLongError(f"a row of {len(c)} context and {len(x)} continuation tokens does not fit "
                                   f"max_len={self.max_len} (or has no context)")
        return [s for start in range(0, len(rows), self.batch_size)
                for s in self._score_rows(list(rows[start : start + self.batch_size]))]

    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[Score]:
        B = max(self.batch_size, -(-len(rows) // self.row_multiple) * self.row_multiple)
        L = _bucket(max(len(c) + len(x) - 1 for c, x in rows), self.max_len)
        inputs, targets, weights = (np.zeros((B, L), np.int32) for _ in range(3))
        for r, (c, x) in enumerate(rows):
            seq = c + x
            inputs[r, : len(seq) - 1] = seq[:-1]
            targets[r, : len(seq) - 1] = seq[1:]
            weights[r, len(c) - 1 : len(seq) - 1] = 1
        logprob_B, hits_BxL = _continuation_scores(self.cfg, self.params, **self._place(
            {"inputs": inputs, "targets": targets, "weights": weights}))
        logprob_B, hits_BxL = np.asarray(logprob_B), np.asarray(hits_BxL)
        hits = [tuple(bool(h) for h in hits_BxL[r, len(c) - 1 : len(c) + len(x) - 1]) for r, (c, x) in enumerate(rows)]
        return [Score(float(logprob_B[r]), len(x), all(hits[r]), hits[r]) for r, (_, x) in enumerate(rows)]

    def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, up to EOS) of `prompts`, each cut from the left to leave
        room for `max_new_tokens`."""
        ids = []
        for text in prompts:
            context_ids, _ = split_tokens(self.tokenizer, text, "")
            self._note_cut(len(context_ids), self.max_len - max_new_tokens)
            ids.append(fit_context(context_ids, self.max_len - max_new_tokens, f"max_new_tokens={max_new_tokens}")[0])
        eos = self.tokenizer.eos_id if self.tokenizer.eos_id >= 0 else None
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # a fixed batch: one program
            new = model.generate(self.cfg, self.params, padded, max_new_tokens, temperature=0.0, eos_id=eos,
                                 min_prompt_len=_bucket(max(map(len, chunk)), self.max_len))
            out += new[: len(chunk)]
        return out


@functools.partial(jax.jit, static_argnums=0)
def _continuation_scores(cfg, params, inputs, targets, weights):
    """(sum of weighted target log-probabilities per row, whether each target is the argmax)."""
    logits_BxLxV = quant_lib.model_for(cfg).apply({"params": params}, inputs)
    logprobs_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    target_BxL = jnp.take_along_axis(logprobs_BxLxV, targets[..., None], axis=-1)[..., 0]
    weights_BxL = weights.astype(jnp.float32)
    is_argmax_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets
    return jnp.sum(target_BxL * weights_BxL, axis=-1), is_argmax_BxL


def leading_tokens(tokenizer: data.Tokenizer, ids: Sequence[int], text: str) -> list[int]:
    """The longest start of `ids` that decodes to a prefix of `text` (generated ids cut where their
    decoded text was cut, without re-tokenizing it)."""
    n = 0
    while n < len(ids) and text.startswith(tokenizer.decode(ids[: n + 1])):
        n += 1
    return list(ids[:n])


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]
