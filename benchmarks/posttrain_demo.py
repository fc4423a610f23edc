"""Post-training on a task a program can check: pretrain a tiny byte-level model, SFT it briefly on
sums ("12+7=" -> "19"), then DPO it, train a reward model, and PPO it against that reward model, on
pairs where the right sum is preferred to a wrong one. Reports the judge's score (greedy answers
that are the right sum), the validation response loss (the alignment tax), DPO's held-out preference
accuracy over its steps, the reward model's held-out pairwise accuracy, and PPO's reward and KL.

    python -m benchmarks.posttrain_demo [--out=benchmarks/results/posttrain]   (from the repo root)

Everything runs through the library (lmjax.train.trainer, lmjax.posttrain.trainer) with the
presets in configs/posttrain/ and a few overrides; the data comes from lmjax.posttrain.synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import model
from lmjax.posttrain import chat, ppo_trainer, synthetic
from lmjax.posttrain import trainer as pt_trainer
from lmjax.train import metrics
from lmjax.train import trainer as pre_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 24


def pretrain(runs: str, steps: int) -> str:
    """A byte-level 4-layer d=64 model, a few hundred steps on lmjax's own training code."""
    workdir = os.path.join(runs, "pretrain")
    c = config_lib.default_config()
    c.name = "posttrain_demo_base"
    c.model.update(num_layers=4, embed_dim=64, num_heads=4, num_kv_heads=4, max_len=64)
    c.data.update(source=f"text:{REPO}/lmjax/train/*.py", tokenizer="byte", text_split="tail", val_fraction=0.1,
                  seq_len=64, cache_dir=os.path.join(runs, "cache"))
    c.train.update(steps=steps, batch_size=16, log_every=50)
    c.optim.update(lr=3e-3, warmup_steps=min(20, steps // 5))
    c.checkpoint.every_steps = steps
    c.eval.update(every_steps=steps, steps=2, num_samples=0)
    pre_trainer.train(c, workdir)
    return workdir


def posttrain_config(mode: str, files: dict, overrides: dict):
    c = config_lib.load(f"configs/posttrain/{mode}.py", overrides)
    kind = "sft" if mode == "sft" else "pairs"
    c.posttrain.update(train_file=files[f"{kind}_train"], eval_file=files[f"{kind}_eval"])
    c.data.seq_len = SEQ_LEN
    return c


def posttrain(mode: str, init_from: str, runs: str, files: dict, overrides: dict):
    config, workdir = posttrain_config(mode, files, overrides), os.path.join(runs, mode)
    run = (ppo_trainer.PPORun(config, init_from, workdir) if mode == "ppo" else
           pt_trainer.PosttrainRun(mode, config, init_from, workdir))
    run.run()
    return run, metrics.read_metrics(run.workdir)


def judge_score(run, prompts: list[str], params=None) -> tuple[float, list[str]]:
    """Share of greedy answers that are the right sum, and the answers."""
    ids = [run.template.prompt_ids(chat.conversation(p)) for p in prompts]
    params = run.state.params if params is None else params
    new = model.generate(run.config.model, params, ids, 6, temperature=0.0, eos_id=run.template.end_id)
    answers = [run.template.decode(tokens) for tokens in new]
    return float(np.mean([synthetic.judge(p, a) for p, a in zip(prompts, answers)])), answers


def plot(dpo_records: list[dict], reward_records: list[dict], ppo_records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    steps = [r["step"] for r in ppo_records]
    axes[2].plot(steps, [r["score"] for r in ppo_records], "o-", label="reward-model score")
    axes[2].plot(steps, [r["kl_k3"] for r in ppo_records], "s--", label="KL to reference (k3, per response)")
    axes[2].set_xlabel("step")
    axes[2].set_title("PPO")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    for ax, records, title in ((axes[0], dpo_records, "DPO"), (axes[1], reward_records, "reward model")):
        evals = [r for r in records if "val_accuracy" in r]
        ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label="held-out pair accuracy")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s--", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "posttrain"))
    parser.add_argument("--runs", default="/tmp/lmjax_posttrain_demo", help="workdirs (checkpoints), data")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--sft_steps", type=int, default=300)
    parser.add_argument("--dpo_steps", type=int, default=200)
    parser.add_argument("--reward_steps", type=int, default=300)
    parser.add_argument("--ppo_steps", type=int, default=60)
    args = parser.parse_args()
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    files = synthetic.write_all(os.path.join(args.runs, "data"), train=2000, evaluation=200)
    eval_prompts = [json.loads(line)["prompt"] for line in open(files["sft_eval"])]
    base = pretrain(args.runs, args.pretrain_steps)
    common = {"train.batch_size": 32, "train.log_every": 50, "eval.num_samples": 0}
    warmup = lambda steps: {"optim.warmup_steps": min(20, steps // 5)}  # noqa: E731
    sft, sft_records = posttrain("sft", base, args.runs, files, {
        **common, **warmup(args.sft_steps), "train.steps": args.sft_steps, "optim.lr": 3e-3, "eval.every_steps": args.sft_steps // 4,
        "checkpoint.every_steps": args.sft_steps})
    sft_score, sft_answers = judge_score(sft, eval_prompts)
    sft_workdir = sft.workdir
    dpo, dpo_records = posttrain("dpo", sft_workdir, args.runs, files, {
        **common, **warmup(args.dpo_steps), "train.steps": args.dpo_steps, "optim.lr": 1e-4, "dpo.beta": 0.1,
        "eval.every_steps": max(args.dpo_steps // 8, 1), "checkpoint.every_steps": args.dpo_steps})
    dpo_score, dpo_answers = judge_score(dpo, eval_prompts)
    # The DPO policy's response loss on the SFT validation set (the alignment tax, if any).
    sft_eval = pt_trainer.PosttrainRun("sft", posttrain_config("sft", files, {"train.batch_size": 32}), dpo.workdir,
                                       os.path.join(args.runs, "dpo_sft_eval"))
    dpo_val = sft_eval.evaluate(dpo.state.params)["val_loss"]
    reward, reward_records = posttrain("reward", sft_workdir, args.runs, files, {
        **common, **warmup(args.reward_steps), "train.steps": args.reward_steps, "optim.lr": 1e-3,
        "eval.every_steps": max(args.reward_steps // 8, 1), "checkpoint.every_steps": args.reward_steps})
    ppo_run, ppo_records = posttrain("ppo", sft_workdir, args.runs, files, {
        "train.batch_size": 32, "train.log_every": 1, "train.steps": args.ppo_steps, "optim.lr": 5e-5,
        "checkpoint.every_steps": args.ppo_steps, "ppo.reward_from": reward.workdir, "ppo.max_new_tokens": 4,
        "ppo.kl_coef": 0.1})
    ppo_score, ppo_answers = judge_score(ppo_run, eval_prompts, ppo_run.state.params["policy"])
    ppo_val = sft_eval.evaluate(ppo_run.state.params["policy"])["val_loss"]
    plot(dpo_records, reward_records, ppo_records, os.path.join(args.out, "posttrain_demo.png"))

    first_sft = next(r for r in sft_records if r["step"] == 0)
    last = lambda records: [r for r in records if "val_loss" in r][-1]  # noqa: E731
    dpo_evals = [r for r in dpo_records if "val_accuracy" in r]
    rows = [
        ("pretrained (before SFT)", "-", f"{first_sft['val_loss']:.4f}"),
        (f"SFT, {args.sft_steps} steps", f"{sft_score:.3f}", f"{last(sft_records)['val_loss']:.4f}"),
        (f"SFT + DPO, {args.dpo_steps} steps", f"{dpo_score:.3f}", f"{dpo_val:.4f}"),
        (f"SFT + PPO, {args.ppo_steps} steps", f"{ppo_score:.3f}", f"{ppo_val:.4f}"),
    ]
    lines = [
        "# Post-training demo: sums, judged by a program",
        "",
        f"`python -m benchmarks.posttrain_demo` on {platform.processor() or platform.machine()}, "
        f"{len(jax.devices())} CPU device(s), jax {jax.__version__}; total wall time {time.time() - start:.0f} s "
        "(the machine was shared with other jobs).",
        "",
        "Base model: 4 layers, d=64, byte tokenizer (259 ids + 4 chat ids), pretrained "
        f"{args.pretrain_steps} steps on lmjax/train/*.py. Data (lmjax.posttrain.synthetic): 2000 train and 200 "
        "held-out prompts `a+b=` with a, b in 0..20; preference pairs prefer the right sum to one off by 1..5.",
        "",
        "| model | judge score (greedy answer is the right sum, 200 held-out prompts) | held-out response loss (nats/token) |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "DPO (beta 0.1, lr 1e-4) held-out preference accuracy (implicit reward of the right sum > the wrong one) and loss "
        "(at step 0 the policy is its reference: every margin is exactly 0, which counts as not preferred):",
        "",
        "| step | pair accuracy | DPO loss | reward margin |",
        "|---|---|---|---|",
        *[f"| {r['step']} | {r['val_accuracy']:.3f} | {r['val_loss']:.4f} | {r['val_reward_margin']:.3f} |" for r in dpo_evals],
        "",
        f"Reward model (from the SFT model, {args.reward_steps} steps, Bradley-Terry): held-out pairwise accuracy "
        f"{last(reward_records)['val_accuracy']:.3f} (step 0: "
        f"{next(r for r in reward_records if r['step'] == 0)['val_accuracy']:.3f}); the judge itself is exact (1.0).",
        "",
        f"PPO (from the SFT model, against that reward model; {args.ppo_steps} steps of 32 prompts, responses of "
        "at most 4 tokens sampled at temperature 1, kl_coef 0.1, lr 5e-5, 2 epochs x 2 minibatches):",
        "",
        "| step | reward-model score | KL k1 | KL k3 | clip fraction |",
        "|---|---|---|---|---|",
        *[f"| {r['step']} | {r['score']:.3f} | {r['kl_k1']:.4f} | {r['kl_k3']:.4f} | {r['clip_fraction']:.3f} |"
          for r in ppo_records if r["step"] in (1, 2, 5) or r["step"] % 10 == 0],
        "",
        "Sample greedy answers after SFT, DPO and PPO:",
        "",
        *[f"- `{p}` SFT `{a}`, DPO `{b}`, PPO `{c}`"
          for p, a, b, c in list(zip(eval_prompts, sft_answers, dpo_answers, ppo_answers))[:8]],
        "",
        "![DPO and reward-model curves](posttrain_demo.png)",
    ]
    with open(os.path.join(args.out, "posttrain_demo.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
