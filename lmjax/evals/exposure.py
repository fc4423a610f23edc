"""Exposure bias: how much worse a model does reading its own outputs than reading the gold ones.

A model trained with teacher forcing only ever conditions on gold prefixes; when it generates, it
conditions on its own, and one wrong token can derail the rest ("errors compound"). Two seeded
tasks where they do:
  addition       `width`-digit numbers written least-significant digit first and zero-padded
                 ("7500+8600=52100" is 57 + 68 = 125 at width 4): each answer digit is a function of
                 two operand digits at fixed distances and a carry, which is most easily read off the
                 digit written before it (it is 1 exactly when that digit is smaller than the sum of
                 its two operand digits), so an error there can spread.
  digit_sum      k starting digits, then each digit the last digit of the sum of the k before it
                 (k = 2: Fibonacci mod 10): only nearby tokens matter, and after a wrong digit the
                 gold continuation can only be recovered by recomputing the wrong digit from the
                 ones before it instead of trusting it.

Accuracy vs output length: for each t, over the answers with at least t tokens (the answer's end,
EOS, counted as its last token):
  teacher_forced_token_acc   token t is the argmax given the gold tokens before it
  free_running_token_acc     greedy generation from the question wrote token t
  teacher_forced_exact       tokens 1..t are all the argmax given the gold prefix (at the full
                             length: the Scorer's `greedy_match`)
  free_running_exact         greedy generation wrote tokens 1..t
The two exact matches agree by construction: greedy decoding reproduces a prefix exactly when each
of its tokens is the argmax given the gold tokens before it. The token accuracies differ: after a
free-running error the later tokens are predicted from a prefix the model wrote, so the gap between
them is the cost of reading one's own mistakes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from lmjax.evals.scoring import Scorer

def addition_problem(a: int, b: int, width: int) -> tuple[str, str]:
    """(question, answer) of a + b: operands as `width` digits, the sum as width + 1, every number
    least-significant digit first."""
    if not (0 <= a < 10**width and 0 <= b < 10**width):
        raise ValueError(f"addition_problem operands must be in [0, 10**{width}), got {a} and {b}")
    return f"{a:0{width}d}"[::-1] + "+" + f"{b:0{width}d}"[::-1] + "=", f"{a + b:0{width + 1}d}"[::-1]


def addition_problems(count: int, width: int, seed: int, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """`count` seeded problems with operands uniform in [0, 10**width); questions in `exclude` (an
    evaluation set) are skipped."""
    if width < 1:
        raise ValueError(f"width={width} must be >= 1")
    excluded = frozenset(exclude)
    rng = np.random.default_rng(seed)
    problems: list[tuple[str, str]] = []
    while len(problems) < count:
        a, b = (int(x) for x in rng.integers(0, 10**width, size=2))
        problem = addition_problem(a, b, width)
        if problem[0] not in excluded:
            problems.append(problem)
    return problems


def digit_sum_problem(start: str, length: int) -> tuple[str, str]:
    """(question, answer): k = len(start) starting digits, then the next `length` digits of the
    sequence in which each digit is the last digit of the sum of the k before it (k = 2: the
    Fibonacci numbers mod 10; "123:" -> "61078503" at k = 3, length 8)."""
    if len(start) < 2 or not start.isdigit():
        raise ValueError(f"digit_sum_problem starts from at least two digits, got {start!r}")
    digits = [int(c) for c in start]
    for _ in range(length):
        digits.append(sum(digits[-len(start):]) % 10)
    return start + ":", "".join(map(str, digits[len(start):]))


def digit_sum_problems(count: int, terms: int, length: int, seed: int) -> list[tuple[str, str]]:
    """`count` seeded problems summing `terms` digits, their starting digits uniform (there are only
    10**terms distinct problems)."""
    rng = np.random.default_rng(seed)
    return [digit_sum_problem("".join(map(str, rng.integers(0, 10, size=terms))), length) for _ in range(count)]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One answer's tokens (ending with EOS), what greedy decoding wrote instead (ending with EOS if
    it stopped), and whether each answer token is the argmax given the gold tokens before it."""

    gold: tuple[int, ...]
    free_running: tuple[int, ...]
    teacher_forced_hits: tuple[bool, ...]


def run_problems(scorer: Scorer, problems: Sequence[tuple[str, str]]) -> list[Outcome]:
    """Score every (question, answer) teacher-forced and generate its answer greedily."""
    eos = scorer.tokenizer.eos_id
    if eos < 0:
        raise ValueError("exposure-bias evaluation needs a tokenizer with EOS to end answers")
    rows = []
    for question, answer in problems:
        context_ids, answer_ids = scorer.prepare(question, answer)
        rows.append((context_ids, answer_ids + [eos]))
    scores = scorer.score_ids(rows)
    budget = max(len(gold) for _, gold in rows)
    generated = scorer.greedy([question for question, _ in problems], budget)
    return [Outcome(tuple(gold), tuple(out) + ((eos,) if len(out) < budget else ()), score.argmax_hits)
            for (_, gold), out, score in zip(rows, generated, scores)]


def accuracy_by_length(outcomes: Sequence[Outcome]) -> dict[int, dict[str, float]]:
    """For each output length t (1 to the longest answer): the number of answers with at least t
    tokens and the four accuracies of the module docstring over them."""
    if not outcomes:
        raise ValueError("accuracy_by_length needs at least one outcome")
    table = {}
    for t in range(1, max(len(o.gold) for o in outcomes) + 1):
        group = [o for o in outcomes if len(o.gold) >= t]
        free = [[i < len(o.free_running) and o.free_running[i] == g for i, g in enumerate(o.gold[:t])] for o in group]
        table[t] = {
            "examples": len(group),
            "teacher_forced_token_acc": float(np.mean([o.teacher_forced_hits[t - 1] for o in group])),
            "free_running_token_acc": float(np.mean([hits[t - 1] for hits in free])),
            "teacher_forced_exact": float(np.mean([all(o.teacher_forced_hits[:t]) for o in group])),
            "free_running_exact": float(np.mean([all(hits) for hits in free])),
        }
    return table
