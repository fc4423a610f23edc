"""Post-training with a judge the reward model never sees: pretrain a small model on the Python
standard library, instruction-tune it to write a function's body from its signature and docstring,
then align it with preferences over its OWN samples, labelled by a program: "the function parses".

    python -m benchmarks.posttrain_demo [--size=full|tiny] [--set ppo_lr=3e-5 ...] [--out=benchmarks/results/posttrain]

1. Pretrain (lmjax.train.trainer, `pystdlib` source, SentencePiece BPE): resumable like any run.
2. SFT on (signature + docstring -> body) pairs extracted with `ast` (lmjax.posttrain.stdlib); the
   validation functions come from files pretraining held out. Held-out response loss before/after.
3. Preference pairs: the SFT policy samples several bodies per prompt; the judge (the body ends with
   <|end|> and prompt + body parses as one function, lmjax.posttrain.stdlib.parses) labels them; a
   prompt whose samples the judge splits gives pairs (a passing sample chosen, a failing one rejected).
4. A reward model on those pairs (held-out pairwise accuracy, beside the judge's ceiling and a
   length baseline); PPO against it, one run per KL coefficient in `kl_coefs` (judge score and KL to
   the reference at every checkpoint, on held-out prompts); DPO on the same pairs; a table of judge score and held-out response loss (the alignment tax).

Every stage runs through the library (lmjax.train.trainer.train, lmjax.posttrain.trainer.train) with
the presets in configs/posttrain/ and a few overrides; re-running the script resumes finished stages.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from lmjax import config as config_lib
from lmjax import data, fileio, model
from lmjax.posttrain import batches, chat, stdlib
from lmjax.posttrain import config as pt_config
from lmjax.posttrain import init as init_lib
from lmjax.posttrain import trainer as pt_trainer
from lmjax.posttrain.losses import token_logps
from lmjax.train import checkpointing, metrics
from lmjax.train import trainer as pre_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything that sets the cost; `tiny` is for the notebook's test and for trying the script out.
SIZES = {
    "full": dict(
        layers=3, embed_dim=96, heads=4, vocab=1024, val_fraction=0.1, pretrain_steps=800, pretrain_batch=16,
        pretrain_seq=128, pretrain_lr=3e-3, seq_len=128, max_prompt_chars=300, max_response_chars=150,
        max_new_tokens=48, sft_steps=250, sft_batch=16, sft_lr=1e-3, pair_prompts=400, samples_per_prompt=4,
        reward_steps=120, reward_batch=16, reward_lr=3e-4, dpo_steps=100, dpo_batch=16, dpo_lr=1e-4, dpo_beta=0.1,
        ppo_steps=40, ppo_batch=32, ppo_lr=1e-4, kl_coefs="0.05,0.2", judge_every=10, eval_prompts=100, eval_samples=4,
        min_pairs=64, chunk=128, pretrain_eval_batches=4,
    ),
    "tiny": dict(
        layers=1, embed_dim=32, heads=2, vocab=384, val_fraction=0.1, pretrain_steps=6, pretrain_batch=8,
        pretrain_seq=64, pretrain_lr=3e-3, seq_len=96, max_prompt_chars=120, max_response_chars=60,
        max_new_tokens=16, sft_steps=4, sft_batch=8, sft_lr=1e-3, pair_prompts=8, samples_per_prompt=2,
        reward_steps=3, reward_batch=4, reward_lr=3e-4, dpo_steps=3, dpo_batch=4, dpo_lr=1e-4, dpo_beta=0.1,
        ppo_steps=2, ppo_batch=4, ppo_lr=3e-5, kl_coefs="0.05", judge_every=1, eval_prompts=6, eval_samples=2,
        min_pairs=8, chunk=16, pretrain_eval_batches=0,
    ),
}


# --- data and the judge --------------------------------------------------------------------------

def judge(prompt: str, response: str, ended: bool) -> bool:
    """The judge the reward model never sees: a finished body (the policy emitted <|end|>) that makes
    prompt + body one valid Python function."""
    return ended and stdlib.parses(prompt, response)


def stdlib_examples(size: dict, template: chat.ChatTemplate) -> tuple[list[dict], list[dict]]:
    """(train, validation) functions whose prompt, body and sampled body fit the context."""
    train, validation = stdlib.train_and_validation(size["val_fraction"], max(size["max_prompt_chars"],
                                                                               size["max_response_chars"]))

    def fits(example: dict) -> bool:
        if len(example["prompt"]) > size["max_prompt_chars"] or len(example["response"]) > size["max_response_chars"]:
            return False
        prompt = len(template.prompt_ids(chat.conversation(example["prompt"])))
        response = len(template.tokenizer.encode(example["response"])) + 1  # + <|end|>
        return response <= size["max_new_tokens"] and prompt + size["max_new_tokens"] <= size["seq_len"]

    return [e for e in train if fits(e)], [e for e in validation if fits(e)]


# --- runs through the library --------------------------------------------------------------------

def pretrain(runs: str, size: dict) -> str:
    """A small model pretrained on the standard library's train files with lmjax's own trainer."""
    workdir = os.path.join(runs, "pretrain")
    c = config_lib.default_config()
    c.name = "posttrain_demo_base"
    c.model.update(num_layers=size["layers"], embed_dim=size["embed_dim"], num_heads=size["heads"],
                   num_kv_heads=size["heads"], max_len=max(size["pretrain_seq"], size["seq_len"]))
    c.data.update(source="pystdlib", tokenizer="sentencepiece", vocab_size=size["vocab"],
                  val_fraction=size["val_fraction"], seq_len=size["pretrain_seq"], tokenizer_max_sentences=50_000,
                  cache_dir=os.path.join(runs, "cache"))
    steps = size["pretrain_steps"]
    c.train.update(steps=steps, batch_size=size["pretrain_batch"], log_every=max(steps // 10, 1))
    c.optim.update(lr=size["pretrain_lr"], warmup_steps=min(100, steps // 5))
    c.checkpoint.every_steps = max(steps // 4, 1)
    c.eval.update(every_steps=steps, steps=size["pretrain_eval_batches"], num_samples=0)
    pre_trainer.train(c, workdir)
    return workdir


def posttrain(mode: str, init_from: str, runs: str, overrides: dict[str, Any], name: str = "") -> tuple[str, list[dict]]:
    """One post-training run (a preset of configs/posttrain/ with `overrides`) in runs/<name or mode>;
    its workdir and metrics."""
    config = config_lib.load(f"configs/posttrain/{mode}.py", overrides)
    workdir = os.path.join(runs, name or mode)
    pt_trainer.train(mode, config, init_from, workdir)
    return workdir, metrics.read_metrics(workdir)


class Policy:
    """A language model read back from a run's checkpoint: its config, tokenizer template and parameters."""

    def __init__(self, workdir: str, step: int | None = None):
        self.config = pt_config.init_config(workdir, config_lib.default_config().mesh)
        if step is None:
            self.params = init_lib.load_params(self.config, workdir)
        else:  # a PPO checkpoint: the policy's parameters out of the actor-critic's train state
            manager = checkpointing.make_manager(workdir, None, read_only=True)
            try:
                state = checkpointing.restore_step(manager, step, None).state
            finally:
                manager.close()
            self.params = jax.tree.map(jnp.asarray, state["params"]["policy"])
        self.template = chat.ChatTemplate(data.build_tokenizer(self.config.data))
        if self.config.model.vocab_size < self.template.vocab_size:  # the pretrained model: grow it as SFT does
            self.config.model.vocab_size = self.template.vocab_size
            self.params = init_lib.grow_vocab(self.params, model.padded_vocab_size(self.config.model))


