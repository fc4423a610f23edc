"""Evaluating trained models: tasks as data, log-likelihood and generation scoring, in-context learning.

  tasks.py      BIG-bench JSON tasks (with subtasks) and a JSONL format -> `Task`
  prompts.py    k-shot prompts: seeded demonstrations that never include the evaluated example
  scoring.py    jitted log-likelihoods of continuations, greedy continuations, edit distance
  harness.py    the metrics of a task, a checkpoint, every checkpoint of a run; DIR/evals/<step>.json
  induction.py  the in-context-learning (induction) score over a run; a synthetic key->value task
  exposure.py   exposure bias: accuracy vs output length, free-running vs teacher-forced, on addition
  __main__.py   `python -m lmjax.evals --workdir=DIR --tasks=PATH[,PATH] --shots=0,1,5`
"""

from lmjax.evals.harness import evaluate, evaluate_task, evaluate_workdir
from lmjax.evals.scoring import Scorer, TooLongError, split_tokens
from lmjax.evals.tasks import Example, Task, load_tasks

__all__ = ["Example", "Scorer", "Task", "TooLongError", "evaluate", "evaluate_task", "evaluate_workdir",
           "load_tasks", "split_tokens"]
