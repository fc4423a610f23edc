"""lm-evaluation-harness through lmjax.evals.eleuther, end to end: one task of each request type.

Writes three local tasks (multiple choice; a rolling log-likelihood, as wikitext's; a greedy
generation with a stop string), runs `lm_eval.simple_evaluate` on a run's newest checkpoint with
`log_samples`, and checks every logged response against lmjax's scorer called directly on the
prompt the harness built. lm_eval (and PyTorch) live in a separate venv:

  python -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install lm_eval
  PYTHONPATH=.:.venv/lib/python3.11/site-packages /tmp/lmeval-venv/bin/python benchmarks/lm_eval_adapter.py --workdir=DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

TASKS = {
    "lmjax_mc": ("multiple_choice", {"doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                                     "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}),
    "lmjax_rolling": ("loglikelihood_rolling", {"doc_to_text": "", "doc_to_target": "{{text}}",
                                                "metric_list": [{"metric": "word_perplexity"}]}),
    "lmjax_gen": ("generate_until", {"doc_to_text": "{{context}}", "doc_to_target": "{{answer}}",
                                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                                     "metric_list": [{"metric": "exact_match"}]}),
}
DOCS = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "label": 0, "answer": " a + b",
     "text": "import os\nimport sys\n\n\ndef main():\n    print(os.getcwd(), sys.argv)\n" * 4},
    {"context": "import", "choices": [" os", " xyz"], "label": 0, "answer": " os",
     "text": "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"},
]


def write_tasks(folder: str) -> None:
    data = os.path.join(folder, "docs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    for name, (output_type, fields) in TASKS.items():
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
                "test_split": "test", "output_type": output_type, **fields}
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            json.dump(spec, f)  # JSON is YAML


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmjax.evals import eleuther

    folder = tempfile.mkdtemp()
    write_tasks(folder)
    model = eleuther.harness_model(args.workdir)
    out = lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=TaskManager(include_path=folder),
                                  log_samples=True)
    scorer = model.scorer
    worst = 0.0
    for name, samples in out["samples"].items():
        for sample in samples:
            for request, response in zip(sample["arguments"], sample["resps"]):
                request = list(request.values()) if isinstance(request, dict) else request
                if TASKS[name][0] == "multiple_choice":
                    direct = scorer.loglikelihoods([[tuple(request[:2])]])[0][0].logprob
                    worst = max(worst, abs(direct - float(response[0][0])))
                elif TASKS[name][0] == "loglikelihood_rolling":
                    worst = max(worst, abs(np.sum(float(response[0])) - eleuther.LmjaxRequests(scorer)
                                           .loglikelihood_rolling([type("R", (), {"args": tuple(request)})])[0]))
                else:
                    assert response[0] == model.generate_until([type("R", (), {"args": tuple(request[:2])})])[0]
    print(json.dumps({name: out["results"][name] for name in TASKS}, indent=1, default=str))
    print(f"largest |harness - direct| log-likelihood difference: {worst:.2e}")


if __name__ == "__main__":
    main()