# --- measuring a policy --------------------------------------------------------------------------

def sample(policy: Policy, prompts: list[str], count: int, size: dict, seed: int, temperature: float = 1.0
           ) -> list[dict]:
    """`count` responses to every prompt ({"prompt_index", "text", "ids", "ended", "passed"}), sampled in
    fixed-size chunks left-padded to the longest prompt that fits, so every call runs one compiled program."""
    ids = [policy.template.prompt_ids(chat.conversation(p)) for p in prompts]
    order = [(i, j) for i in range(len(prompts)) for j in range(count)]
    longest, chunk, out = size["seq_len"] - size["max_new_tokens"], size["chunk"], []
    for first in range(0, len(order), chunk):
        part = order[first:first + chunk]
        padded = part + [part[-1]] * (chunk - len(part))
        new = model.generate(policy.config.model, policy.params, [ids[i] for i, _ in padded], size["max_new_tokens"],
                             temperature=temperature, rng=jax.random.key(seed * 100_003 + first),
                             eos_id=policy.template.end_id, min_prompt_len=longest)
        for (i, _), tokens in zip(part, new):
            ended = len(tokens) < size["max_new_tokens"]
            text = policy.template.decode(tokens)
            out.append({"prompt_index": i, "text": text, "ids": [int(t) for t in tokens], "ended": ended,
                        "passed": judge(prompts[i], text, ended)})
    return out


