"""Evaluating a model on tasks: the metrics of a task at k shots, of a checkpoint, of a whole run.

Per task and number of shots k (`evaluate_task`):
  multiple_choice_grade       credit (target_scores; 1/0 for one right answer) of the choice with
                              the highest summed log-probability: accuracy, BIG-bench's grade
  multiple_choice_grade_norm  the same with each choice's log-probability divided by its length
                              in UTF-8 bytes (lm-eval's acc_norm divides by characters; the two
                              agree on ASCII text; bytes do not depend on the tokenizer either)
  exact_str_match             the greedy output, cut at the first stop string, then the first match
                              of the task's output_regex if it has one, equals a target (both stripped)
  greedy_match                every target token is the argmax given the gold prefix (cloze tasks)
and the continuous metrics of every task, computed on the answer (the first target, else the
best choice) given the generation prompt (the multiple-choice prompt when there are no targets):
  target_logprob              log p(answer | prompt) in nats, mean over examples
  target_logprob_per_token    the same divided by the answer's token count, mean over examples
  edit_distance               token Levenshtein distance between the greedy output (cut at a stop
                              string) and the answer, mean over examples
plus `examples` and `truncated_prompts` (prompts cut from the left to fit the context).
Greedy outputs run for the longest answer's token count + GENERATION_MARGIN tokens, unless the
task sets max_new_tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from ml_collections import config_dict

from lmjax import config as config_lib
from lmjax import fileio
from lmjax.evals import prompts
from lmjax.evals.scoring import Scorer, edit_distance, leading_tokens, split_tokens
from lmjax.evals.tasks import EXACT_MATCH, GREEDY_MATCH, Task, load_tasks
from lmjax.infer import quantization
from lmjax.model import quantization as quant_lib
from lmjax.train import checkpointing
from lmjax.train import workdir as workdir_lib

GENERATION_MARGIN = 4  # tokens past the longest answer: room to show the model stops (or not)
TABLE_COLUMNS = (
    ("multiple_choice_grade", "mc"), ("multiple_choice_grade_norm", "mc_norm"), ("exact_str_match", "exact"),
    ("greedy_match", "greedy"), ("target_logprob", "logprob"), ("target_logprob_per_token", "lp/tok"),
    ("edit_distance", "edit"),
)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [text.find(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text


def extract(text: str, output_regex: str | None) -> str:
    """The first match of `output_regex` in `text` ("" if none), or `text` when there is no regex."""
    if output_regex is None:
        return text
    match = re.search(output_regex, text)
    return match.group(0) if match else ""


def evaluate_task(scorer: Scorer, task: Task, k: int, *, seed: int = 0, limit: int | None = None) -> dict[str, float]:
    """The metrics of `task` (its first `limit` examples) at `k` shots."""
    indices = range(len(task.examples) if limit is None else min(limit, len(task.examples)))
    examples = [task.examples[i] for i in indices]
    truncated_before = scorer.truncated
    metrics: dict[str, float] = {}
    if task.multiple_choice:
        groups = []
        for i, ex in zip(indices, examples):
            context = prompts.prompt(task, i, k, seed, multiple_choice=True)
            groups.append([(context, choice) for choice in ex.choices])
        choice_scores = scorer.loglikelihoods(groups)
        grade, grade_norm = [], []
        for ex, scores in zip(examples, choice_scores):
            logprobs = np.array([s.logprob for s in scores])
            per_byte = logprobs / np.array([max(len(c.encode("utf-8")), 1) for c in ex.choices])
            grade.append(ex.choice_scores[int(np.argmax(logprobs))])
            grade_norm.append(ex.choice_scores[int(np.argmax(per_byte))])
        metrics["multiple_choice_grade"] = float(np.mean(grade))
        metrics["multiple_choice_grade_norm"] = float(np.mean(grade_norm))

    contexts = [prompts.prompt(task, i, k, seed, multiple_choice=not task.has_targets) for i in indices]
    answers = [ex.answer for ex in examples]
    if task.has_targets:
        answer_scores = [g[0] for g in scorer.loglikelihoods([[(c, a)] for c, a in zip(contexts, answers)])]
    else:
        answer_scores = [scores[ex.choices.index(ex.answer)] for ex, scores in zip(examples, choice_scores)]
    metrics["target_logprob"] = float(np.mean([s.logprob for s in answer_scores]))
    metrics["target_logprob_per_token"] = float(np.mean([s.logprob / s.num_tokens for s in answer_scores]))
    if GREEDY_MATCH in task.metrics:
        metrics["greedy_match"] = float(np.mean([s.is_greedy for s in answer_scores]))

    tokenizer = scorer.tokenizer
    answer_ids = [split_tokens(tokenizer, c, a)[1] for c, a in zip(contexts, answers)]
    max_new_tokens = task.max_new_tokens or max(map(len, answer_ids)) + GENERATION_MARGIN
    stops = prompts.stop_strings(task)
    generated = scorer.greedy(contexts, max_new_tokens)
    outputs = [cut_at_stop(tokenizer.decode(ids), stops) for ids in generated]
    metrics["edit_distance"] = float(np.mean([
        edit_distance(leading_tokens(tokenizer, ids, o), a) for ids, o, a in zip(generated, outputs, answer_ids)
    ]))
    if EXACT_MATCH in task.metrics:
        metrics["exact_str_match"] = float(np.mean([
            any(extract(o, task.output_regex).strip() == t.strip() for t in ex.targets)
            for o, ex in zip(outputs, examples)
        ]))
    metrics["examples"] = len(examples)
    metrics["truncated_prompts"] = scorer.truncated - truncated_before
    if metrics["truncated_prompts"]:
        logging.warning("task %s, %d shots: %d prompts were cut from the left to fit the model's context",
                        task.name, k, metrics["truncated_prompts"])
    return metrics


def evaluate(scorer: Scorer, tasks: Sequence[Task], shots: Sequence[int], *, seed: int = 0,
             limit: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{task name: {str(k): metrics}} for every task and number of shots."""
    return {task.name: {str(k): evaluate_task(scorer, task, k, seed=seed, limit=limit) for k in shots}
            for task in tasks}


