"""A synthetic task whose answers a program can check: adding two small numbers.

`python -m lmjax.posttrain.synthetic --out_dir=DIR` writes sft_{train,eval}.jsonl ("12+7=" -> "19")
and pairs_{train,eval}.jsonl (the right sum chosen, a wrong one rejected), for tests, demos and
trying the commands without any download. `judge` is the checker.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from lmjax import fileio


def _sums(count: int, seed: int, max_operand: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, max_operand + 1, (2, count))
    return [(f"{x}+{y}=", int(x + y)) for x, y in zip(a, b)]


def sft_examples(count: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    return [{"prompt": prompt, "response": str(total)} for prompt, total in _sums(count, seed, max_operand)]


def preference_pairs(count: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """The right sum chosen, a sum off by 1..5 (never negative) rejected."""
    rng = np.random.default_rng(seed + 1)
    pairs = []
    for prompt, total in _sums(count, seed, max_operand):
        wrong = total + int(rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5]))
        wrong = wrong if wrong >= 0 else total + abs(wrong)
        pairs.append({"prompt": prompt, "chosen": str(total), "rejected": str(wrong)})
    return pairs


def judge(prompt: str, response: str) -> bool:
    """Whether `response` is the sum asked for by `prompt` ("a+b=")."""
    a, b = prompt.rstrip("=").split("+")
    return response.strip() == str(int(a) + int(b))


def write_all(out_dir: str, train: int = 512, evaluation: int = 64, max_operand: int = 20) -> dict[str, str]:
    """The four files (train and eval use different seeds); returns their paths by name."""
    return {
        "sft_train": fileio.write_jsonl(os.path.join(out_dir, "sft_train.jsonl"), sft_examples(train, 0, max_operand)),
        "sft_eval": fileio.write_jsonl(os.path.join(out_dir, "sft_eval.jsonl"), sft_examples(evaluation, 1, max_operand)),
        "pairs_train": fileio.write_jsonl(os.path.join(out_dir, "pairs_train.jsonl"), preference_pairs(train, 2, max_operand)),
        "pairs_eval": fileio.write_jsonl(os.path.join(out_dir, "pairs_eval.jsonl"), preference_pairs(evaluation, 3, max_operand)),
    }


_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory for the .jsonl files.")
_TRAIN = flags.DEFINE_integer("train", 512, "Examples in each train file.")
_EVAL = flags.DEFINE_integer("eval", 64, "Examples in each eval file.")


def main(argv: list[str]) -> None:
    del argv
    for name, path in write_all(_OUT_DIR.value, _TRAIN.value, _EVAL.value).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    flags.mark_flag_as_required("out_dir")
    app.run(main)