def response_rows(template: chat.ChatTemplate, prompts: list[str], samples: list[dict], seq_len: int
                  ) -> dict[str, np.ndarray]:
    """[N, seq_len] inputs, targets and weights (1 on the sampled tokens and a closing <|end|>)."""
    n = len(samples)
    out = {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
           "weights": np.zeros((n, seq_len), np.float32)}
    for row, s in enumerate(samples):
        prompt = template.prompt_ids(chat.conversation(prompts[s["prompt_index"]]))
        sequence = prompt + s["ids"] + ([template.end_id] if s["ended"] else [])
        n_in = len(sequence) - 1
        out["inputs"][row, :n_in], out["targets"][row, :n_in] = sequence[:-1], sequence[1:]
        out["weights"][row, len(prompt) - 1:n_in] = 1.0
    return out


@functools.cache
def _logps_fn(model_json: str):
    """One jitted program per model shape (every policy and the reference share it)."""
    lm = model.Transformer(config_dict.ConfigDict(json.loads(model_json)))

    @jax.jit
    def logps(params, inputs_BxL, targets_BxL, weights_BxL):
        logits_BxLxV = lm.apply({"params": params}, inputs_BxL, positions=None, segment_ids=None)
        return token_logps(logits_BxLxV, targets_BxL) * weights_BxL

    return logps


def token_logps_of(policy: Policy, rows: dict[str, np.ndarray], chunk: int) -> np.ndarray:
    """Per-token log-probs [N, seq_len] (0 where the weight is 0) of `rows` under `policy`."""
    model_json = json.dumps(config_lib.to_json(policy.config)["model"], sort_keys=True)
    fn, n, out = _logps_fn(model_json), len(rows["inputs"]), []
    for first in range(0, n, chunk):
        index = np.minimum(np.arange(first, first + chunk), n - 1)
        part = {k: jnp.asarray(v[index]) for k, v in rows.items()}
        out.append(np.asarray(fn(policy.params, part["inputs"], part["targets"], part["weights"]))[: n - first])
    return np.concatenate(out)


def measure(policy: Policy, reference: Policy, prompts: list[str], size: dict, seed: int) -> dict:
    """The judge's pass rate over `eval_samples` samples per held-out prompt (temperature 1) and of the
    greedy answers, and KL(policy || reference) per response estimated on those samples (k1, k3)."""
    sampled = sample(policy, prompts, size["eval_samples"], size, seed)
    greedy = sample(policy, prompts, 1, size, seed, temperature=0.0)
    rows = response_rows(policy.template, prompts, sampled, size["seq_len"])
    logp = token_logps_of(policy, rows, size["chunk"])
    ref_logp = token_logps_of(reference, rows, size["chunk"])
    log_ratio = (logp - ref_logp) * rows["weights"]
    k3 = (np.exp(-log_ratio) - 1.0 + log_ratio) * rows["weights"]
    return {
        "judge": float(np.mean([s["passed"] for s in sampled])),
        "judge_greedy": float(np.mean([s["passed"] for s in greedy])),
        "ended": float(np.mean([s["ended"] for s in sampled])),
        "response_tokens": float(np.mean(rows["weights"].sum(1))),
        "kl_k1": float(np.mean(log_ratio.sum(1))), "kl_k3": float(np.mean(k3.sum(1))),
        "examples": [(prompts[s["prompt_index"]], s["text"], s["passed"]) for s in greedy[:4]],
    }


