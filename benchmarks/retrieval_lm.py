"""Does retrieval from the train split help a small model on the validation split? No retrieval,
in-context BM25 retrieval (Ram et al. 2023) and kNN-LM (Khandelwal et al. 2020), on the same windows.

    python -m lmjax.main --config=configs/gpt_small.py --workdir=runs/retrieval_small \\
        --config.train.steps=200 --config.optim.warmup_steps=20 --config.checkpoint.every_steps=200 \\
        --config.eval.every_steps=200 --config.eval.num_samples=0
    python -m benchmarks.retrieval_lm --workdir=runs/retrieval_small [--num_windows=1024] [--datastore_tokens=300000]

Beside the three modes, a control: in-context with passages drawn at random from the same
collection, so that what retrieval adds is told apart from what giving up context for passages
costs; and both again with half the context budget for passages. Writes retrieval_lm.md (and the held-out lambda curve, retrieval_lm_knnlm.png) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lmjax.retrieval import evaluate
from lmjax.train import workdir as workdir_lib

SMALL_BUDGET = 32  # the second in-context setting: passages of 31 tokens + EOS


class RandomRetriever:
    """Passages drawn at random (seeded): the control for in-context retrieval."""

    def __init__(self, num_passages: int, seed: int):
        self.num_passages, self.rng = num_passages, np.random.default_rng(seed)

    def search(self, queries, k):
        return self.rng.integers(0, self.num_passages, (len(queries), k)), np.ones((len(queries), k), np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/retrieval_small")
    parser.add_argument("--out", default="benchmarks/results")
    defaults = evaluate.Options()
    parser.add_argument("--num_windows", type=int, default=defaults.num_windows)
    parser.add_argument("--datastore_tokens", type=int, default=300_000)
    parser.add_argument("--passage_tokens", type=int, default=defaults.passage_tokens)
    parser.add_argument("--chunk_tokens", type=int, default=defaults.chunk_tokens)
    args = parser.parse_args()
    options = dataclasses.replace(defaults, num_windows=args.num_windows, datastore_tokens=args.datastore_tokens,
                                  passage_tokens=args.passage_tokens, chunk_tokens=args.chunk_tokens)

    start, load_before = time.perf_counter(), os.getloadavg()[1]
    evaluator = evaluate.RunEvaluator(workdir_lib.saved_config(args.workdir), args.workdir, options)
    small = {"chunk_tokens": SMALL_BUDGET - 1, "passage_tokens": SMALL_BUDGET}
    runs = {
        "none": evaluator.none,
        "incontext": evaluator.incontext,
        "incontext_random": lambda: evaluator.incontext(RandomRetriever(results["incontext"]["passages"], 0)),
        "incontext_small": lambda: evaluator.incontext(**small),
        "incontext_small_random": lambda: evaluator.incontext(
            RandomRetriever(results["incontext_small"]["passages"], 0), **small),
        "knnlm": evaluator.knnlm,
    }
    results, seconds = {}, {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        results[name] = run()
        seconds[name] = time.perf_counter() - t0
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "heldout_grid"}), flush=True)
    total = time.perf_counter() - start
    load = (load_before, os.getloadavg()[1])
    write_report(args, evaluator, options, results, seconds, total, load)


def write_report(args, evaluator, options, results, seconds, total, load) -> None:
    os.makedirs(args.out, exist_ok=True)
    grid = results["knnlm"]["heldout_grid"]
    temperatures = sorted({g["temperature"] for g in grid})
    plt.figure(figsize=(6, 4))
    for temperature in temperatures:
        points = sorted((g["lambda"], g["loss"]) for g in grid if g["temperature"] == temperature)
        plt.plot(*zip(*points), marker="o", label=f"T = {temperature:g}")
    plt.axhline(results["none"]["heldout_loss"], color="gray", linestyle="--", label="no retrieval")
    plt.xlabel("lambda (weight of p_knn)")
    plt.ylabel("held-out loss (nats/token)")
    plt.title("kNN-LM on held-out validation windows")
    plt.legend(fontsize=8)
    plt.tight_layout()
    plt.savefig(os.path.join(args.out, "retrieval_lm_knnlm.png"), dpi=120)

    config = evaluator.config
    ic, kn = results["incontext"], results["knnlm"]
    labels = {
        "none": "no retrieval",
        "incontext": f"in-context, BM25 top-{options.num_passages} passage",
        "incontext_random": "in-context, a random passage (control)",
        "incontext_small": f"in-context, BM25, {SMALL_BUDGET}-token budget",
        "incontext_small_random": f"in-context, a random passage, {SMALL_BUDGET}-token budget (control)",
        "knnlm": f"kNN-LM, lambda={kn['lambda']:g}, T={kn['temperature']:g}",
    }
    lines = [
        "# Retrieval-augmented LM on the embedded corpus",
        "",
        (f"`python -m benchmarks.retrieval_lm --workdir={args.workdir} --num_windows={options.num_windows} "
         f"--datastore_tokens={options.datastore_tokens}`, {time.strftime('%Y-%m-%d')}, Python "
         f"{sys.version.split()[0]} (its standard library is the corpus), {platform.machine()} CPU shared with "
         f"other jobs (5-minute load average {load[0]:.0f} before, {load[1]:.0f} after: times are slow), "
         f"{total:.0f} s in all."),
        "",
        (f"Model: `configs/gpt_small.py` ({config.model.num_layers} layers, d={config.model.embed_dim}, vocab "
         f"{config.model.vocab_size}, context {config.data.seq_len}) trained {evaluator.step} steps "
         f"({evaluator.step * config.train.batch_size * config.data.seq_len:,} tokens); the command is in the "
         "script's docstring."),
        "",
        (f"Windows: {len(evaluator.windows)} windows of {options.span} scored tokens at seeded places in the validation "
         f"split, each read with {config.data.seq_len} tokens of context; the {results['none']['tokens']:,} tokens of "
         f"the windows in the second half of the split are reported, the {results['none']['heldout_tokens']:,} in the "
         "first half are held out (kNN-LM's lambda and T are chosen there). Every row scores the same tokens."),
        "",
        "| mode | loss (nats/token) | bits/byte | held-out loss | time |",
        "|---|---|---|---|---|",
    ]
    for name, label in labels.items():
        r = results[name]
        lines.append(f"| {label} | {r['loss']:.4f} | {r['bpb']:.4f} | {r['heldout_loss']:.4f} | {seconds[name]:.0f} s |")
    lines += [
        "",
        (f"In-context: the train split cut into {ic['passages']:,} passages of at most {options.chunk_tokens} tokens, "
         f"indexed by bm25s ({ic['index_s']:.0f} s with the cutting and decoding); the query is the "
         f"{options.query_tokens} tokens before each window's span; passages get at most {options.passage_tokens} "
         f"tokens of the context (EOS included), taken from the far end of the preceding text. "
         f"{100 * ic['windows_with_passages']:.0f}% of windows got a passage, {ic['mean_prepended_tokens']:.1f} "
         f"prepended tokens on average. With the {SMALL_BUDGET}-token budget, passages are {SMALL_BUDGET - 1} tokens "
         f"({results['incontext_small']['passages']:,} of them). The random controls prepend as much, at random."),
        "",
        (f"kNN-LM: a datastore of {kn['datastore']:,} (final hidden state, next token) pairs from "
         f"{'the whole train split' if options.datastore_tokens == -1 else 'a seeded sample of train rows'} "
         f"(built in {kn['datastore_s']:.0f} s), exact search for K={kn['neighbors']} neighbours by squared L2 "
         f"({kn['search_s']:.0f} s), median nearest squared distance {kn['median_nearest_distance']:.2f}; "
         f"lambda from {sorted({g['lambda'] for g in grid})} and T from {temperatures} chosen on the held-out windows "
         "([the held-out curve](retrieval_lm_knnlm.png))."),
        "",
        "![kNN-LM held-out loss against lambda](retrieval_lm_knnlm.png)",
        "",
    ]
    path = os.path.join(args.out, "retrieval_lm.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, "retrieval_lm.json"), "w") as f:
        json.dump({"options": dataclasses.asdict(options), "results": results, "seconds": seconds}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
