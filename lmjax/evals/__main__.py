"""`python -m lmjax.evals --workdir=DIR --tasks=PATH[,PATH] [--shots=0,1,5] [--all_checkpoints] [--induction]`.

`--lm_eval_tasks=NAME[,NAME]` runs lm-evaluation-harness tasks through `lmjax.evals.eleuther`.

Evaluates the newest checkpoint of a run (every one with --all_checkpoints) on BIG-bench JSON tasks
or JSONL tasks, writes DIR/evals/<step>.json and prints a table. --induction adds the induction
score of every checkpoint (DIR/evals/induction.json). The run's own config (stored with its
checkpoints) is used unless --config is given (e.g. to evaluate in bfloat16).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli, fileio
from lmjax.evals import harness, induction

_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset file; default: the run's stored config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
_TASKS = flags.DEFINE_list("tasks", [], "Task paths: BIG-bench task.json or task directories, .jsonl files.")
_INDUCTION = flags.DEFINE_bool("induction", False, "Also the induction score of every checkpoint.")
_SHOTS = flags.DEFINE_list("shots", ["0"], "Numbers of demonstrations, e.g. 0,1,5.")
_ALL = flags.DEFINE_bool("all_checkpoints", False, "Evaluate every checkpoint of the run, not only the newest.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N examples of each task.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the demonstrations' choice and of the choices' order.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per scoring batch.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                              "--tasks, --lm_eval_tasks: weight-only quantization of the checkpoints (qwix).")
_LM_EVAL = flags.DEFINE_list("lm_eval_tasks", [], "lm-evaluation-harness task names (needs `pip install lm_eval`).")
_LM_EVAL_INCLUDE = flags.DEFINE_string("lm_eval_include", None, "A folder of extra lm-evaluation-harness task YAMLs.")
flags.mark_flags_as_required(["workdir"])


def _run() -> None:
    try:
        shots = [int(k) for k in _SHOTS.value]
    except ValueError:
        raise ValueError(f"--shots must be integers, got {','.join(_SHOTS.value)}") from None
    if not _TASKS.value and not _INDUCTION.value and not _LM_EVAL.value:
        raise ValueError("nothing to evaluate: give --tasks=PATH[,PATH], --lm_eval_tasks=NAME[,NAME] and/or --induction")
    if _TASKS.value:
        results = harness.evaluate_workdir(
            _CONFIG.value, _WORKDIR.value, _TASKS.value, shots, all_checkpoints=_ALL.value, seed=_SEED.value,
            limit=_LIMIT.value, batch_size=_BATCH.value, quantize=_QUANTIZE.value,
        )
        print(harness.format_table(results))
        for step in results:
            print(f"wrote {harness.results_path(_WORKDIR.value, step, _QUANTIZE.value)}")
    if _LM_EVAL.value:
        from lmjax.evals import eleuther
        from lm_eval.utils import make_table

        if len(shots) > 1:
            raise ValueError(f"--lm_eval_tasks takes one --shots value, got {_SHOTS.value}")
        results = eleuther.run(_WORKDIR.value, _LM_EVAL.value, num_fewshot=shots[0] if flags.FLAGS["shots"].present else None,
                               limit=_LIMIT.value, batch_size=_BATCH.value, include_path=_LM_EVAL_INCLUDE.value,
                               quantize=_QUANTIZE.value)
        print(make_table(results))
    if _INDUCTION.value:
        config = _CONFIG.value or harness.load_run_config(_WORKDIR.value)
        scores = induction.run_induction_scores(config, _WORKDIR.value, seed=_SEED.value)
        print(f"{'step':>7}  {'early loss':>10}  {'late loss':>10}  {'icl score':>10}")
        for s in scores:
            print(f"{s['step']:>7}  {s['early_loss']:>10.4f}  {s['late_loss']:>10.4f}  {s['icl_score']:>10.4f}")
        path = os.path.join(_WORKDIR.value, "evals", "induction.json")
        fileio.write_atomic(path, json.dumps(scores, indent=1))
        print(f"wrote {path}")


main = cli.absl_main(_run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