def response_loss(policy: Policy, examples: list[dict], size: dict) -> float:
    """Mean loss (nats per token) of the reference bodies (and their <|end|>) of `examples`."""
    rows = batches.sft_rows(policy.template, [{"messages": chat.conversation(e["prompt"], e["response"])}
                                              for e in examples], size["seq_len"], pad_id=0, pack=False)
    rows = {k: rows[k] for k in ("inputs", "targets", "weights")}
    logp = token_logps_of(policy, rows, size["chunk"])
    return float(-logp.sum() / rows["weights"].sum())


# --- preference pairs from the policy's own samples ----------------------------------------------

def own_pairs(policy: Policy, examples: list[dict], size: dict, seed: int) -> tuple[list[dict], dict]:
    """Pairs (a judge-passing sample chosen, a failing one rejected) from `samples_per_prompt` samples
    of each prompt; prompts whose samples all pass or all fail give none. Also the counts."""
    prompts = [e["prompt"] for e in examples]
    samples = sample(policy, prompts, size["samples_per_prompt"], size, seed)
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        # An empty body cannot be a pair's response; a body whose text re-encodes longer than the context
        # (special ids decoded as their names) cannot be a pair's row.
        ids, _ = policy.template.encode(chat.conversation(prompts[s["prompt_index"]], s["text"]))
        if s["text"].strip() and len(ids) - 1 <= size["seq_len"]:
            by_prompt.setdefault(s["prompt_index"], []).append(s)
    pairs = []
    for i, group in sorted(by_prompt.items()):
        good = [s for s in group if s["passed"]]
        bad = [s for s in group if not s["passed"]]
        for chosen, rejected in zip(good, bad):
            pairs.append({"prompt": prompts[i], "chosen": chosen["text"], "rejected": rejected["text"],
                          "chosen_ended": chosen["ended"], "rejected_ended": rejected["ended"]})
    stats = {"prompts": len(prompts), "samples": len(samples), "pass_rate": float(np.mean([s["passed"] for s in samples])),
             "pairs": len(pairs), "mixed_prompts": len({p["prompt"] for p in pairs}), "filled": 0}
    # Too few on-policy pairs (a tiny model passes nothing): the reference body stands in as the chosen one.
    for i, group in sorted(by_prompt.items()):
        if len(pairs) >= size["min_pairs"]:
            break
        bad = [s for s in group if not s["passed"]]
        if bad and not any(s["passed"] for s in group):
            pairs.append({"prompt": prompts[i], "chosen": examples[i]["response"], "rejected": bad[0]["text"],
                          "chosen_ended": True, "rejected_ended": bad[0]["ended"]})
            stats["filled"] += 1
    return pairs, stats


def length_baseline(pairs: list[dict]) -> float:
    """Pairwise accuracy of "the shorter response is better" (ties count half): what a reward model
    that learned only length would score."""
    scores = [0.5 if len(p["chosen"]) == len(p["rejected"]) else float(len(p["chosen"]) < len(p["rejected"]))
              for p in pairs]
    return float(np.mean(scores)) if scores else float("nan")


# --- the whole pipeline --------------------------------------------------------------------------

