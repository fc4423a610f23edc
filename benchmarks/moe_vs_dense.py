"""MoE against dense at equal active parameters and equal tokens, on the embedded corpus.

A 2-layer d=64 GPT with a dense FFN of width 256 against the same model whose FFNs are 8 experts
of width 128 with 2 per token (the same FFN parameters per token, 4x the FFN parameters in all),
through both MoE dispatch paths; same data order, steps, batch and schedule. Writes the loss curves
(PNG), a table (final train and validation loss, tokens/s, parameters) and the metrics records.

Training speed on a shared machine moves with its load, so besides each run's own tokens/s the
three train steps are also timed interleaved (A, B, C, A, B, C, ...) on one fixed batch, where a
change of load hits all three alike. Finished runs in --runs are reused (the trainer resumes them
and finds nothing to do); delete that directory to train again.

    python -m benchmarks.moe_vs_dense [--steps=300] [--out=benchmarks/results]   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

from lmjax import config as config_lib
from lmjax import model, sharding
from lmjax.train import metrics, trainer
from lmjax.train import step as step_lib

RUNS = {
    "dense": {},
    "moe_capacity": {"model.moe.num_experts": 8, "model.moe.experts_per_token": 2, "model.moe.expert_dim": 128,
                     "model.moe.dispatch": "capacity", "model.moe.capacity_factor": 1.25},
    "moe_dropless": {"model.moe.num_experts": 8, "model.moe.experts_per_token": 2, "model.moe.expert_dim": 128,
                     "model.moe.dispatch": "dropless"},
}


def base_config(steps: int):
    c = config_lib.load("configs/gpt_small.py")
    c.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, mlp_dim=256)
    c.data.update(vocab_size=1024, seq_len=128)
    c.model.vocab_size = 1024  # the tokenizer's, set here so that the counts need no tokenizer
    c.train.update(steps=steps, batch_size=8, log_every=10)
    c.optim.update(lr=2e-3, warmup_steps=steps // 10)
    c.eval.update(every_steps=steps // 4, steps=16, num_samples=0)
    c.checkpoint.update(every_steps=steps)
    return c


def run_config(name: str, overrides: dict, steps: int):
    c = base_config(steps)
    c.name = f"moe_vs_dense_{name}"
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
    return c


def run(name: str, c, runs_dir: str) -> dict:
    workdir = os.path.join(runs_dir, name)
    summary = trainer.train(c, workdir)
    records = metrics.read_metrics(workdir)
    speeds = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    dropped = [r["moe_dropped_fraction"] for r in records if "moe_dropped_fraction" in r]
    return {
        "name": name,
        "params": model.param_count(c.model),
        "active_params": model.param_count(c.model, active=True),
        "flops_per_token": model.flops_per_token(c.model, c.data.seq_len),
        "final_train_loss": summary["final_train_loss"],
        "final_val_loss": summary["final_val_loss"],
        "tokens": summary["tokens_seen"],
        # Median of the logged windows: compilation, evaluation and saving are excluded by the trainer.
        "tokens_per_sec": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "wall_s": summary["wall_time_s"],
        "mean_dropped_fraction": float(np.mean(dropped)) if dropped else None,
        "final_load_balance_loss": records[-1].get("moe_load_balance_loss"),
        "final_expert_load": records[-1].get("moe_expert_load"),
        "records": records,
    }


def interleaved_tokens_per_sec(configs: dict, rounds: int) -> dict:
    """{name: tokens/s} from the median time of each train step, the steps run in turn."""
    steps = {}
    for name, c in configs.items():
        mesh = sharding.make_mesh(c.mesh)
        net = model.Transformer(c.model)
        state, shardings = step_lib.create_train_state(c, net, mesh)
        tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, (c.train.batch_size, c.data.seq_len + 1))
        batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                 "weights": np.ones((c.train.batch_size, c.data.seq_len), np.float32)}
        batch = sharding.shard_batch(batch, mesh, sharding.rules(c.mesh))
        step = step_lib.make_train_step(c, net, mesh, shardings)
        state, out = step(state, batch)  # compiles
        jax.block_until_ready(out)
        steps[name] = [step, state, batch, []]
    for _ in range(rounds):
        for entry in steps.values():
            step, state, batch, times = entry
            start = time.perf_counter()
            entry[1], out = step(state, batch)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
    return {name: configs[name].train.batch_size * configs[name].data.seq_len / float(np.median(times))
            for name, (_, _, _, times) in steps.items()}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [x["step"] for x in r["records"]]
        ax_train.plot(steps, [x["loss"] for x in r["records"]], label=r["name"])
        val = [(x["step"], x["val_loss"]) for x in r["records"] if x.get("val_loss") is not None]
        ax_val.plot(*zip(*val), marker="o", label=r["name"])
    for ax, title in ((ax_train, "train loss (one batch)"), (ax_val, "validation loss")):
        ax.set_xlabel("step (1,024 tokens each)")
        ax.set_ylabel("nats / token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: list[dict], steps: int, load: tuple[float, float], rounds: int) -> str:
    rows = "\n".join(
        f"| {r['name']} | {r['params']:,} | {r['active_params']:,} | {r['flops_per_token'] / 1e6:.2f} | "
        f"{r['tokens']:,} | {r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} | "
        f"{r['tokens_per_sec']:,.0f} | {r['interleaved_tokens_per_sec']:,.0f} | {r['wall_s']:.0f} |"
        for r in results
    )
    router = "\n".join(
        f"| {r['name']} | {r['final_load_balance_loss']:.4f} | "
        f"{', '.join(f'{x:.3f}' for x in r['final_expert_load'])} | {r['mean_dropped_fraction']:.4f} |"
        for r in results if r["final_expert_load"] is not None
    )
    return f"""# MoE vs dense at equal active parameters and equal tokens (measured)