def load_run_config(workdir: str) -> config_dict.ConfigDict:
    """The config a run was trained with, read from its newest checkpoint (keys this version no
    longer has are ignored)."""
    workdir_lib.require_checkpoint(workdir)
    manager = checkpointing.make_manager(workdir, None, read_only=True)
    try:
        saved = checkpointing.saved_config(manager, max(manager.all_steps()))
    finally:
        manager.close()
    if saved is None:
        raise ValueError(f"the config stored in {checkpointing.checkpoint_dir(workdir)} cannot be read: pass --config")
    config = config_lib.default_config()
    _update(config, saved)
    return config


def _update(node: config_dict.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if key not in node:
            continue
        if isinstance(node[key], config_dict.ConfigDict):
            _update(node[key], value)
        else:
            node[key] = _tuples(value) if isinstance(node[key], tuple) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def results_path(workdir: str, step: int, quantize: str = "none") -> str:
    folder = os.path.join(workdir, "evals") if quantize == "none" else os.path.join(workdir, "evals", quantize)
    return os.path.join(folder, f"{step}.json")


def write_results(workdir: str, step: int, results: dict, seed: int, quantize: str = "none") -> str:
    """Merge `results` into DIR/evals/[<quantize>/]<step>.json (tasks evaluated earlier are kept)."""
    path = results_path(workdir, step, quantize)
    existing = json.loads(fileio.read_text(path) or "{}")
    merged = existing.get("results", {})
    for task, by_k in results.items():
        merged.setdefault(task, {}).update(by_k)
    fileio.write_atomic(path, json.dumps({"step": step, "seed": seed, "results": merged}, indent=1, sort_keys=True))
    return path


def evaluate_workdir(config: config_dict.ConfigDict | None, workdir: str, task_paths: Sequence[str],
                     shots: Sequence[int], *, all_checkpoints: bool = False, seed: int = 0,
                     limit: int | None = None, batch_size: int = 16, quantize: str = "none") -> dict[int, dict]:
    """Evaluate the newest checkpoint of `workdir` (or every one) on the tasks; writes
    DIR/evals/<step>.json for each (DIR/evals/<quantize>/<step>.json with quantized weights, saved
    beside the checkpoints as `--mode=eval --quantize` saves them) and returns {step: results}.
    `config` None: the run's own."""
    quant_lib.check_mode(quantize)
    tasks = [task for path in task_paths for task in load_tasks(path)]  # bad task files fail first
    if any(k < 0 for k in shots):
        raise ValueError(f"--shots must be >= 0, got {list(shots)}")
    config = load_run_config(workdir) if config is None else config
    workdir_lib.require_checkpoint(workdir)
    setup = workdir_lib.Setup(config, workdir)
    newest = setup.restore(read_only=True)  # checks that the checkpoint holds this config's model
    steps = checkpointing.committed_steps(workdir) if all_checkpoints else [newest.step]
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint, read_only=True)
    out = {}
    try:
        for step in steps:
            restored = newest if step == newest.step else checkpointing.restore_step(manager, step, setup.abstract_state)
            scorer = _scorer(setup, step, restored.state.params, quantize, batch_size)
            out[step] = evaluate(scorer, tasks, shots, seed=seed, limit=limit)
            write_results(workdir, step, out[step], seed, quantize)
    finally:
        manager.close()
    return out


def open_scorer(workdir: str, config: config_dict.ConfigDict | None = None, *, batch_size: int = 16,
                quantize: str = "none") -> Scorer:
    """A scorer over the newest checkpoint of `workdir` (`config` None: the run's own)."""
    quant_lib.check_mode(quantize)
    workdir_lib.require_checkpoint(workdir)
    config = load_run_config(workdir) if config is None else config
    setup = workdir_lib.Setup(config, workdir)
    restored = setup.restore(read_only=True)
    return _scorer(setup, restored.step, restored.state.params, quantize, batch_size)


def _scorer(setup: workdir_lib.Setup, step: int, params: Any, quantize: str, batch_size: int) -> Scorer:
    """A scorer over checkpoint `step`'s params, weight-quantized unless `quantize` is "none"."""
    model_cfg = setup.config.model
    if quantize != "none":
        params = quantization.load_or_quantize(setup, step, params, quantize)
        model_cfg = quant_lib.with_quantization(model_cfg, quantize)
    return Scorer(model_cfg, params, setup.tokenizer, batch_size=batch_size, mesh=setup.mesh, rules=setup.rules)


def format_table(results_by_step: dict[int, dict]) -> str:
    """One line per (step, task, shots): the metrics of TABLE_COLUMNS ('-' where a task has none)."""
    names = [name for step in results_by_step.values() for name in step]
    width = max([len("task"), *map(len, names)])
    header = f"{'step':>7}  {'task':<{width}}  {'k':>2}" + "".join(f"  {short:>8}" for _, short in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for step, results in sorted(results_by_step.items()):
        for name, by_k in results.items():
            for k, metrics in by_k.items():
                cells = "".join(f"  {metrics[key]:>8.3f}" if key in metrics else f"  {'-':>8}" for key, _ in TABLE_COLUMNS)
                lines.append(f"{step:>7}  {name:<{width}}  {k:>2}{cells}")
    return "\n".join(lines)
