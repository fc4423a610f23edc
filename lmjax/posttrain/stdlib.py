"""Instruction data from the standard library: a function's signature and docstring -> its body.

`python -m lmjax.posttrain.stdlib --out_dir=DIR` writes sft_train.jsonl and sft_eval.jsonl, one
function per line: the prompt is the `def` line(s) and the docstring, the response the rest of the
body, both dedented to the `def`, so prompt + response is the function's source. The split is the
`pystdlib` source's own (by file, `data.val_fraction`), so evaluation functions come from files a
model pretrained on `pystdlib` never trained on. `parses` is a judge a reward model never sees:
whether prompt + response is valid Python.
"""

from __future__ import annotations

import ast
import os
import textwrap
import warnings

from absl import app, flags

from lmjax import config, fileio
from lmjax.data import sources

MAX_CHARS = 400  # prompt and response each: short functions fit a small model's context


def function_examples(source: str, max_chars: int = MAX_CHARS) -> list[dict]:
    """{"prompt", "response"} for each documented function of `source` whose body has code after
    the docstring and whose prompt and response each fit `max_chars`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in old stdlib strings
        tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    examples = []
    for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):  # in source order
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node) is None:
            continue
        docstring, first = node.body[0], node.body[1]
        if first.lineno <= docstring.end_lineno:  # code on the docstring's line
            continue
        column = node.col_offset
        text = "".join(lines[node.lineno - 1 : node.end_lineno])
        if any(line.strip() and len(line) - len(line.lstrip()) < column for line in text.splitlines()):
            continue  # a continuation line left of the def (e.g. inside a string): cannot dedent
        prompt = "".join(line[column:] for line in lines[node.lineno - 1 : docstring.end_lineno])
        response = "".join(line[column:] if line.strip() else line.lstrip(" ")
                           for line in lines[docstring.end_lineno : node.end_lineno])
        if not prompt.lstrip().startswith(("def ", "async def ")) or not response.strip():
            continue
        if len(prompt) <= max_chars and len(response) <= max_chars and "\t" not in prompt + response:
            examples.append({"prompt": prompt, "response": response})
    return examples


def parses(prompt: str, response: str) -> bool:
    """Whether the function (prompt + response) is valid Python with a body beyond its docstring."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(textwrap.dedent(prompt + response))
    except (SyntaxError, ValueError):
        return False
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return len(tree.body) == 1 and len(functions) == 1 and len(functions[0].body) >= 2


def _split_examples(split: str, val_fraction: float, max_chars: int) -> list[dict]:
    """The examples of one split of the standard library, each prompt once (first file wins)."""
    root, seen, out = sources.pystdlib_root(), set(), []
    for name in sources.pystdlib_split_files(split, val_fraction):
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                examples = function_examples(f.read(), max_chars)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # stdlib files that are deliberately broken (test data for the parser)
        for example in examples:
            if example["prompt"] not in seen:
                seen.add(example["prompt"])
                out.append(example)
    return out


def train_and_validation(val_fraction: float, max_chars: int = MAX_CHARS) -> tuple[list[dict], list[dict]]:
    """The two splits; a validation function whose prompt also occurs in a training file (code copied
    between modules) is dropped, so validation prompts are unseen."""
    train = _split_examples("train", val_fraction, max_chars)
    seen = {e["prompt"] for e in train}
    return train, [e for e in _split_examples("validation", val_fraction, max_chars) if e["prompt"] not in seen]


_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory for sft_train.jsonl and sft_eval.jsonl.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", config.default_config().data.val_fraction,
                                   "The pystdlib source's validation fraction (by file): data.val_fraction.")
_MAX_CHARS = flags.DEFINE_integer("max_chars", MAX_CHARS, "Longest prompt and longest response, in characters.")


def main(argv: list[str]) -> None:
    del argv
    splits = train_and_validation(_VAL_FRACTION.value, _MAX_CHARS.value)
    for split, examples, name in zip(("train", "validation"), splits, ("sft_train.jsonl", "sft_eval.jsonl")):
        print(f"{split}: {len(examples)} functions -> {fileio.write_jsonl(os.path.join(_OUT_DIR.value, name), examples)}")

if __name__ == "__main__":
    flags.mark_flag_as_required("out_dir")
    app.run(main)
