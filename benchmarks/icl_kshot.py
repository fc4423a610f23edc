"""Few-shot accuracy as a function of k: models of three sizes, each trained on the same tokens, asked
to look up keys of random mappings that only the k demonstrations of their prompt give.

    python -m benchmarks.icl_kshot [--steps=1000] [--seeds=6] [--out=benchmarks/results/icl]   (from the repo root)

Training corpus (seeded, in a temporary directory): `lmjax.evals.induction.key_value_episode`
documents, each a mapping of its own of 1-6 letter keys to digits written as items `Fq3` (instance
letter, key, value), so beyond guessing a digit the only thing to learn is in-context lookup.
Every size trains with `lmjax.train.trainer` on the same batches for the same steps (same tokens).
Evaluation: `key_value_fewshot_task` with a fresh mapping per seed (4 keys, 16 instances each) at
k = 0, 1, 2, 4, 8, 12 shots through `lmjax.evals.harness`, beside the ceiling of a perfect in-context
learner on the same prompts (`key_shown`), a model that copies any digit of its prompt, and chance
(1 / 10). Writes kshot_accuracy.png, kshot.json and KSHOT.md to --out (`--rewrite` redraws them from
kshot.json, keeping KSHOT.md's hand-written "What it shows" section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lmjax import config as config_lib
from lmjax.evals import harness, induction, prompts
from lmjax.train import trainer

SIZES = {  # name: (layers, width, heads)
    "2L d32": (2, 32, 2),
    "2L d64": (2, 64, 4),
    "4L d64": (4, 64, 4),
}
SHOTS = (0, 1, 2, 4, 8, 12)
NUM_KEYS, INSTANCES, NUM_VALUES = 4, 16, 10
SEQ_LEN = 64


def write_corpus(path: str, num_docs: int, max_keys: int, seed: int) -> None:
    """Documents of 15 items (4 characters each with the separator: with EOS, about one training sequence)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(num_docs):
            text = induction.key_value_episode(rng, 15, max_keys=max_keys, num_values=NUM_VALUES)
            f.write(json.dumps({"text": text}) + "\n")


