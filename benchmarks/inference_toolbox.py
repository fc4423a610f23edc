"""What int8 / int4 weights, speculative decoding, early exit, distillation and pruning buy and cost,
side by side on one trained model.

    python -m benchmarks.inference_toolbox --workdir=runs/toolbox   (from the repo root)

Trains (or resumes) a target with the shape of configs/gpt_small.py and a 1-layer d=64 draft on the
embedded corpus with the same tokenizer, then measures on the same fixed validation sample and the
same prompts: validation loss and bits/byte, parameter bytes, greedy decode tokens/s at batch 1 and
16 for float, int8 and int4 weights; speculative decoding's acceptance rate alpha, target forward
passes per token, tokens per verify pass expected from alpha against measured, and wall-clock
speedup over the target alone; early exit (the target's shape trained with exit losses): each exit's
loss, loss against mean layers used per threshold, decode speed and exit rate; distillation (a student
of the draft's shape trained on the target's soft targets, against the draft trained on the same
tokens alone); pruning (magnitude, Wanda, 2:4, heads) one-shot across sparsities and after a short
recovery fine-tune. Timings exclude compilation (best of --repeats).
Prints and writes benchmarks/results/inference_toolbox.md, which opens with one summary table (a row per
method: validation loss, parameter bytes, tokens/s at batch 1 and 16, the method's own figure).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax

from lmjax import cli
from lmjax import config as config_lib
from lmjax.infer import quantization as run_quant
from lmjax.infer import early_exit as exit_decoding
from lmjax.infer import sampling
from lmjax.infer.speculative import speculative_generate
from lmjax.model import generate, param_count
from lmjax.model import quantization as quant
from lmjax.train import pruning, trainer, validation
from lmjax.train import step as step_lib
from lmjax.train import workdir as workdir_lib

PROMPTS = ["def ", "import os\n", "class ", "    for i in range(", "# Copyright", "if __name__ ==",
           "    return ", "from typing import", "try:\n    ", "@property\ndef ", "while True:\n", "with open(",
           "raise ValueError(", "    def __init__(self", "lambda x: ", "print("]


def run_configs(steps: int, draft_steps: int):
    target = config_lib.load("configs/gpt_small.py")
    target.train.steps, target.train.batch_size = steps, 16
    target.optim.warmup_steps = max(1, steps // 10)
    target.checkpoint.every_steps = target.eval.every_steps = steps
    target.eval.num_samples = 0
    draft = config_lib.load("configs/gpt_small.py")
    draft.name = "gpt_small_draft"
    draft.model.update(num_layers=1, embed_dim=64, num_heads=2, num_kv_heads=2)
    draft.train.steps, draft.train.batch_size = draft_steps, 16
    draft.optim.warmup_steps = max(1, draft_steps // 10)
    draft.checkpoint.every_steps = draft.eval.every_steps = draft_steps
    draft.eval.num_samples = 0
    return target, draft


EXITS = (1, 2, 3)
THRESHOLDS = (0.9, 0.6, 0.3)
PRUNE_ONE_SHOT = (("magnitude", 0.25), ("magnitude", 0.5), ("magnitude", 0.75), ("wanda", 0.25), ("wanda", 0.5),
                  ("wanda", 0.75), ("2:4", 0.5), ("heads", 0.25), ("heads", 0.5))
PRUNE_FINETUNED = (("wanda", 0.5), ("2:4", 0.5))


def compression_configs(args, target, draft, workdir: str) -> dict:
    """The runs early exit, distillation and pruning train: {name: (config, workdir)}."""
    runs = {}
    early = target.copy_and_resolve_references()
    early.name = "gpt_small_early_exit"
    early.train.early_exit_layers = EXITS
    runs["early_exit"] = (early, os.path.join(workdir, "early_exit"))
    student = draft.copy_and_resolve_references()
    student.name = "gpt_small_student"
    student.distill.update(teacher_workdir=os.path.join(workdir, "target"), temperature=args.distill_temperature,
                           alpha=args.distill_alpha)
    runs["student"] = (student, os.path.join(workdir, "student"))
    for method, sparsity in PRUNE_FINETUNED:
        tuned = target.copy_and_resolve_references()
        tuned.name = f"gpt_small_pruned_{method}"
        tuned.prune.update(from_workdir=os.path.join(workdir, "target"), method=method, sparsity=sparsity)
        tuned.train.steps = tuned.checkpoint.every_steps = tuned.eval.every_steps = args.finetune_steps
        tuned.optim.update(lr=args.finetune_lr, warmup_steps=max(1, args.finetune_steps // 10))
        runs[f"pruned_{method}"] = (tuned, os.path.join(workdir, f"pruned_{method.replace(':', 'of')}"))
    return runs


def race(fns: dict, repeats: int) -> dict:
    """Best wall-clock seconds of each function, compiled first, then timed in turns: on a shared
    machine a load swing then hits every variant alike instead of whichever ran during it."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def measure(args: argparse.Namespace) -> str:
    target_config, draft_config = run_configs(args.steps, args.draft_steps)
    target_dir, draft_dir = os.path.join(args.workdir, "target"), os.path.join(args.workdir, "draft")
    runs = compression_configs(args, target_config, draft_config, args.workdir)
    start = time.perf_counter()
    for config, workdir in ((target_config, target_dir), (draft_config, draft_dir), *runs.values()):
        trainer.train(config, workdir)
    train_s = time.perf_counter() - start

    setup = workdir_lib.Setup(target_config, target_dir)
    restored = setup.restore(read_only=True)
    params, tokenizer = restored.state.params, setup.tokenizer
    draft_setup = workdir_lib.Setup(draft_config, draft_dir)
    draft_params = draft_setup.restore(read_only=True).state.params
    target_cfg, draft_cfg = setup.config.model, draft_setup.config.model
    prompts = [sampling.prompt_ids(tokenizer, p) for p in PROMPTS]
    one, new = prompts[:1], args.new_tokens

    rows, timed = [], {}
    for mode in quant.MODES:
        if mode == "none":
            mode_params, mode_cfg = params, target_cfg
        else:
            mode_params = run_quant.load_or_quantize(setup, restored.step, params, mode)
            mode_cfg = quant.with_quantization(target_cfg, mode)
        figures = run_quant.evaluate_params(setup, mode_params, mode_cfg)
        name = "float32" if mode == "none" else mode
        rows.append({"mode": name, "bytes": quant.param_bytes(mode_params), **figures,
                     "nonzero": nonzero_params(params)})
        for batch in (1, 16):
            timed[(name, batch)] = functools.partial(
                generate, mode_cfg, mode_params, prompts[:batch], new, temperature=0
            )
    timed["draft"] = functools.partial(generate, draft_cfg, draft_params, one, new, temperature=0)

    target_greedy = generate(target_cfg, params, prompts, new, temperature=0)
    spec_rows = []
    for temperature in (0.0, 1.0):
        for gamma in args.gammas:
            speculate = functools.partial(
                speculative_generate, target_cfg, params, draft_cfg, draft_params, max_new_tokens=new,
                gamma=gamma, temperature=temperature, rng=jax.random.key(0),
            )
            timed[(temperature, gamma)] = functools.partial(speculate, one)
            timed[(temperature, gamma, 16)] = functools.partial(speculate, prompts[:16])
            # Acceptance pooled over all prompts in one batch (each row's counts are its own).
            out, stats = speculate(prompts)
            spec_rows.append({"temperature": temperature, "gamma": gamma, "stats": stats,
                              "one_row": speculate(one)[1],
                              "same_as_target": (out == target_greedy) if temperature == 0 else None})

    compressed = measure_compression(args, setup, params, runs, prompts, timed)
    seconds = race(timed, args.repeats)
    for r in rows:
        r["tok_s_1"], r["tok_s_16"] = new / seconds[(r["mode"], 1)], 16 * new / seconds[(r["mode"], 16)]
    for r in spec_rows:
        r["seconds"] = seconds[(r["temperature"], r["gamma"])]
        r["seconds_16"] = seconds[(r["temperature"], r["gamma"], 16)]
    draft_figures = run_quant.evaluate_params(draft_setup, draft_params, draft_cfg)
    draft_figures["bytes"] = quant.param_bytes(draft_params)
    summary = summary_table(args, rows, draft_figures, spec_rows, compressed, seconds)
    text = report(args, setup, draft_setup, rows, draft_figures, spec_rows, seconds[("float32", 1)],
                  seconds["draft"], train_s, summary)
    return text + compression_report(args, rows, draft_figures, compressed, seconds)


