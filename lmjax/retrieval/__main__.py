"""`python -m lmjax.retrieval --workdir=DIR --mode=none|incontext|knnlm [--num_windows=1024] ...`.

Prints the validation loss (nats/token) and bits/byte of the newest checkpoint of a run without
retrieval, with in-context BM25 retrieval from the train split, or as a kNN-LM over a datastore of
the train split (lambda and T chosen on held-out windows). The run's stored config is used unless
--config is given. See lmjax/retrieval/evaluate.py for what is scored.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax.retrieval import evaluate

_D = evaluate.Options()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset file; default: the run's stored config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
_MODE = flags.DEFINE_enum("mode", "none", list(evaluate.MODES), "No retrieval, in-context retrieval, or kNN-LM.")
_WINDOWS = flags.DEFINE_integer("num_windows", _D.num_windows, "Windows scored (-1: every window of the split).")
_SPAN = flags.DEFINE_integer("span", _D.span, "Tokens scored per window (the retrieval stride).")
_RETRIEVER = flags.DEFINE_enum("retriever", _D.retriever, list(evaluate.RETRIEVERS),
                               "incontext: BM25, or the model's own mean-pooled hidden states.")
_QUERY = flags.DEFINE_integer("query_tokens", _D.query_tokens, "incontext: tokens before the span that form the query.")
_CHUNK = flags.DEFINE_integer("chunk_tokens", _D.chunk_tokens, "incontext: passage length in tokens.")
_PASSAGES = flags.DEFINE_integer("num_passages", _D.num_passages, "incontext: passages retrieved per window.")
_BUDGET = flags.DEFINE_integer("passage_tokens", _D.passage_tokens, "incontext: context given to passages.")
_STORE = flags.DEFINE_integer("datastore_tokens", _D.datastore_tokens, "knnlm: train tokens in the datastore (-1: all).")
_K = flags.DEFINE_integer("neighbors", _D.neighbors, "knnlm: neighbours per token.")
_LAMBDAS = flags.DEFINE_list("lambdas", [str(x) for x in _D.lambdas], "knnlm: interpolation weights to choose from.")
_TEMPS = flags.DEFINE_list("temperatures", [str(x) for x in _D.temperatures], "knnlm: temperatures to choose from.")
_BATCH = flags.DEFINE_integer("batch_size", _D.batch_size, "Rows per forward pass.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed of the windows' and the datastore rows' choice.")
flags.mark_flags_as_required(["workdir"])


def _floats(name: str, values: list[str]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} must be numbers, got {','.join(values)}") from None


def _run() -> None:
    options = evaluate.Options(
        num_windows=_WINDOWS.value, span=_SPAN.value, retriever=_RETRIEVER.value, query_tokens=_QUERY.value, chunk_tokens=_CHUNK.value,
        num_passages=_PASSAGES.value, passage_tokens=_BUDGET.value, datastore_tokens=_STORE.value,
        neighbors=_K.value, lambdas=_floats("lambdas", _LAMBDAS.value),
        temperatures=_floats("temperatures", _TEMPS.value), batch_size=_BATCH.value, seed=_SEED.value)
    result = evaluate.evaluate_run(_CONFIG.value, _WORKDIR.value, _MODE.value, options)
    print(f"mode={result['mode']} step={result['step']}: loss {result['loss']:.4f} nats/token, "
          f"{result['bpb']:.4f} bits/byte on {result['tokens']} tokens "
          f"(held out: loss {result['heldout_loss']:.4f}, {result['heldout_bpb']:.4f} bits/byte)")
    print(json.dumps({k: v for k, v in result.items() if k != "heldout_grid"}, sort_keys=True))


main = cli.absl_main(_run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
