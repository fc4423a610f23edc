"""EleutherAI's lm-evaluation-harness on an lmjax run: its hundreds of tasks scored by lmjax's own scorer.

  pip install lm_eval        # not an lmjax dependency: it brings PyTorch
  python -m lmjax.evals --workdir=DIR --lm_eval_tasks=lambada_openai,hellaswag [--shots=0] [--limit=N]

or, from Python, `lm_eval.simple_evaluate(model=harness_model(workdir), tasks=[...])`; after
`register()`, `--model lmjax --model_args workdir=DIR` works wherever the harness builds models by
name. The three request types map onto `Scorer`, so the harness's numbers are the ones
`python -m lmjax.evals` reports for the same prompts:
  loglikelihood          (log p(continuation | context), every continuation token the argmax), with
                         context and continuation tokenized together and split at the boundary; the
                         context starts with EOS, as in training (the harness's GPT-2 adds it only
                         to an empty context)
  loglikelihood_rolling  the text's summed log-probability over disjoint windows of max_len tokens,
                         each token seeing only the earlier tokens of its own window (the harness's
                         own rolling scheme, so perplexities compare with its other models)
  generate_until         greedy continuations up to `max_gen_toks`, cut at the first `until` string;
                         sampling requests are refused, not silently run greedily
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmjax.evals import harness
from lmjax.evals.scoring import Scorer, split_tokens

DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default


class LmjaxRequests:
    """The harness's three request types over one scorer; requests are objects with `.args`."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        groups = [[tuple(r.args[:2])] for r in requests]
        return [(g[0].logprob, g[0].is_greedy) for g in self.scorer.loglikelihoods(groups)]

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        rows, owner = [], []
        for i, request in enumerate(requests):
            ids_T, _ = split_tokens(self.scorer.tokenizer, request.args[0], "")  # [EOS] + the text's tokens
            for start in range(1, len(ids_T), self.scorer.max_len):
                rows.append((ids_T[start - 1 : start], ids_T[start : start + self.scorer.max_len]))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owner, self.scorer.score_ids(rows)):
            totals[i] += score.logprob
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            context, kwargs = request.args[0], dict(request.args[1] or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError(f"request {i} asks for sampling ({kwargs}); lmjax's harness model decodes greedily")
            by_budget.setdefault(int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), []).append(i)
        for budget, indices in by_budget.items():
            generated = self.scorer.greedy([requests[i].args[0] for i in indices], budget)
            for i, ids in zip(indices, generated):
                until = requests[i].args[1].get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                outputs[i] = harness.cut_at_stop(self.scorer.tokenizer.decode(ids), until)
        return outputs


def register() -> type:
    """The harness model class, registered as `lmjax` (imports lm_eval, which needs PyTorch)."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError("the lm-evaluation-harness adapter needs `pip install lm_eval`") from e

    class LmjaxHarnessModel(LmjaxRequests, LM):
        def __init__(self, workdir: str, batch_size: int | str = 16, quantize: str = "none", **_: Any):
            LM.__init__(self)
            size = 16 if str(batch_size).startswith("auto") else int(batch_size)
            LmjaxRequests.__init__(self, harness.open_scorer(workdir, batch_size=size, quantize=quantize))

    try:
        return register_model("lmjax")(LmjaxHarnessModel)
    except AssertionError:  # registered before in this process
        from lm_eval.api.registry import get_model
        return get_model("lmjax")


def harness_model(workdir: str, batch_size: int = 16, quantize: str = "none") -> Any:
    return register()(workdir, batch_size=batch_size, quantize=quantize)


def run(workdir: str, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | None = None,
        batch_size: int = 16, include_path: str | None = None, quantize: str = "none") -> dict:
    """lm_eval.simple_evaluate on the newest checkpoint of `workdir`: the harness's results dict."""
    model = harness_model(workdir, batch_size, quantize)
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=TaskManager(include_path=include_path))
