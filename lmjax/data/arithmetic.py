"""A synthetic arithmetic corpus: the `arithmetic:` data source, made from a seed.

It lives with the data sources, not the evaluations, because it is training text: models learn
arithmetic from it and are then asked BIG-bench's `arithmetic` questions, so it is written in the
layout the harness gives BIG-bench prompts (`lmjax.evals.prompts`, BIG-bench's default prefixes):
a document is one operation at one number of digits, like a k-shot prompt of one subtask,

    "\\nQ: What is 12 plus 7?\\nA: 19\\n\\nQ: What is 40 plus 13?\\nA: 53"

and a prompt is such a document cut after its last "A: ". Every problem is drawn from a generator
seeded by (seed, split, document): nothing is read from BIG-bench. Its problems come from the same
small spaces (2-digit addition has 8,100 questions), so a corpus drawn from all of a space holds most
of BIG-bench's questions by chance; `holdout` leaves a fixed share of every space out (a question
is never generated when a hash of its text falls below it), and `questions()` lets an evaluation
keep only the questions a model never saw.

Source string: `arithmetic:SEED` or
`arithmetic:seed=S,digits=N,documents=M,problems=P,ops=add+sub,holdout=F` (defaults below; `ops`
from add, sub, mul, div). The validation split has `round(documents * data.val_fraction)` documents
from its own stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from lmjax.data.sources import stable_fraction

VERSION = "2"  # part of the source's fingerprint: bump it when the same spec makes other text
INPUT_PREFIX = "\nQ: "  # BIG-bench's example_input_prefix default
OUTPUT_PREFIX = "\nA: "  # its example_output_prefix default
SEPARATOR = "\n"  # its few_shot_example_separator default
SPLIT_STREAMS = {"train": 0, "validation": 1}
MAX_DRAWS = 1000  # per problem: a holdout that leaves a space (nearly) empty fails instead of looping


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not a multiple of {b}")
    return a // b


# op -> (the word BIG-bench's questions use, the operation on Python ints)
OPERATIONS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("plus", lambda a, b: a + b),
    "sub": ("minus", lambda a, b: a - b),
    "mul": ("times", lambda a, b: a * b),
    "div": ("divided by", _divide),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """What an `arithmetic:` source generates."""

    seed: int = 0
    digits: int = 3  # operands of 1..digits digits (a document draws one count for all its problems)
    documents: int = 20_000  # in the train split
    problems: int = 8  # per document
    ops: tuple[str, ...] = ("add", "sub", "mul", "div")
    holdout: float = 0.0  # share of every problem space never generated (by a hash of the question)


_INT_FIELDS = ("seed", "digits", "documents", "problems")


def parse(arg: str) -> Spec:
    """The Spec of `arithmetic:<arg>` (`arg` is a bare seed or comma-separated key=value pairs)."""
    where = f"data.source 'arithmetic:{arg}'"
    fields: dict = {}
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "seed", item
        if key in _INT_FIELDS:
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"{where}: {key} must be an integer, got {value!r}") from None
        elif key == "holdout":
            try:
                fields[key] = float(value)
            except ValueError:
                raise ValueError(f"{where}: holdout must be a number, got {value!r}") from None
            if not 0.0 <= fields[key] < 1.0:
                raise ValueError(f"{where}: holdout must be in [0, 1), got {value}")
        elif key == "ops":
            ops = tuple(value.split("+"))
            unknown = [o for o in ops if o not in OPERATIONS]
            if unknown or not value:
                raise ValueError(f"{where}: unknown op {unknown[0] if unknown else value!r}; "
                                 f"ops are {'+'.join(OPERATIONS)}")
            fields["ops"] = ops
        else:
            raise ValueError(f"{where}: unknown key {key!r}; keys are {', '.join(_INT_FIELDS)}, ops, holdout")
        if key in ("digits", "documents", "problems") and fields[key] < 1:
            raise ValueError(f"{where}: {key} must be >= 1, got {fields[key]}")
    return Spec(**fields)


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {OPERATIONS[op][0]} {b}?"


def answer(a: int, op: str, b: int) -> str:
    return str(OPERATIONS[op][1](a, b))


def _low_high(digits: int) -> tuple[int, int]:
    """The numbers with exactly `digits` digits: [low, high) (0..9 for one digit)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits


def _divisor(rng: np.random.Generator, dividend: int) -> int:
    """One of `dividend`'s divisors, drawn uniformly: BIG-bench's divisions are exact."""
    small = [d for d in range(1, int(dividend**0.5) + 1) if dividend % d == 0]
    divisors = sorted({*small, *(dividend // d for d in small)})
    return divisors[int(rng.integers(len(divisors)))]


def held_out(question_text: str, holdout: float) -> bool:
    """Whether a question is in the share of its space that is never generated."""
    return stable_fraction(question_text) < holdout


def _draw(rng: np.random.Generator, op: str, digits: int) -> tuple[int, int]:
    a, b = (int(x) for x in rng.integers(*_low_high(digits), size=2))
    if op == "div":  # a `digits`-digit dividend (not 0) over one of its divisors
        a = max(a, 1)
        b = _divisor(rng, a)
    return a, b


def problems(spec: Spec, split: str, document: int) -> list[tuple[int, str, int]]:
    """The (a, op, b) problems of one document of a split: a pure function of (seed, split, document)."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
    rng = np.random.default_rng([spec.seed, SPLIT_STREAMS[split], document])
    op = spec.ops[int(rng.integers(len(spec.ops)))]
    digits = int(rng.integers(1, spec.digits + 1))
    out = []
    for _ in range(MAX_DRAWS * spec.problems):
        a, b = _draw(rng, op, digits)
        if not spec.holdout or not held_out(question(a, op, b), spec.holdout):
            out.append((a, op, b))
            if len(out) == spec.problems:
                return out
    raise ValueError(f"arithmetic: holdout={spec.holdout} leaves (almost) no {digits}-digit {op} problem to draw")


def render(items: list[tuple[int, str, int]]) -> str:
    """Problems with their answers, laid out as a BIG-bench k-shot prompt with every answer shown."""
    return SEPARATOR.join(f"{INPUT_PREFIX}{question(a, op, b)}{OUTPUT_PREFIX}{answer(a, op, b)}" for a, op, b in items)


def num_documents(spec: Spec, split: str, val_fraction: float) -> int:
    return spec.documents if split == "train" else max(1, round(spec.documents * val_fraction))


def documents(spec: Spec, split: str, val_fraction: float) -> list[str]:
    return [render(problems(spec, split, i)) for i in range(num_documents(spec, split, val_fraction))]


def questions(spec: Spec, split: str, val_fraction: float) -> Iterator[str]:
    """Every question of a split (to check an evaluation set against)."""
    for i in range(num_documents(spec, split, val_fraction)):
        for a, op, b in problems(spec, split, i):
            yield question(a, op, b)
