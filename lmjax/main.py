"""`python -m lmjax.main --config=configs/gpt_small.py --workdir=DIR [--mode=train|eval|generate]`.

Post-training runs the same way: `--mode=sft|dpo|reward|ppo --config=configs/posttrain/<mode>.py
--init_from=RUN` is `python -m lmjax.posttrain` (lmjax.posttrain.trainer.train).

Parses flags and calls the library; nothing else happens here. Any key of the config can be
overridden on the command line: `--config.train.steps=200 --config.model.position=rope`. Eval and
generate may leave out --config: the run's stored config is used (a run imported with
`lmjax.interop.hf` has no preset file).

Mistakes end the command with one `error:` line and exit code 1 (2 for flag errors) before any
file is written: an unknown config key (with the keys that do exist), a bad value (with the valid
ones), a vocab_size below the tokenizer's, or eval/generate on a workdir with no checkpoint.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax.infer import early_exit, quantization, sampling, speculative
from lmjax.posttrain import config as posttrain_config
from lmjax.posttrain import trainer as posttrainer
from lmjax.train import trainer, validation
from lmjax.train import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Preset file, e.g. configs/gpt_small.py; eval, generate: default the run's stored config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, summary.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate", *posttrain_config.MODES],
                          "Train (or resume), evaluate, sample, or post-train (sft, dpo, reward, ppo).")
_INIT_FROM = flags.DEFINE_string("init_from", None, "sft, dpo, reward, ppo: the run whose newest checkpoint is the "
                                 "starting model.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeat the flag for several).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "generate: a file whose whole text is one prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "generate: tokens to add to each prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "generate: softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: sample among the k likeliest tokens; 0 is all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass; 1.0 is off.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed (same seed, same output).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                              "eval, generate: weight-only quantization of the checkpoint (qwix).")
_DRAFT_CONFIG = config_flags.DEFINE_config_file(
    "draft_config", None, "generate: the draft model's preset, for speculative decoding.", lock_config=True)
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "generate: the draft model's run (same tokenizer).")
_GAMMA = flags.DEFINE_integer("gamma", 4, "generate with a draft: tokens the draft proposes per target pass.")
_EXIT_THRESHOLD = flags.DEFINE_float(
    "exit_threshold", None, "generate: leave at the first early exit (config.train.early_exit_layers) whose top "
    "probability exceeds this; >= 1 never leaves.")
flags.mark_flags_as_required(["workdir"])


def _prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPT_FILE.value:
        with open(_PROMPT_FILE.value) as f:
            prompts.append(f.read())
    if not prompts:
        raise ValueError("--mode=generate needs --prompt (repeatable) or --prompt_file")
    return prompts


def _run() -> None:
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _MODE.value in posttrain_config.MODES:
        if config is None or not _INIT_FROM.value:
            raise ValueError(f"--mode={_MODE.value} needs --config (e.g. configs/posttrain/{_MODE.value}.py) and "
                             "--init_from (the run to post-train)")
        posttrainer.train(_MODE.value, config, _INIT_FROM.value, workdir)
        return
    if _INIT_FROM.value:
        raise ValueError(f"--init_from is for --mode={'|'.join(posttrain_config.MODES)}, not --mode={_MODE.value}")
    if config is None:
        if _MODE.value == "train":
            raise ValueError("--mode=train needs --config (a preset file, e.g. configs/gpt_small.py)")
        config = workdir_lib.saved_config(workdir)
    if _MODE.value == "train":
        trainer.train(config, workdir)
    elif _MODE.value == "eval":
        if _QUANTIZE.value == "none":
            result = validation.evaluate(config, workdir)
        else:
            result = quantization.evaluate(config, workdir, _QUANTIZE.value)
        print(f"step {result['step']}: val loss {result['val_loss']:.4f} | val ppl {result['val_ppl']:.2f} "
              f"| {result['val_bpb']:.4f} bits/byte | {result['val_tokens']:,} tokens")
    elif _EXIT_THRESHOLD.value is not None:  # generate, leaving at early exits
        if _DRAFT_WORKDIR.value or _QUANTIZE.value != "none":
            raise ValueError("--exit_threshold runs the float model alone (no --draft_workdir, no --quantize)")
        prompts = _prompts()
        texts, stats = early_exit.generate_text(
            config, workdir, prompts, _MAX_NEW_TOKENS.value, _EXIT_THRESHOLD.value, temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
        _print_texts(prompts, texts)
        print(f"early exit at {_EXIT_THRESHOLD.value:g}: {stats.exit_rate:.1%} of tokens left early, "
              f"{stats.mean_layers:.2f} of {stats.num_layers} layers per token on average")
    elif _DRAFT_WORKDIR.value:  # generate, speculatively
        if _DRAFT_CONFIG.value is None or _QUANTIZE.value != "none":
            raise ValueError("--draft_workdir needs --draft_config, and runs float weights (no --quantize)")
        prompts = _prompts()
        texts, stats = speculative.generate_text(
            config, workdir, _DRAFT_CONFIG.value, _DRAFT_WORKDIR.value, prompts, _MAX_NEW_TOKENS.value,
            gamma=_GAMMA.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
            seed=_SEED.value,
        )
        _print_texts(prompts, texts)
        print(f"speculative decoding, gamma {stats.gamma}: acceptance {stats.acceptance_rate:.3f}, "
              f"{stats.tokens_per_pass:.2f} tokens per target pass (expected {stats.expected_tokens_per_pass:.2f}), "
              f"{stats.target_forwards_per_token:.3f} target forwards per token")
    else:  # generate
        prompts = _prompts()
        texts = sampling.generate_text(
            config, workdir, prompts, max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, quantize=_QUANTIZE.value,
        )
        _print_texts(prompts, texts)


def _print_texts(prompts: list[str], texts: list[str]) -> None:
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}\n{'=' * 40}")


main = cli.absl_main(_run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