def run_config(corpus: str, cache: str, size: str, steps: int, lr: float) -> config_lib.config_dict.ConfigDict:
    layers, width, heads = SIZES[size]
    c = config_lib.default_config()
    c.name = "icl_kshot"
    c.data.update(source=f"text:{corpus}", tokenizer="char", seq_len=SEQ_LEN, cache_dir=cache, val_fraction=0.01)
    c.model.update(num_layers=layers, embed_dim=width, num_heads=heads, num_kv_heads=heads, max_len=SEQ_LEN,
                   position="rope")
    c.train.update(steps=steps, batch_size=32, log_every=max(1, steps // 10))
    c.optim.update(lr=lr, warmup_steps=min(100, steps // 10), weight_decay=0.0)
    c.checkpoint.update(every_steps=steps, max_to_keep=1, async_save=False)
    c.eval.update(every_steps=steps, steps=2, num_samples=0)
    return c


def ceiling(task, k: int, seed: int, limit: int | None = None) -> float:
    """The accuracy of a perfect in-context learner on the harness's k-shot prompts of `task` (its
    first `limit` examples)."""
    shown = np.array([induction.key_shown(task, i, k, seed) for i in range(len(task.examples))][:limit])
    return float(np.mean(shown + (1 - shown) / NUM_VALUES))


def tasks(seeds: int) -> list:
    """One task per seed, each a fresh mapping from a generator of its own (never the corpus's)."""
    return [induction.key_value_fewshot_task(NUM_KEYS, INSTANCES, num_values=NUM_VALUES, seed=1000 + s)
            for s in range(seeds)]


def ceilings(seeds: int, shots=SHOTS, limit: int | None = None) -> dict[str, float]:
    """{k: the perfect in-context learner's accuracy}, averaged over the tasks of `seeds` seeds."""
    return {str(k): float(np.mean([ceiling(t, k, s, limit) for s, t in enumerate(tasks(seeds))])) for k in shots}


def digit_copier(task, k: int, seed: int) -> float:
    """The expected accuracy of a model that ignores keys and answers a digit of its prompt's
    demonstrations drawn at random (a guess at k = 0): the share of demonstrations whose value is the
    answer. At k = 1 it is the ceiling in expectation, so only k >= 2 tells lookup from copying any digit."""
    if k == 0:
        return 1 / NUM_VALUES
    return float(np.mean([np.mean([task.examples[j].answer == ex.answer
                                   for j in prompts.shot_indices(task, i, k, seed)])
                          for i, ex in enumerate(task.examples)]))


def digit_copiers(seeds: int, shots=SHOTS) -> dict[str, float]:
    return {str(k): float(np.mean([digit_copier(t, k, s) for s, t in enumerate(tasks(seeds))])) for k in shots}


def evaluate(workdir: str, seeds: int, shots=SHOTS, batch_size: int = 64,
             limit: int | None = None) -> dict[str, dict[str, float]]:
    """{k: mean and spread over seeds of accuracy, exact match and the answer's log-probability}
    on the first `limit` examples of each seed's task (all of them: None)."""
    scorer = harness.open_scorer(workdir, batch_size=batch_size)
    per_seed = []
    for seed, task in enumerate(tasks(seeds)):
        per_seed.append(harness.evaluate(scorer, [task], shots, seed=seed, limit=limit)[task.name])
    out = {}
    for k in map(str, shots):
        rows = [r[k] for r in per_seed]
        out[k] = {name: float(np.mean([r[key] for r in rows])) for name, key in
                  (("accuracy", "multiple_choice_grade"), ("exact", "exact_str_match"), ("logprob", "target_logprob"))}
        out[k]["accuracy_sd"] = float(np.std([r["multiple_choice_grade"] for r in rows]))
        out[k]["truncated"] = int(sum(r["truncated_prompts"] for r in rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--docs", type=int, default=40_000)
    parser.add_argument("--max_keys", type=int, default=6, help="keys per training episode: 1 to this")
    parser.add_argument("--seeds", type=int, default=6, help="fresh mappings evaluated per k")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--out", default="benchmarks/results/icl")
    parser.add_argument("--rewrite", action="store_true", help="only redraw the plot and table from kshot.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.rewrite:
        with open(os.path.join(args.out, "kshot.json")) as f:
            results = json.load(f)
        results.setdefault("digit_copier", digit_copiers(results["args"]["seeds"]))
        with open(os.path.join(args.out, "kshot.json"), "w") as f:
            json.dump(results, f, indent=1)
        write_report(results, args.out)
        return
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown size(s) {unknown}; choose from {list(SIZES)}")
    start = time.time()
    results: dict = {"args": vars(args), "ceiling": ceilings(args.seeds), "digit_copier": digit_copiers(args.seeds),
                     "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "key_value.jsonl")
        write_corpus(corpus, args.docs, args.max_keys, seed=0)
        for size in sizes:
            workdir = os.path.join(tmp, size.replace(" ", "_"))
            summary = trainer.train(run_config(corpus, os.path.join(tmp, "cache"), size, args.steps, args.lr), workdir)
            results["runs"][size] = {
                "params": summary["param_count"], "tokens": summary["tokens_seen"],
                "train_flops": summary["train_flops"], "final_train_loss": summary["final_train_loss"],
                "final_val_loss": summary["final_val_loss"], "wall_time_s": summary["wall_time_s"],
                "by_k": evaluate(workdir, args.seeds),
            }
            print(size, json.dumps(results["runs"][size]["by_k"]), flush=True)
    results["seconds"] = time.time() - start
    results["platform"] = f"{platform.machine()}, Python {platform.python_version()}"
    with open(os.path.join(args.out, "kshot.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, args.out)


def plot(results: dict, path: str) -> None:
    """Accuracy and log p(answer) against k, one line per size, beside the ceiling and chance."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ks = sorted(map(int, results["ceiling"]))
    for size, run in results["runs"].items():
        by_k = run["by_k"]
        axes[0].errorbar(ks, [by_k[str(k)]["accuracy"] for k in ks], yerr=[by_k[str(k)]["accuracy_sd"] for k in ks],
                         marker="o", capsize=3, label=size)
        axes[1].plot(ks, [by_k[str(k)]["logprob"] for k in ks], "o-", label=size)
    axes[0].plot(ks, [results["ceiling"][str(k)] for k in ks], "k--", label="perfect in-context learner")
    if "digit_copier" in results:
        axes[0].plot(ks, [results["digit_copier"][str(k)] for k in ks], color="gray", ls="-.",
                     label="copies a random digit of the prompt")
    shown = [(results["ceiling"][str(k)] - 1 / NUM_VALUES) / (1 - 1 / NUM_VALUES) for k in ks]
    axes[1].plot(ks, [-(1 - p) * np.log(NUM_VALUES) for p in shown], "k--", label="perfect in-context learner")
    axes[0].axhline(1 / NUM_VALUES, color="gray", ls=":", label=f"chance (1/{NUM_VALUES})")
    axes[1].axhline(-np.log(NUM_VALUES), color="gray", ls=":", label=f"uniform guess (-ln {NUM_VALUES})")
    axes[0].set_ylabel("accuracy (likeliest of the 10 digits)")
    axes[1].set_ylabel("log p(answer), nats")
    for ax in axes:
        ax.set_xlabel("k (demonstrations in the prompt)")
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
    fig.suptitle(f"Few-shot lookup of a fresh random mapping ({NUM_KEYS} keys, 10 values)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


FINDINGS = "**What it shows**"  # the hand-written section of KSHOT.md, kept when the report is redrawn


def write_report(results: dict, out: str) -> None:
    plot(results, os.path.join(out, "kshot_accuracy.png"))
    path = os.path.join(out, "KSHOT.md")
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        kept = "\n" + old[old.index(FINDINGS):] if FINDINGS in old else ""
    args = results["args"]
    header = ("| size | params | k | accuracy (sd over seeds) | exact match | log p(answer) | ceiling | digit copier |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for size, run in results["runs"].items():
        for k in SHOTS:
            r = run["by_k"][str(k)]
            rows.append(f"| {size} | {run['params']:,} | {k} | {r['accuracy']:.3f} ({r['accuracy_sd']:.3f}) | "
                        f"{r['exact']:.3f} | {r['logprob']:.3f} | {results['ceiling'][str(k)]:.3f} | "
                        f"{results['digit_copier'][str(k)]:.3f} |")
    training = "\n".join(f"| {size} | {run['final_train_loss']:.3f} | {run['final_val_loss']:.3f} | "
                         f"{run['train_flops']:.2e} | {run['wall_time_s']:.0f} |" for size, run in results["runs"].items())
    with open(path, "w") as f:
        f.write(f"""# Few-shot accuracy vs k on in-context key->value lookup

`python -m benchmarks.icl_kshot --steps={args['steps']} --lr={args['lr']} --max_keys={args['max_keys']} --docs={args['docs']} --seeds={args['seeds']}`
(CPU, {results['platform']}; {results['seconds']:.0f} s in all on a shared machine).

**Design.** Training documents (`lmjax.evals.induction.key_value_episode`, {args['docs']:,} seeded
documents) each draw a mapping of their own, 1-{args['max_keys']} lowercase letter keys to random
digits, and write 15 items such as `Fq3`: key `q` in a random uppercase instance `F`, then its
value. Nothing carries over between documents, so the only way to predict a value is to find an
earlier item of the same key in the context and copy what followed it; values of a key's first
item are unpredictable (ln 10). No natural text is mixed in: it would not make lookup more
learnable, only spend this CPU budget on other things. Every size trains with `lmjax.train.trainer`
on the same batches for {args['steps']} steps of 32 x 64 tokens (same tokens, not same compute; AdamW at
peak lr {args['lr']}, cosine, RoPE, char vocabulary).

The test (`lmjax.evals.induction.key_value_fewshot_task`): per seed a fresh random mapping of
{NUM_KEYS} keys to {NUM_VALUES} digits, asked of {INSTANCES} instances of each key ({NUM_KEYS * INSTANCES} examples,
{args['seeds']} seeds = {args['seeds'] * NUM_KEYS * INSTANCES} prompts per k). `lmjax.evals.harness` builds the k-shot prompt
as it does for any task (`Bj4 Kq7 Fq`), with k other examples drawn by its seeded shot selection, which never
shows the evaluated example nor one with its text; the instances make another example of the
same key a different text, so a prompt shows the queried key with probability rising in k
(Chan et al. 2022's few-shot classification with labels assigned per episode). Accuracy is the
harness's multiple_choice_grade (the likeliest of the 10 digits); exact match is greedy
generation; log p(answer) the answer's log-probability. The ceiling is a perfect in-context
learner on the same prompts: right when the prompt shows the key (`key_shown`), 1/10 otherwise.
The digit copier ignores keys and answers a digit of its prompt's demonstrations at random: at
k = 1 it is the ceiling in expectation over mappings (the one digit shown is right when its key is
the queried one, and by chance otherwise), so only k >= 2 separates lookup from copying any digit.
Chance is 1/10 (log-prob -ln 10 = {-np.log(NUM_VALUES):.3f}); with only {NUM_KEYS} keys per mapping, a model that
always says one digit scores a multiple of 1/{NUM_KEYS} on one seed (the share of keys with that value), hence
the spread at k = 0.

![accuracy vs k](kshot_accuracy.png)

{header}
{rows and chr(10).join(rows)}

| size | final train loss | final val loss | training FLOPs | training s |
|---|---:|---:|---:|---:|
{training}
{kept}""")
    print(f"wrote {out}/KSHOT.md and {out}/kshot_accuracy.png")


if __name__ == "__main__":
    main()