`python -m benchmarks.moe_vs_dense --steps={steps}` on the shared 2-core development CPU
({platform.python_version()}, jax {jax.__version__}, float32, {len(jax.devices())} CPU device), the embedded
corpus (this interpreter's standard library, `data.source=pystdlib`) with a 1,024-token SentencePiece
vocabulary, 128-token rows, 8 rows per step, {steps} steps, cosine schedule (peak 2e-3).
Load average of the machine at start and end: {load[0]:.1f}, {load[1]:.1f} (it is shared: tokens/s
compare within this one run, not with other reports).

Dense: 2 layers, d=64, 4 heads, FFN width 256. MoE: the same with every FFN replaced by 8 experts
of width 128, 2 per token (softmax router, top-2 renormalized, load-balancing loss 0.01, router
z-loss 0.001), so a token uses as many FFN parameters as in the dense model (plus the 512-weight
router per layer). `capacity`: capacity factor 1.25; `dropless`: `jax.lax.ragged_dot`.

| run | params | active params | FLOPs/token (M, train) | tokens | final train loss | final val loss | tokens/s (own run) | tokens/s (interleaved) | wall s |
|---|---|---|---|---|---|---|---|---|---|
{rows}

Router at the last logged step (load-balancing loss, 1.0 for a perfectly even router; share of
token-expert assignments per expert, mean over layers) and the share of assignments the capacity
path dropped, averaged over the logged steps:

| run | load-balancing loss | expert load | dropped (mean) |
|---|---|---|---|
{router}

![loss curves](moe_vs_dense.png)

Validation loss is over 16 batches (16,384 tokens) of the held-out split, the same sample for every
run. tokens/s (own run) is the median over the run's logged windows of 10 steps (compilation,
evaluation and checkpointing excluded), each run at its own time; tokens/s (interleaved) is from the
median of {rounds} timed steps of each model run in turn on one fixed batch after the runs. "wall s"
is each run's whole wall time (tokenizer, compilation, evaluation, checkpoints included). Router statistics per logged step are in `moe_vs_dense.json`
(`moe_load_balance_loss`, `moe_router_z_loss`, `moe_expert_load`, `moe_dropped_fraction`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "moe_vs_dense"))
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per model, interleaved")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    configs = {name: run_config(name, overrides, args.steps) for name, overrides in RUNS.items()}
    results = [run(name, c, args.runs) for name, c in configs.items()]
    speeds = interleaved_tokens_per_sec(configs, args.rounds)
    for r in results:
        r["interleaved_tokens_per_sec"] = speeds[r["name"]]
    load_end = os.getloadavg()[0]
    os.makedirs(args.out, exist_ok=True)
    plot(results, os.path.join(args.out, "moe_vs_dense.png"))
    with open(os.path.join(args.out, "moe_vs_dense.md"), "w") as f:
        f.write(report(results, args.steps, (load_start, load_end), args.rounds))
    with open(os.path.join(args.out, "moe_vs_dense.json"), "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        print(f"{r['name']}: val {r['final_val_loss']:.4f}, train {r['final_train_loss']:.4f}, "
              f"{r['tokens_per_sec']:,.0f} tok/s, {r['interleaved_tokens_per_sec']:,.0f} tok/s interleaved, "
              f"{r['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