def run_pipeline(size: dict, runs: str, log=print) -> dict:
    """Every stage; returns what the report and the plots need."""
    start = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.time() - start - sum(timings.values())
        log(f"== {name}: {timings[name]:.0f} s")

    base_dir = pretrain(runs, size)
    lap("pretrain")
    base = Policy(base_dir)
    train, validation = stdlib_examples(size, base.template)
    rng = np.random.default_rng(0)
    validation = [validation[i] for i in sorted(rng.permutation(len(validation))[: size["eval_prompts"]])]
    data_dir = os.path.join(runs, "data")
    sft_files = {"train": fileio.write_jsonl(os.path.join(data_dir, "sft_train.jsonl"), train),
                 "eval": fileio.write_jsonl(os.path.join(data_dir, "sft_eval.jsonl"), validation)}
    log(f"SFT data: {len(train)} train functions, {len(validation)} held-out functions")
    seq = {"data.seq_len": size["seq_len"]}

    def warmup(steps: int) -> dict:
        return {"optim.warmup_steps": min(20, steps // 5)}

    steps = size["sft_steps"]
    sft_dir, sft_records = posttrain("sft", base_dir, runs, {
        **seq, **warmup(steps), "train.steps": steps, "train.batch_size": size["sft_batch"], "optim.lr": size["sft_lr"],
        "train.log_every": max(steps // 10, 1), "checkpoint.every_steps": steps,
        "posttrain.train_file": sft_files["train"]})
    lap("sft")
    sft = Policy(sft_dir)
    pair_rng = np.random.default_rng(1)
    pair_examples = [train[i] for i in sorted(pair_rng.permutation(len(train))[: size["pair_prompts"]])]
    train_pairs, train_pair_stats = own_pairs(sft, pair_examples, size, seed=1)
    eval_pairs, eval_pair_stats = own_pairs(sft, validation, size, seed=2)
    pair_files = {"train": fileio.write_jsonl(os.path.join(data_dir, "pairs_train.jsonl"), train_pairs),
                  "eval": fileio.write_jsonl(os.path.join(data_dir, "pairs_eval.jsonl"), eval_pairs)}
    log(f"pairs: train {train_pair_stats}, held-out {eval_pair_stats}")
    lap("pairs")
    pairs_data = {"posttrain.train_file": pair_files["train"], "posttrain.eval_file": pair_files["eval"]}

    steps = size["reward_steps"]
    reward_dir, reward_records = posttrain("reward", sft_dir, runs, {
        **seq, **warmup(steps), **pairs_data, "train.steps": steps, "train.batch_size": size["reward_batch"],
        "optim.lr": size["reward_lr"], "train.log_every": max(steps // 10, 1), "eval.every_steps": max(steps // 6, 1),
        "checkpoint.every_steps": steps})
    lap("reward model")

    steps, ppo = size["ppo_steps"], []
    for i, coef in enumerate(float(c) for c in str(size["kl_coefs"]).split(",")):
        ppo_dir, ppo_records = posttrain("ppo", sft_dir, runs, {
            **seq, "train.steps": steps, "train.batch_size": size["ppo_batch"], "optim.lr": size["ppo_lr"],
            "train.log_every": 1, "checkpoint.every_steps": size["judge_every"], "checkpoint.max_to_keep": steps,
            "checkpoint.async_save": False, "ppo.reward_from": reward_dir, "ppo.max_new_tokens": size["max_new_tokens"],
            "ppo.kl_coef": coef, "posttrain.train_file": sft_files["train"]}, name="ppo" if i == 0 else f"ppo_kl{coef}")
        ppo.append({"kl_coef": coef, "dir": ppo_dir, "records": ppo_records, "curve": []})
    lap("ppo")

    steps = size["dpo_steps"]
    dpo_dir, dpo_records = posttrain("dpo", sft_dir, runs, {
        **seq, **warmup(steps), **pairs_data, "train.steps": steps, "train.batch_size": size["dpo_batch"],
        "optim.lr": size["dpo_lr"], "dpo.beta": size["dpo_beta"], "train.log_every": max(steps // 10, 1),
        "eval.every_steps": max(steps // 8, 1), "eval.num_samples": 0, "checkpoint.every_steps": steps})
    lap("dpo")

    prompts = [e["prompt"] for e in validation]
    sft_measured = measure(sft, sft, prompts, size, seed=3)
    table = {"pretrained": {**measure(base, sft, prompts, size, seed=3), "val_loss": response_loss(base, validation, size)},
             "SFT": {**sft_measured, "val_loss": response_loss(sft, validation, size)}}
    for run in ppo:
        run["curve"].append({"step": 0, **sft_measured})
        for step in checkpointing.committed_steps(run["dir"]):
            policy = Policy(run["dir"], step)
            run["curve"].append({"step": step, **measure(policy, sft, prompts, size, seed=3)})
            log(f"PPO (kl_coef {run['kl_coef']}) step {step}: judge {run['curve'][-1]['judge']:.3f}, "
                f"KL k3 {run['curve'][-1]['kl_k3']:.3f}")
        table[f"SFT + PPO (kl_coef {run['kl_coef']})"] = {**run["curve"][-1], "val_loss": response_loss(policy, validation, size)}
    dpo = Policy(dpo_dir)
    table["SFT + DPO"] = {**measure(dpo, sft, prompts, size, seed=3), "val_loss": response_loss(dpo, validation, size)}
    for name, row in table.items():
        log(f"{name}: judge {row['judge']:.3f} (greedy {row['judge_greedy']:.3f}), val loss {row['val_loss']:.4f}")
    lap("evaluation")
    train_wall = {name: (metrics.read_summary(os.path.join(runs, name)) or {}).get("wall_time_s", float("nan"))
                  for name in ("pretrain", "sft", "reward", *[os.path.basename(r["dir"]) for r in ppo], "dpo")}
    return {
        "size": size, "runs": runs, "timings": timings, "wall_s": time.time() - start,
        "sft_examples": (len(train), len(validation)), "pair_stats": (train_pair_stats, eval_pair_stats),
        "length_baseline": length_baseline(eval_pairs), "sft_records": sft_records, "reward_records": reward_records,
        "ppo": [{k: v for k, v in r.items() if k != "dir"} for r in ppo], "dpo_records": dpo_records, "table": table,
        "train_wall_s": train_wall,
        "base_config": config_lib.to_json(base.config),
    }


# --- report --------------------------------------------------------------------------------------

def plot(results: dict, path: str | None = None):
    """Four panels: PPO's judge score and KL over steps (held-out), PPO's rollout reward-model score and
    KL, the reward model's and DPO's held-out pair accuracy."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 3.8))
    table = results["table"]
    for i, run in enumerate(results["ppo"]):
        curve, color, label = run["curve"], f"C{i}", f"kl_coef {run['kl_coef']}"
        steps = [r["step"] for r in curve]
        axes[0].plot(steps, [r["judge"] for r in curve], "o-", color=color, label=f"{label}, sampled (T=1)")
        axes[0].plot(steps, [r["judge_greedy"] for r in curve], "s:", color=color, label=f"{label}, greedy")
        axes[1].plot(steps, [r["kl_k1"] for r in curve], "o-", color=color, label=f"{label}, k1")
        axes[1].plot(steps, [r["kl_k3"] for r in curve], "s:", color=color, label=f"{label}, k3")
        records = run["records"]
        axes[2].plot([r["step"] for r in records], [r["score"] for r in records], "-", color=color,
                     label=f"{label}, reward-model score")
        axes[2].plot([r["step"] for r in records], [r["kl_k3"] for r in records], ":", color=color,
                     label=f"{label}, KL k3")
    axes[0].axhline(table["SFT + DPO"]["judge"], color="gray", ls="--", label="DPO, sampled")
    axes[0].set_title("PPO: judge score on held-out prompts")
    axes[0].set_ylim(0, 1)
    axes[1].set_title("PPO: KL to the SFT reference per response (held-out)")
    axes[2].set_title("PPO: on its training rollouts")
    for ax in axes[:3]:
        ax.set_xlabel("PPO step")
        ax.legend(fontsize=7)
    ax = axes[3]
    for name, records in (("reward model", results["reward_records"]), ("DPO", results["dpo_records"])):
        evals = [r for r in records if "val_accuracy" in r]
        ax.plot([r["step"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label=name)
    ax.axhline(1.0, color="k", ls=":", label="judge (ceiling)")
    ax.axhline(results["length_baseline"], color="gray", ls="--", label="shorter wins")
    ax.set_title("held-out pair accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.05)
    ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def report(results: dict, wall_note: str) -> str:
    size, table = results["size"], results["table"]
    train_stats, eval_stats = results["pair_stats"]
    last = lambda records: [r for r in records if "val_accuracy" in r][-1]  # noqa: E731
    reward_last, dpo_last = last(results["reward_records"]), last(results["dpo_records"])
    c = results["base_config"]
    lines = [
        "# Post-training demo: function bodies from the standard library, judged by `ast`",
        "",
        f"`python -m benchmarks.posttrain_demo` on {platform.machine()}, {len(jax.devices())} CPU device(s), "
        f"jax {jax.__version__}, Python {platform.python_version()} (its standard library is the corpus); "
        f"{wall_note}",
        "",
        "Stage times of this invocation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items())
        + "; training wall time of each run over all its invocations (s, from its summary.json; a stage finished "
        "earlier resumes as done): " + ", ".join(f"{k} {v:.0f}" for k, v in results["train_wall_s"].items()) + ".",
        "",
        f"Base model: {c['model']['num_layers']} layers, d={c['model']['embed_dim']}, SentencePiece BPE "
        f"{c['data']['vocab_size']} (+4 chat ids), pretrained {size['pretrain_steps']} steps x {size['pretrain_batch']} x "
        f"{size['pretrain_seq']} tokens on the `pystdlib` train files (val_fraction {size['val_fraction']}). "
        f"SFT data (lmjax.posttrain.stdlib): {results['sft_examples'][0]} train / {results['sft_examples'][1]} held-out "
        f"functions (held-out ones from files pretraining never saw) with a prompt <= {size['max_prompt_chars']} and "
        f"a body <= {size['max_response_chars']} characters.",
        "",
        "**The judge** (never seen by the reward model): the sampled body ends with `<|end|>` within "
        f"{size['max_new_tokens']} tokens and `ast.parse(prompt + body)` gives exactly one function with a body. "
        f"Judge scores are over {size['eval_samples']} samples per held-out prompt at temperature 1 (as PPO samples) and "
        "over greedy answers.",
        "",
        "| model | judge, sampled | judge, greedy | finished (<\\|end\\|>) | KL to SFT (k3, per response) | held-out response loss |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {r['judge']:.3f} | {r['judge_greedy']:.3f} | {r['ended']:.3f} | {r['kl_k3']:.2f} | {r['val_loss']:.4f} |"
          for name, r in table.items()],
        "",
        f"SFT: held-out response loss {table['pretrained']['val_loss']:.4f} -> {table['SFT']['val_loss']:.4f} nats/token "
        f"({size['sft_steps']} steps of {size['sft_batch']} packed rows, lr {size['sft_lr']}; first and last train loss "
        f"{results['sft_records'][0]['loss']:.3f}, {results['sft_records'][-1]['loss']:.3f}).",
        "",
        f"**Preference pairs from the SFT policy's own samples** ({size['samples_per_prompt']} per prompt, T=1): train: "
        f"{train_stats['prompts']} prompts, pass rate {train_stats['pass_rate']:.3f}, {train_stats['mixed_prompts']} "
        f"prompts the judge splits -> {train_stats['pairs']} pairs; held-out: {eval_stats['prompts']} prompts, pass rate "
        f"{eval_stats['pass_rate']:.3f} -> {eval_stats['pairs']} pairs. Reference bodies standing in as chosen "
        f"(only when too few pairs): {train_stats['filled']} train, {eval_stats['filled']} held-out.",
        "",
        f"**Reward model** ({size['reward_steps']} steps, lr {size['reward_lr']}, from SFT): held-out pairwise accuracy "
        f"{reward_last['val_accuracy']:.3f} (step 0: {results['reward_records'][0].get('val_accuracy', float('nan')):.3f}); "
        f"the judge's ceiling is 1.000 (it made the labels); \"the shorter body wins\" scores "
        f"{results['length_baseline']:.3f}.",
        "",
        f"**DPO** ({size['dpo_steps']} steps, beta {size['dpo_beta']}, lr {size['dpo_lr']}): held-out pair accuracy "
        f"{dpo_last['val_accuracy']:.3f}, loss {dpo_last['val_loss']:.4f}, reward margin {dpo_last['val_reward_margin']:.3f}.",
        "",
        f"**PPO** ({size['ppo_steps']} steps of {size['ppo_batch']} prompts, lr {size['ppo_lr']}, "
        "2 epochs x 2 minibatches, responses of at most "
        f"{size['max_new_tokens']} tokens at T=1, one run per KL coefficient), measured on the held-out prompts at "
        "each checkpoint (step 0 is the SFT policy):",
        "",
        *[line for run in results["ppo"] for line in _ppo_lines(run)],
        "Greedy answers on held-out prompts (first lines of the prompt; body; judge):",
        "",
    ]
    for name in [n for n in table if n != "pretrained"]:
        lines.append(f"*{name}*")
        lines.append("")
        for prompt, body, passed in table[name]["examples"][:3]:
            lines.append("```python")
            lines.append(prompt.splitlines()[0] + "   # ... docstring; judge: " + ("pass" if passed else "fail"))
            lines.append(body.rstrip()[:300])
            lines.append("```")
        lines.append("")
    lines.append("![PPO judge score and KL, reward model and DPO accuracy](posttrain_demo.png)")
    return "\n".join(lines) + "\n"


def _ppo_lines(run: dict) -> list[str]:
    return [
        f"*kl_coef {run['kl_coef']}*",
        "",
        "| step | judge, sampled | judge, greedy | finished | response tokens | KL k1 | KL k3 |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['step']} | {r['judge']:.3f} | {r['judge_greedy']:.3f} | {r['ended']:.3f} | {r['response_tokens']:.1f} | "
          f"{r['kl_k1']:.3f} | {r['kl_k3']:.3f} |" for r in run["curve"]],
        "",
        "On its training rollouts (every step logged; a spread shown):",
        "",
        "| step | reward-model score | KL k1 | KL k3 | clip fraction | response length |",
        "|---|---|---|---|---|---|",
        *[f"| {r['step']} | {r['score']:.3f} | {r['kl_k1']:.3f} | {r['kl_k3']:.3f} | {r.get('clip_fraction', 0):.3f} | "
          f"{r['response_length']:.1f} |" for r in _spread(run["records"], 6)],
        "",
    ]


def _spread(records: list[dict], count: int) -> list[dict]:
    index = sorted(set(np.linspace(0, len(records) - 1, count).round().astype(int).tolist()))
    return [records[i] for i in index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "posttrain"))
    parser.add_argument("--runs", default="/tmp/lmjax_posttrain_demo", help="workdirs (checkpoints) and data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one size setting, e.g. --set ppo_steps=40 (repeatable)")
    args = parser.parse_args()
    size = dict(SIZES[args.size])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in size:
            parser.error(f"--set {item}: unknown setting {key!r}; settings: {', '.join(sorted(size))}")
        size[key] = type(size[key])(value)
    load_before = os.getloadavg()
    results = run_pipeline(size, args.runs)
    load_after = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "posttrain_demo.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k != "base_config"}, f, indent=1, default=str)
    plot(results, os.path.join(args.out, "posttrain_demo.png"))
    note = (f"total wall time {results['wall_s'] / 60:.1f} min; the 2-core machine was shared (load average "
            f"{load_before[1]:.1f} over the minute-5 window at the start, {load_after[1]:.1f} at the end).")
    text = report(results, note)
    with open(os.path.join(args.out, "posttrain_demo.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
