"""Evaluation tasks as data: BIG-bench JSON tasks read natively, and a small JSONL format of our own.

A task is a list of examples plus how to lay them out in a prompt. Both formats become the same
`Task`, so scoring never knows where a task came from.

BIG-bench JSON (`task.json`, or a directory holding one): `examples` of `input` with `target` (a
string or a list of acceptable strings) and/or `target_scores` (choice -> credit); the prompt keys
`task_prefix`, `example_input_prefix` ("\\nQ: "), `example_output_prefix` ("\\nA: "), `choice_prefix`
("\\n  choice: "), `few_shot_example_separator` ("\\n"), `append_choices_to_input` (true); `output_regex`,
`stop_string`; `metrics` (BIG-bench's defaults in brackets). A directory whose subdirectories hold
`task.json` files is a task with subtasks: each becomes a task named `parent/subtask`.

JSONL (`*.jsonl`): one example per line, `{"context": ..., "choices": [...], "answer": i}` (multiple
choice) or `{"context": ..., "target": ... }` (cloze or generation; a list means any of them is right).
An optional first line `{"task": {...}}` sets `name`, `kind` (`multiple_choice` | `cloze` |
`generation`, else inferred from the first example), `stop` (list), `output_regex`, `prefix`,
`separator` (default "\\n\\n") and `max_new_tokens`. Contexts and continuations are joined as written
(lm-eval's convention: a choice usually starts with a space).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

# What each metric needs from every example of a task that asks for it.
MULTIPLE_CHOICE = "multiple_choice_grade"  # credit of the likeliest choice (accuracy with 0/1 credit)
EXACT_MATCH = "exact_str_match"  # greedy output, cut at a stop string and output_regex, equals a target
GREEDY_MATCH = "greedy_match"  # every target token is the argmax under teacher forcing (cloze, LAMBADA-style)
METRICS = (MULTIPLE_CHOICE, EXACT_MATCH, GREEDY_MATCH)
KINDS = {"multiple_choice": (MULTIPLE_CHOICE,), "generation": (EXACT_MATCH,), "cloze": (GREEDY_MATCH,)}


@dataclasses.dataclass(frozen=True)
class Example:
    """One item: the input text, acceptable answers to generate, and/or choices with their credit."""

    input: str
    targets: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    choice_scores: tuple[float, ...] = ()

    @property
    def answer(self) -> str:
        """The text a demonstration shows as this example's answer: the first target, else the best choice."""
        if self.targets:
            return self.targets[0]
        return self.choices[max(range(len(self.choices)), key=lambda i: self.choice_scores[i])]


@dataclasses.dataclass(frozen=True)
class Task:
    """Examples and their prompt layout (defaults: BIG-bench's)."""

    name: str
    examples: tuple[Example, ...]
    metrics: tuple[str, ...]
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    separator: str = "\n"
    append_choices: bool = True
    output_regex: str | None = None
    stop_strings: tuple[str, ...] | None = None  # None: the default stops of prompts.stop_strings
    max_new_tokens: int | None = None  # None: the longest answer's tokens + a margin
    source: str = ""
    canary: str = ""

    @property
    def multiple_choice(self) -> bool:
        return MULTIPLE_CHOICE in self.metrics

    @property
    def has_targets(self) -> bool:
        return EXACT_MATCH in self.metrics or GREEDY_MATCH in self.metrics


def load_tasks(path: str) -> list[Task]:
    """The tasks at `path`: a BIG-bench task.json, a directory of one (with subtasks), or a .jsonl file."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return _load_bigbench_dir(path, os.path.basename(os.path.normpath(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task {path} does not exist (expected a task.json, a directory holding one, or a .jsonl)")
    if path.endswith(".jsonl"):
        return [_load_jsonl(path)]
    if path.endswith(".json"):
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return [_bigbench_task(_read_json(path), path, name)]
    raise ValueError(f"task {path}: unknown format; expected a BIG-bench .json task or a .jsonl task")


def _load_bigbench_dir(directory: str, name: str) -> list[Task]:
    tasks = []
    task_file = os.path.join(directory, "task.json")
    if os.path.isfile(task_file):
        data = _read_json(task_file)
        if data.get("examples"):
            tasks.append(_bigbench_task(data, task_file, name))
    for sub in sorted(os.listdir(directory)):
        if os.path.isdir(os.path.join(directory, sub)) and _holds_task(os.path.join(directory, sub)):
            tasks += _load_bigbench_dir(os.path.join(directory, sub), f"{name}/{sub}")
    if not tasks:
        raise ValueError(f"task directory {directory} holds no task.json with examples (nor subtasks that do)")
    return tasks


def _holds_task(directory: str) -> bool:
    return any(files and "task.json" in files for _, _, files in os.walk(directory))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"task {path}: not valid JSON ({e})") from None


def _strings(value: Any, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if (not values and not allow_empty) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where} must be a string or a non-empty list of strings, got {value!r}")
    return tuple(values)


def _check_metrics(metrics: Any, where: str) -> tuple[str, ...]:
    if isinstance(metrics, str) or not isinstance(metrics, list | tuple):
        raise ValueError(f"{where}: 'metrics' must be a list, got {metrics!r}")  # noqa: TRY004 - a bad file, not a bug
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metric {unknown[0]!r}; this harness scores {', '.join(METRICS)}")
    return tuple(metrics)


def _require(task: Task) -> Task:
    """Every example has what the task's metrics need."""
    if not task.examples:
        raise ValueError(f"task {task.source}: no examples")
    for i, ex in enumerate(task.examples):
        if task.multiple_choice and not ex.choices:
            raise ValueError(f"task {task.source}: example {i} has no choices ('target_scores' / 'choices'), "
                             f"which metric {MULTIPLE_CHOICE!r} needs")
        if task.has_targets and not ex.targets:
            raise ValueError(f"task {task.source}: example {i} has no 'target', which metric "
                             f"{EXACT_MATCH if EXACT_MATCH in task.metrics else GREEDY_MATCH!r} needs")
    if task.output_regex is not None:
        try:
            re.compile(task.output_regex)
        except re.error as e:
            raise ValueError(f"task {task.source}: output_regex {task.output_regex!r} is not a regex ({e})") from None
    return task


