"""Exposure bias: accuracy vs output length, free-running vs teacher-forced, for models
trained with teacher forcing and with scheduled sampling at the same steps and tokens.

    python -m benchmarks.exposure_bias [--task=digit_sum|addition] [--steps=800] [--out=...] [--rewrite]

A seeded generator (`lmjax.evals.exposure`: `digit_sum_problems`, or `addition_problems`,
least-significant digit first and zero-padded: "7500+8600=52100") writes the training problems,
one per line of a JSONL file read as `text:PATH`; the evaluation problems are drawn with another
seed (for addition, kept out of training). Each run is a 2-layer transformer (RoPE, so the
distances between an answer digit and the digits it depends on are the same wherever a problem
falls in a packed row) with a character vocabulary, trained by `lmjax.train.trainer` with the
same data order, steps and batch; only `train.scheduled_sampling` differs. Then
`lmjax.evals.exposure` scores every evaluation answer teacher-forced and generates it greedily.
Writes README.md, results.json and accuracy_vs_length.png to --out (--rewrite: only the first and
last, from the results.json there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lmjax import config as config_lib
from lmjax.evals import exposure
from lmjax.evals.harness import open_scorer
from lmjax.train import trainer

def inverse_sigmoid_k(steps_to_cap: float, cap: float) -> float:
    """The inverse-sigmoid k whose probability 1 - k / (k + exp(i / k)) reaches `cap` at step
    `steps_to_cap` (i = k ln(k cap / (1 - cap)), solved by bisection; k >= 1)."""
    low, high = max(1.0, (1 - cap) / cap * 1.0001), 1e7
    for _ in range(200):
        mid = (low + high) / 2
        if mid * math.log(mid * cap / (1 - cap)) < steps_to_cap:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def schedules(steps: int, cap: float) -> dict[str, tuple[str, float, str]]:
    """Run name -> (train.scheduled_sampling, train.scheduled_sampling_k, how it reads)."""
    k = inverse_sigmoid_k(steps / 2, cap)
    return {
        "teacher_forcing": ("none", 1000.0, "teacher forcing"),
        "ss_linear": ("linear", steps / cap, f"linear: p = i / {steps / cap:g}, from 0 to {cap} at the last step"),
        "ss_inverse_sigmoid": ("inverse_sigmoid", k, f"inverse sigmoid, k = {k:.1f}: p from {1 / (k + 1):.3f} "
                                                     f"to the cap {cap} at step {steps // 2}, then constant"),
    }


def run_config(corpus: str, cache: str, args: argparse.Namespace, name: str, schedule: str,
               k: float) -> config_lib.config_dict.ConfigDict:
    c = config_lib.default_config()
    c.name = f"exposure_bias_{name}"
    c.data.update(source=f"text:{corpus}", tokenizer="char", seq_len=64, cache_dir=cache, val_fraction=0.01)
    c.model.update(num_layers=2, embed_dim=args.embed_dim, num_heads=4, num_kv_heads=4, max_len=64, position="rope")
    c.train.update(steps=args.steps, batch_size=32, log_every=max(1, args.steps // 10), scheduled_sampling=schedule,
                   scheduled_sampling_k=k, scheduled_sampling_max=args.cap)
    c.optim.update(lr=args.lr, warmup_steps=min(100, args.steps // 10), weight_decay=0.0)
    c.checkpoint.update(every_steps=args.steps, max_to_keep=1, async_save=False)
    c.eval.update(every_steps=args.steps, steps=2, num_samples=0)
    return c


def answer_tokens(args: argparse.Namespace) -> int:
    """Tokens of every answer, its EOS included."""
    return (args.width + 1 if args.task == "addition" else args.length) + 1


def problems(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, evaluation) problems of --task."""
    if args.task == "addition":
        evaluation = exposure.addition_problems(args.eval_problems, args.width, seed=1)
        held_out = [q for q, _ in evaluation]
        return exposure.addition_problems(args.train_problems, args.width, seed=0, exclude=held_out), evaluation
    return (exposure.digit_sum_problems(args.train_problems, args.terms, args.length, seed=0),
            exposure.digit_sum_problems(args.eval_problems, args.terms, args.length, seed=1))


