"""k-shot prompts: which demonstrations an example gets, and how a task lays them out.

A prompt is `task_prefix + separator.join(demonstrations + [query])`; a query is
`input_prefix + input (+ choice_prefix + choice, for each choice when the task appends them) +
output_prefix`, and a demonstration is a query followed by its answer. The demonstrations of
example i are k other examples drawn without replacement by a generator seeded with (seed, k, i):
the same prompt on every run and whatever subset of examples is evaluated. The evaluated example
is never one of them, nor any example with the same input text (BIG-bench tasks repeat some inputs).
"""

from __future__ import annotations

import numpy as np

from lmjax.evals.tasks import Example, Task


def shot_indices(task: Task, index: int, k: int, seed: int) -> list[int]:
    """The k demonstrations of example `index`: seeded, never `index` nor one with its input."""
    if k == 0:
        return []
    query = task.examples[index].input
    pool = [i for i, ex in enumerate(task.examples) if i != index and ex.input != query]
    if len(pool) < k:
        raise ValueError(f"task {task.name}: {k} shots need {k} other examples, but example {index} has "
                         f"{len(pool)} with a different input")
    rng = np.random.default_rng([seed, k, index])
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def choice_order(task: Task, index: int, seed: int) -> list[str]:
    """The choices as listed in the prompt: a seeded permutation, so that the right one's place
    tells nothing (BIG-bench permutes them too)."""
    choices = sorted(task.examples[index].choices)
    return [choices[i] for i in np.random.default_rng([seed, index]).permutation(len(choices))]


def query(task: Task, index: int, *, with_choices: bool, seed: int) -> str:
    """Example `index` up to where its answer starts."""
    text = task.input_prefix + task.examples[index].input
    if with_choices and task.append_choices and task.examples[index].choices:
        text += "".join(task.choice_prefix + c for c in choice_order(task, index, seed))
    return text + task.output_prefix


def prompt(task: Task, index: int, k: int, seed: int, *, multiple_choice: bool) -> str:
    """The k-shot prompt of example `index`: for its choices (`multiple_choice`), or for generating
    and scoring its target."""
    shots = [
        query(task, i, with_choices=multiple_choice, seed=seed) + demonstration_answer(task.examples[i], multiple_choice)
        for i in shot_indices(task, index, k, seed)
    ]
    return task.task_prefix + task.separator.join(shots + [query(task, index, with_choices=multiple_choice, seed=seed)])


def demonstration_answer(example: Example, multiple_choice: bool) -> str:
    """A demonstration's answer: its best choice in a multiple-choice prompt, else its first target."""
    if multiple_choice and example.choices:
        return example.choices[int(np.argmax(example.choice_scores))]
    return example.answer


def stop_strings(task: Task) -> tuple[str, ...]:
    """Where a generated answer ends: the task's own stop strings, else the few-shot separator and the
    input prefix (what the model writes when it starts the next example), leaving out any that
    occurs inside an answer of the task (a stop inside a right answer would cut it)."""
    if task.stop_strings is not None:
        return task.stop_strings
    answers = [t for ex in task.examples for t in (ex.targets or (ex.answer,))]
    candidates = [s for s in (task.separator, task.input_prefix) if s]
    return tuple(s for s in dict.fromkeys(candidates) if not any(s in a for a in answers))