def summary_table(args, rows, draft_figures, spec_rows, c, seconds) -> str:
    """One row per method, from the measurements the sections below detail: what it costs in validation
    loss, what it saves in bytes or time, and its own figure."""
    new, base = args.new_tokens, rows[0]

    def tok_s(*key) -> str:
        return f"{key[-1] * new / seconds[key]:,.0f}"

    lines = [
        "## Summary",
        "",
        "Each method against the float32 target (early exit: the target's shape trained with exit losses; "
        f"student: 1 layer, d=64). Tokens/s: {new} new tokens per row, greedy decode except speculative "
        "decoding's row, its fastest setting at batch 1. Parameter bytes: as stored (pruned zeros are stored "
        "dense; speculative decoding holds the target and the draft). Details in the sections below.",
        "",
        "| method | val loss | param bytes | tok/s batch 1 | batch 16 | its own figure |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        figure = "" if r is base else f"{r['bytes'] / base['bytes']:.2f}x the float32 bytes"
        lines.append(f"| {r['mode']} weights | {r['val_loss']:.4f} | {r['bytes']:,} | {r['tok_s_1']:,.0f} | "
                     f"{r['tok_s_16']:,.0f} | {figure} |")
    spec = min(spec_rows, key=lambda r: r["seconds"])
    sampling_name = "greedy" if spec["temperature"] == 0 else f"T={spec['temperature']:g}"
    lines.append(f"| speculative ({sampling_name}, gamma {spec['gamma']}) | {base['val_loss']:.4f} (the target's "
                 f"distribution) | {base['bytes'] + draft_figures['bytes']:,} | {new / spec['seconds']:,.0f} | "
                 f"{16 * new / spec['seconds_16']:,.0f} | alpha {spec['stats'].acceptance_rate:.3f}, "
                 f"{spec['stats'].tokens_per_pass:.2f} tokens per target pass |")
    full_layers = max(c["exits"]["exit_loss"])
    threshold, (loss, layers) = min(c["exits"]["threshold"].items(), key=lambda item: item[1][1])
    lines.append(f"| early exit (threshold {threshold:g}) | {loss:.4f} | {c['early_bytes']:,} | "
                 f"{tok_s('exit', threshold, 1)} | {tok_s('exit', threshold, 16)} | {layers:.2f} of "
                 f"{full_layers} layers used (val) |")
    lines.append(f"| distilled student | {c['student']['val_loss']:.4f} | {c['student']['bytes']:,} | "
                 f"{tok_s('student', 1)} | {tok_s('student', 16)} | {draft_figures['val_loss']:.4f} trained "
                 "without the teacher |")
    method, sparsity = PRUNE_FINETUNED[0]
    shot = next(r for r in c["one_shot"] if (r["method"], r["sparsity"]) == (method, sparsity))
    tuned = next(r for r in c["finetuned"] if (r["method"], r["sparsity"]) == (method, sparsity))
    lines.append(f"| pruned ({method}, one-shot) | {shot['val_loss']:.4f} | {c['pruned_bytes']:,} | "
                 f"{tok_s('pruned', 1)} | {tok_s('pruned', 16)} | sparsity {shot['zeros']:.3f} "
                 f"({tuned['val_loss']:.4f} after fine-tune) |")
    return "\n".join(lines + [""])


def report(args, setup, draft_setup, rows, draft_figures, spec_rows, target_s, draft_s, train_s, summary) -> str:
    new = args.new_tokens
    lines = [
        "# Inference toolbox: quantization, speculative decoding, early exit, distillation, pruning on one trained model",
        "",
        f"`python -m benchmarks.inference_toolbox --workdir={args.workdir} --steps={args.steps} "
        f"--draft_steps={args.draft_steps} --finetune_steps={args.finetune_steps} --repeats={args.repeats}` on {platform.machine()} CPU ({os.cpu_count()} cores, shared with "
        f"other jobs: load average {os.getloadavg()[0]:.1f} at the end), jax {jax.__version__}, float32 "
        f"compute. Target: configs/gpt_small.py shape ({param_count(setup.config.model):,} params) trained "
        f"{args.steps} steps of 16 x 128 tokens on `pystdlib`; draft: 1 layer, d=64 "
        f"({param_count(draft_setup.config.model):,} params), {args.draft_steps} steps, same tokenizer "
        f"(training both: {train_s:.0f} s this call; a second call resumes the finished runs). Every timing "
        f"is the best of {args.repeats}, compilation excluded, all variants timed in turns.",
        "",
        summary,
        "## Weight-only quantization (qwix PTQ)",
        "",
        f"Validation: the run's fixed sample ({rows[0]['val_tokens']:,} tokens). Decode: greedy, "
        f"{new} new tokens, KV cache, one jitted scan.",
        "",
        "| weights | val loss (nats/token) | bits/byte | param bytes | vs float32 | decode tok/s, batch 1 | batch 16 |",
        "|---|---|---|---|---|---|---|",
    ]
    base = rows[0]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['bytes']:,} | "
                     f"{r['bytes'] / base['bytes']:.2f}x | {r['tok_s_1']:,.0f} | {r['tok_s_16']:,.0f} |")
    speed = ", ".join(f"{r['mode']} {r['tok_s_1'] / base['tok_s_1']:.2f}x (batch 1), "
                      f"{r['tok_s_16'] / base['tok_s_16']:.2f}x (batch 16)" for r in rows[1:])
    lines += [
        "",
        "int8 is one float32 scale per output channel; int4 one per output channel and group of 32 input "
        "features (the attention output projection: per channel). The tied token embedding (also the LM "
        "head) is a lookup table, not a matmul, and stays float32: it is "
        f"{setup.config.model.vocab_size * setup.config.model.embed_dim * 4:,} of the float model's bytes, "
        "which is why the totals shrink by less than 4x and 8x.",
        "",
        f"Decode speed relative to float32: {speed}. qwix's weight-only path keeps activations in float32 "
        "and converts each int weight to float32 (then applies the scales) inside every matmul: the "
        "compiled decode step holds a `convert_element_type` of the whole weight before each float32 "
        "`dot_general`, since XLA's CPU backend has no mixed int8 x float32 matmul. So on CPU quantized "
        "weights save memory, not time: each step still runs the float32 matmul, plus the conversion, "
        "and a model this small sits in the CPU's caches, so the weight bytes saved are not what bounds "
        "its step. Differences of a few tens of percent between rows are within this shared machine's "
        "noise. The speed-up quantization is for is memory-bound decoding of large models on "
        "accelerators, with kernels that read the narrow weights directly.",
        "",
        "## Speculative decoding",
        "",
        f"Draft alone: val loss {draft_figures['val_loss']:.4f} (target {base['val_loss']:.4f}). One row, {new} new "
        f"tokens: target alone {target_s * 1e3:.0f} ms ({target_s / new * 1e3:.2f} ms per token), draft alone "
        f"{draft_s * 1e3:.0f} ms. alpha, forwards and tokens per pass are pooled over {len(PROMPTS)} prompts "
        "(one batch; each row's counts are its own); time and cost per pass are the first prompt's. "
        "Expected tokens per pass: (1 - alpha^(gamma+1)) / (1 - alpha).",
        "",
        "| sampling | gamma | alpha | target forwards / token | tokens / pass: expected | measured | "
        "time (ms) | pass cost (target steps) | speedup vs target | = target greedy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def pass_cost(r):
        """One verify pass (draft steps included) in plain target decode steps, on the first prompt."""
        return r["seconds"] / max(r["one_row"].passes, 1) / (target_s / new)

    for r in spec_rows:
        s = r["stats"]
        sampling_name = "greedy" if r["temperature"] == 0 else f"T={r['temperature']:g}"
        same = "" if r["same_as_target"] is None else ("yes" if r["same_as_target"] else "NO")
        lines.append(f"| {sampling_name} | {r['gamma']} | {s.acceptance_rate:.3f} | {s.target_forwards_per_token:.3f} | "
                     f"{s.expected_tokens_per_pass:.2f} | {s.tokens_per_pass:.2f} | {r['seconds'] * 1e3:.0f} | "
                     f"{pass_cost(r):.2f} | {target_s / r['seconds']:.2f}x | {same} |")
    gap = max(abs(r["stats"].tokens_per_pass - r["stats"].expected_tokens_per_pass) for r in spec_rows)
    costs = [pass_cost(r) for r in spec_rows]
    yields = [r["stats"].tokens_per_pass for r in spec_rows]
    lines += [
        "",
        f"Measured tokens per pass are within {gap:.2f} of the expectation from alpha alone (which assumes "
        "every draft token is accepted independently with one probability). The wall-clock speedup is "
        "tokens per pass divided by what a pass costs in plain target decode steps (gamma draft steps, "
        "one target pass over gamma + 1 tokens, the acceptance test, measured as the run's time over its "
        f"passes). Here a pass costs {min(costs):.1f} to {max(costs):.1f} target steps and yields "
        f"{min(yields):.1f} to {max(yields):.1f} tokens"
        + (", so speculative decoding is slower than the target alone on this CPU: with a 2.6M-parameter "
           "target a decode step is so cheap that the draft's steps and a pass over gamma + 1 tokens are "
           "not small beside it. " if max(target_s / r["seconds"] for r in spec_rows) < 1 else ". ")
        + "It wins when a pass costs fewer target steps than the tokens it yields: a draft much cheaper "
        "than the target, and a target whose pass over a few tokens costs about one step (memory-bound "
        "decoding of a large model on an accelerator).",
        "",
    ]
    return "\n".join(lines)


def measure_compression(args, setup, params, runs, prompts, timed) -> dict:
    """Early exit, distillation and pruning figures; adds their decode calls to `timed`."""
    new, out = args.new_tokens, {}
    early_config, early_dir = runs["early_exit"]
    early_setup = workdir_lib.Setup(early_config, early_dir)
    early_params = early_setup.restore(read_only=True).state.params
    out["exits"] = exit_decoding.evaluate_exits(early_setup, early_params, EXITS, THRESHOLDS)
    out["early_bytes"] = quant.param_bytes(early_params)
    early_cfg = early_setup.config.model
    out["exit_stats"] = {}
    for t in THRESHOLDS:
        for batch in (1, 16):
            timed[("exit", t, batch)] = functools.partial(
                exit_decoding.generate, early_cfg, early_params, prompts[:batch], new, EXITS, t)
        out["exit_stats"][t] = exit_decoding.generate(early_cfg, early_params, prompts, new, EXITS, t)[1]
    for batch in (1, 16):
        timed[("early_full", batch)] = functools.partial(generate, early_cfg, early_params, prompts[:batch], new,
                                                         temperature=0)

    student_config, student_dir = runs["student"]
    student_setup = workdir_lib.Setup(student_config, student_dir)
    student_params = student_setup.restore(read_only=True).state.params
    out["student"] = run_quant.evaluate_params(student_setup, student_params, student_setup.config.model)
    out["student"]["bytes"] = quant.param_bytes(student_params)
    for batch in (1, 16):
        timed[("student", batch)] = functools.partial(generate, student_setup.config.model, student_params,
                                                      prompts[:batch], new, temperature=0)

    eval_step = step_lib.make_eval_step(setup.config, setup.model, setup.mesh, setup.state_shardings)
    val_set = validation.ValidationSet(setup.config, setup.tokenizer)

    def val_loss(p):
        return validation.evaluate_params(eval_step, p, val_set, setup.mesh, setup.rules)["val_loss"]

    out["one_shot"] = []
    for method, sparsity in PRUNE_ONE_SHOT:
        config = setup.config.copy_and_resolve_references()
        config.prune.update(method=method, sparsity=sparsity)
        pruned, _ = pruning.prune(config, setup.model, params, setup.tokenizer)
        out["one_shot"].append({"method": method, "sparsity": sparsity, "val_loss": val_loss(pruned),
                                "zeros": pruning.sparsity_of(pruned), "nonzero": nonzero_params(pruned)})
        if (method, sparsity) == PRUNE_FINETUNED[0]:
            out["pruned_bytes"] = quant.param_bytes(pruned)
            for batch in (1, 16):
                timed[("pruned", batch)] = functools.partial(generate, setup.config.model, pruned, prompts[:batch],
                                                             new, temperature=0)
    out["finetuned"] = []
    for method, sparsity in PRUNE_FINETUNED:
        config, workdir = runs[f"pruned_{method}"]
        tuned = workdir_lib.Setup(config, workdir).restore(read_only=True).state.params
        out["finetuned"].append({"method": method, "sparsity": sparsity, "val_loss": val_loss(tuned),
                                 "zeros": pruning.sparsity_of(tuned), "nonzero": nonzero_params(tuned)})
    return out


def nonzero_params(params) -> int:
    return int(sum(int(jax.numpy.count_nonzero(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def compression_report(args, rows, draft_figures, c, seconds) -> str:
    new, base = args.new_tokens, rows[0]
    exit_loss, full_layers = c["exits"]["exit_loss"], max(c["exits"]["exit_loss"])

    def tok_s(*key) -> float:
        """Tokens per second of the timed call `key`, whose last element is its batch size."""
        return key[-1] * new / seconds[key]
    lines = [
        "",
        "## Early exit",
        "",
        f"The target's shape trained {args.steps} steps with exits after layers {', '.join(map(str, EXITS))} of "
        f"{full_layers} (`--config.train.early_exit_layers={EXITS}`, LayerSkip-style depth weights, scale 1). Each "
        "exit's validation loss, the full model's against the target trained without exit losses:",
        "",
        "| exit after layer | " + " | ".join(str(l) for l in exit_loss) + " | target (no exit loss) |",
        "|---|" + "---|" * (len(exit_loss) + 1),
        "| val loss | " + " | ".join(f"{v:.4f}" for v in exit_loss.values()) + f" | {base['val_loss']:.4f} |",
        "",
        "Decoding with exits: a token leaves at the first exit whose top probability exceeds the threshold; "
        "the layers it skips get keys/values projected from the exit's hidden state. Val loss: the same rule "
        "teacher-forced on the validation sample (every position's context from the full model). Layers used "
        f"and exit rate: over {len(PROMPTS)} prompts x {new} greedy tokens. Speed: greedy decode, as above.",
        "",
        "| threshold | val loss (rule) | mean layers (val) | mean layers (decode) | exit rate | tok/s batch 1 | batch 16 |",
        "|---|---|---|---|---|---|---|",
        f"| full model | {exit_loss[full_layers]:.4f} | {full_layers} | {full_layers} | 0 | "
        f"{tok_s('early_full', 1):,.0f} | {tok_s('early_full', 16):,.0f} |",
    ]
    for t, (loss, layers) in c["exits"]["threshold"].items():
        stats = c["exit_stats"][t]
        lines.append(f"| {t:g} | {loss:.4f} | {layers:.2f} | {stats.mean_layers:.2f} | {stats.exit_rate:.2f} | "
                     f"{tok_s('exit', t, 1):,.0f} | {tok_s('exit', t, 16):,.0f} |")
    lines += [
        "",
        "A batch skips a layer's attention and MLP only when all of its rows have left (each row's tokens do not "
        "depend on its neighbours), so batch 16 gains less than batch 1. Each exit also costs a pass through "
        "the LM head, and here the head (d x vocab) is larger than a block (12 d^2): with three exits a token "
        "that never leaves pays more than a block per exit, so on this model early exit only pays when most "
        "tokens leave at the first exits, which a model this briefly trained is not confident enough to do.",
        "",
        "## Distillation",
        "",
        f"A student of the draft's shape (1 layer, d=64) trained {args.draft_steps} steps on the target's soft "
        f"targets (`--config.distill.teacher_workdir=... --config.distill.temperature={args.distill_temperature:g} "
        f"--config.distill.alpha={args.distill_alpha:g}`, forward KL), against the same model trained on the same "
        "tokens without a teacher (the draft above):",
        "",
        "| model | val loss | bits/byte | tok/s batch 1 | batch 16 |",
        "|---|---|---|---|---|",
        f"| target (teacher) | {base['val_loss']:.4f} | {base['val_bpb']:.4f} | {base['tok_s_1']:,.0f} | {base['tok_s_16']:,.0f} |",
        f"| student, no teacher (draft) | {draft_figures['val_loss']:.4f} | {draft_figures['val_bpb']:.4f} | | |",
        f"| student, distilled | {c['student']['val_loss']:.4f} | {c['student']['val_bpb']:.4f} | "
        f"{tok_s('student', 1):,.0f} | {tok_s('student', 16):,.0f} |",
        "",
        "## Pruning",
        "",
        "Zeros in every block's attention and MLP kernels (embeddings, norms, biases kept). One-shot: the "
        f"target's weights pruned, no retraining. Fine-tuned: then {args.finetune_steps} steps (lr "
        f"{args.finetune_lr:g}) through the trainer with the mask fixed (`--config.prune.from_workdir=...`).",
        "",
        "| method | sparsity setting | zeros in block kernels | nonzero params | val loss, one-shot | after fine-tune |",
        "|---|---|---|---|---|---|",
        f"| dense | 0 | 0 | {base['nonzero']:,} | {base['val_loss']:.4f} | |",
    ]
    tuned = {(r["method"], r["sparsity"]): r for r in c["finetuned"]}
    for r in c["one_shot"]:
        after = tuned.get((r["method"], r["sparsity"]))
        setting = f"{r['sparsity']:g} of heads" if r["method"] == "heads" else f"{r['sparsity']:g}"
        lines.append(f"| {r['method']} | {setting} | {r['zeros']:.3f} | {r['nonzero']:,} | {r['val_loss']:.4f} | "
                     + (f"{after['val_loss']:.4f} |" if after else "|"))
    method, sparsity = PRUNE_FINETUNED[0]
    lines += [
        "",
        "The fine-tuned rows have trained more steps than the dense target: they show what the mask "
        "costs once the remaining weights adapt, not a comparison at equal compute.",
        "",
        f"Decode speed of the {method} {sparsity:g} weights: {tok_s('pruned', 1):,.0f} tok/s at batch 1, "
        f"{tok_s('pruned', 16):,.0f} at batch 16 (float32: {base['tok_s_1']:,.0f} and {base['tok_s_16']:,.0f}): "
        "the zeros sit in dense matrices, and XLA's CPU matmuls do not skip them. Turning sparsity into speed "
        "needs sparse kernels (2:4 on GPUs with sparse tensor cores) or, for heads, slicing them out of the "
        "weights; neither is done here.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/toolbox")
    parser.add_argument("--steps", type=int, default=200, help="target training steps")
    parser.add_argument("--draft_steps", type=int, default=300)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--finetune_steps", type=int, default=50, help="recovery fine-tune of pruned weights")
    parser.add_argument("--finetune_lr", type=float, default=5e-4)
    parser.add_argument("--distill_temperature", type=float, default=2.0)
    parser.add_argument("--distill_alpha", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/inference_toolbox.md")
    args = parser.parse_args()

    def run() -> None:
        text = measure(args)
        with open(args.out, "w") as f:
            f.write(text)
        print(text)

    cli.run(run)


if __name__ == "__main__":
    main()