def describe_task(args: argparse.Namespace) -> str:
    if args.task == "addition":
        return (f"a + b with operands uniform in [0, 10^{args.width}), every number written least-significant digit "
                f"first and zero-padded to {args.width} digits (the sum to {args.width + 1}): \"7500+8600=52100\" "
                f"is 57 + 68 = 125 at width 4. Evaluation problems are never in training.")
    return (f"{args.terms} uniform starting digits and a colon, then {args.length} digits, each the last digit of "
            f"the sum of the {args.terms} before it (\"58:31459...\" at 2, the Fibonacci numbers mod 10); there are "
            f"only {10 ** args.terms:,} distinct problems, so every evaluation problem also occurs in training: what "
            "is measured is how well the rule is executed, not generalization.")


def plot(results: dict, args: argparse.Namespace, path: str) -> None:
    fig, (tokens_ax, exact_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, run), color in zip(results["runs"].items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        table = run["by_length"]
        lengths = sorted(table, key=int)
        x = [int(n) for n in lengths]
        tokens_ax.plot(x, [table[n]["teacher_forced_token_acc"] for n in lengths], "--", color=color, marker="s",
                       label=f"{name}, teacher-forced")
        tokens_ax.plot(x, [table[n]["free_running_token_acc"] for n in lengths], "-", color=color, marker="o",
                       label=f"{name}, free-running")
        exact_ax.plot(x, [table[n]["teacher_forced_exact"] for n in lengths], "--", color=color, marker="s",
                      label=f"{name}, teacher-forced (greedy_match)")
        exact_ax.plot(x, [table[n]["free_running_exact"] for n in lengths], ":", color=color, marker="o",
                      label=f"{name}, free-running")
    tokens_ax.set_title("accuracy of output token t")
    exact_ax.set_title("exact match of the first t output tokens")
    for ax in (tokens_ax, exact_ax):
        ax.set_xlabel(f"output length t (answer digits, then EOS at t = {answer_tokens(args)})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    tokens_ax.set_ylabel("accuracy")
    tokens_ax.legend(fontsize=7)
    exact_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict, args: argparse.Namespace) -> str:
    command = (f"python -m benchmarks.exposure_bias --task={args.task} --steps={args.steps} --width={args.width} "
               f"--terms={args.terms} --length={args.length} "
               f"--train_problems={args.train_problems} --eval_problems={args.eval_problems} "
               f"--embed_dim={args.embed_dim} --lr={args.lr} --cap={args.cap} --runs={args.runs}")
    lines = [
        f"# Exposure bias on {args.task}: teacher forcing vs scheduled sampling",
        "",
        f"`{command}`",
        f"(CPU, {platform.machine()}, Python {platform.python_version()}, on a shared machine; the whole script "
        f"took {results['seconds']:.0f} s).",
        "",
        f"Task: {describe_task(args)} {args.train_problems:,} seeded training problems, one document each (packed "
        f"into rows as one EOS-joined stream); {args.eval_problems} evaluation problems from another seed. "
        f"Models: 2 layers, d={args.embed_dim}, 4 heads, RoPE, character vocabulary, "
        f"seq_len 64, batch 32, {args.steps} steps, AdamW at peak lr "
        f"{args.lr} (cosine): every run sees the same {results['tokens']:,} tokens in the same order.",
        "",
        "Scheduled sampling (`train.scheduled_sampling`, capped at "
        f"`scheduled_sampling_max={args.cap}`): a gradient-free forward pass guesses every input token, and each "
        "gold input is replaced by the guess with probability p(step). Pretraining rows weight every token, so "
        "the question's digits are replaced too (in Bengio et al.'s encoder-decoder setting only the decoder's "
        "inputs are): a replaced question digit makes the gold answer disagree with the question the model reads.",
        "",
        "| run | schedule | final train loss | final val loss | train FLOPs | + guess pass | wall time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        extra = f"{run['guess_flops']:.2e}" if run["guess_flops"] else "0"
        lines.append(f"| {name} | {run['schedule']} | {run['final_train_loss']:.4f} | {run['final_val_loss']:.4f} | "
                     f"{run['train_flops']:.2e} | {extra} | {run['wall_time_s']:.0f} s |")
    lines += [
        "",
        "Same compute: equal steps, tokens and optimizer FLOPs; scheduled sampling adds one forward pass per "
        "step (the \"+ guess pass\" column, a third of the forward+backward count, not in `train_flops`). "
        "Wall times are on a shared, loaded machine: compare them loosely.",
        "",
        "![accuracy vs answer length](accuracy_vs_length.png)",
        "",
        "Output token t of the answer (its digits, then its end, EOS): teacher-forced, the argmax given the gold "
        "tokens 1..t-1; free-running, what greedy generation from the question wrote. Exact match of the first t "
        "tokens is the same in both modes by construction (greedy decoding reproduces a prefix exactly when each "
        "of its tokens is the argmax given the gold tokens before it); the table shows both as a check.",
        "",
    ]
    for name, run in results["runs"].items():
        lines += [f"**{name}**", "",
                  "| output length t | examples | teacher-forced token acc | free-running token acc | gap | "
                  "exact (teacher-forced) | exact (free-running) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for length, row in sorted(run["by_length"].items(), key=lambda kv: int(kv[0])):
            gap = row["teacher_forced_token_acc"] - row["free_running_token_acc"]
            lines.append(f"| {length} | {row['examples']} | {row['teacher_forced_token_acc']:.3f} | "
                         f"{row['free_running_token_acc']:.3f} | {gap:+.3f} | {row['teacher_forced_exact']:.3f} | "
                         f"{row['free_running_exact']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--task", choices=("digit_sum", "addition"), default="digit_sum")
    parser.add_argument("--terms", type=int, default=2, help="digit_sum: digits summed")
    parser.add_argument("--length", type=int, default=16, help="digit_sum: answer digits")
    parser.add_argument("--width", type=int, default=4, help="addition: operand digits")
    parser.add_argument("--train_problems", type=int, default=100_000)
    parser.add_argument("--eval_problems", type=int, default=300)
    parser.add_argument("--embed_dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cap", type=float, default=0.25)
    parser.add_argument("--runs", default="teacher_forcing,ss_linear,ss_inverse_sigmoid")
    parser.add_argument("--out", default="benchmarks/results/exposure_bias")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite README.md and the plot from results.json")
    args = parser.parse_args()
    if args.rewrite:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        write_report(results, argparse.Namespace(**dict(results["args"], out=args.out)))
        return
    known = schedules(args.steps, args.cap)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--runs: unknown run(s) {unknown}; choose from {list(known)}")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    training, evaluation = problems(args)
    results: dict = {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, f"{args.task}.jsonl")
        with open(corpus, "w") as f:
            f.writelines(json.dumps({"text": q + a}) + "\n" for q, a in training)
        for name in names:
            schedule, k, description = known[name]
            config = run_config(corpus, os.path.join(tmp, "cache"), args, name, schedule, k)
            workdir = os.path.join(tmp, name)
            summary = trainer.train(config, workdir)
            outcomes = exposure.run_problems(open_scorer(workdir, batch_size=64), evaluation)
            results["tokens"] = summary["tokens_seen"]
            results["runs"][name] = {
                "schedule": description,
                "final_train_loss": summary["final_train_loss"],
                "final_val_loss": summary["final_val_loss"],
                "train_flops": summary["train_flops"],
                "guess_flops": summary["train_flops"] / 3 if schedule != "none" else 0.0,
                "wall_time_s": summary["wall_time_s"],
                "by_length": {str(n): row for n, row in exposure.accuracy_by_length(outcomes).items()},
            }
            print(name, json.dumps(results["runs"][name]["by_length"]), flush=True)
    results["seconds"] = time.time() - start
    results["args"] = {k: v for k, v in vars(args).items() if k != "rewrite"}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, args)


def write_report(results: dict, args: argparse.Namespace) -> None:
    plot(results, args, os.path.join(args.out, "accuracy_vs_length.png"))
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(markdown(results, args))
    print(f"wrote {args.out}/README.md and accuracy_vs_length.png")


if __name__ == "__main__":
    main()