def _bigbench_task(data: Any, path: str, name: str) -> Task:
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError(f"task {path}: a BIG-bench task is a JSON object with a list of 'examples'")  # noqa: TRY004
    examples = []
    for i, raw in enumerate(data["examples"]):
        where = f"task {path}: example {i}"
        if not isinstance(raw, dict) or "input" not in raw:
            raise ValueError(f"{where} has no 'input'")
        if "target" not in raw and "target_scores" not in raw:
            raise ValueError(f"{where} has neither 'target' nor 'target_scores'")
        targets = _strings(raw["target"], f"{where}: 'target'") if "target" in raw else ()
        scores = raw.get("target_scores", {})
        if not isinstance(scores, dict) or not all(isinstance(v, int | float) for v in scores.values()):
            raise ValueError(f"{where}: 'target_scores' must map each choice to a number")
        examples.append(Example(str(raw["input"]), targets, tuple(scores), tuple(float(v) for v in scores.values())))
    default_metrics = [MULTIPLE_CHOICE] if all(e.choices for e in examples) else [EXACT_MATCH]
    stop = data.get("stop_string")
    return _require(Task(
        name=str(data.get("name", name)) if "/" not in name else name,
        examples=tuple(examples),
        metrics=_check_metrics(data.get("metrics", default_metrics), f"task {path}"),
        task_prefix=str(data.get("task_prefix", "")),
        input_prefix=str(data.get("example_input_prefix", "\nQ: ")),
        output_prefix=str(data.get("example_output_prefix", "\nA: ")),
        choice_prefix=str(data.get("choice_prefix", "\n  choice: ")),
        separator=str(data.get("few_shot_example_separator", "\n")),
        append_choices=bool(data.get("append_choices_to_input", True)),
        output_regex=data.get("output_regex"),
        stop_strings=None if stop is None else (str(stop),),
        source=path,
        canary=str(data.get("canary", "")),
    ))


def _load_jsonl(path: str) -> Task:
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"task {path}, line {n}: not valid JSON ({e})") from None
    header: dict = {}
    if rows and isinstance(rows[0][1], dict) and "task" in rows[0][1]:
        header = rows.pop(0)[1]["task"]
    examples = []
    for n, raw in rows:
        where = f"task {path}, line {n}"
        if not isinstance(raw, dict) or "context" not in raw:
            raise ValueError(f"{where}: no 'context'")
        if "choices" in raw:
            choices = _strings(raw["choices"], f"{where}: 'choices'")
            answer = raw.get("answer")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1}), "
                                 f"got {answer!r}")
            examples.append(Example(str(raw["context"]), (), choices,
                                    tuple(float(i == answer) for i in range(len(choices)))))
        elif "target" in raw:
            examples.append(Example(str(raw["context"]), _strings(raw["target"], f"{where}: 'target'")))
        else:
            raise ValueError(f"{where}: neither 'choices' (with 'answer') nor 'target'")
    kind = header.get("kind") or ("multiple_choice" if examples and examples[0].choices else "generation")
    if kind not in KINDS:
        raise ValueError(f"task {path}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    stop = header.get("stop")
    return _require(Task(
        name=str(header.get("name", os.path.splitext(os.path.basename(path))[0])),
        examples=tuple(examples),
        metrics=_check_metrics(header.get("metrics", list(KINDS[kind])), f"task {path}"),
        task_prefix=str(header.get("prefix", "")),
        input_prefix="",
        output_prefix="",
        separator=str(header.get("separator", "\n\n")),
        append_choices=False,
        output_regex=header.get("output_regex"),
        stop_strings=None if stop is None else _strings(stop, f"task {path}: 'stop'", allow_empty=True),
        max_new_tokens=header.get("max_new_tokens"),
        source=path,
    ))
