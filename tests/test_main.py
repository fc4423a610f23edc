"""`python -m lmjax.main`: config errors, eval and generate, on a tiny byte-level model.

The subprocess tests run the real command line; the in-process ones reuse one trained workdir.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_PRESET = '''
from lmjax.config import default_config


def get_config():
    c = default_config()
    c.name = "tiny"
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, max_len=64)
    c.data.update(source="text:{corpus}", tokenizer="byte", text_split="tail", val_fraction=0.1,
                  seq_len=32, cache_dir="{cache}")
    c.train.update(steps={steps}, batch_size=4, log_every=1)
    c.optim.update(lr=3e-3, warmup_steps=2)
    c.checkpoint.update(every_steps=4)
    c.eval.update(every_steps={eval_every}, steps=1, num_samples=1, sample_tokens=8)
    return c
'''


STEPS = 40


def write_tiny_preset(directory: str, steps: int = STEPS, eval_every: int = 1) -> str:
    """A preset for a 2-layer d=32 byte-level model on a small text file (part of this repo's code).

    It evaluates and samples at every step by default: that proves evaluation leaves training alone,
    and slows a step down to tens of milliseconds, so that tests can signal a run in mid-flight.
    All tests share this preset, so their runs share compiled programs (JAX_CACHE below).
    """
    corpus = os.path.join(directory, "corpus.txt")
    if not os.path.exists(corpus):
        with open(corpus, "w") as f:
            for name in ("train/trainer.py", "train/checkpointing.py", "train/metrics.py", "config.py"):
                with open(os.path.join(REPO, "lmjax", name)) as src:
                    f.write(src.read())
    path = os.path.join(directory, f"tiny_{steps}_{eval_every}.py")
    with open(path, "w") as f:
        cache = os.path.join(directory, "cache")
        f.write(TINY_PRESET.format(corpus=corpus, cache=cache, steps=steps, eval_every=eval_every))
    return path


def tiny_config(directory: str, **kw) -> config_dict.ConfigDict:
    import runpy

    return runpy.run_path(write_tiny_preset(directory, **kw))["get_config"]()


# Subprocesses of one test session share compiled programs through JAX's persistent cache.
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"lmjax-test-jax-cache-{os.getpid()}")
atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)


def main_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", LMJAX_CPU_PEAK_FLOPS="1e11")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.pop("XLA_FLAGS", None)
    return env


def run_main(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmjax.main", *args], cwd=REPO, env=main_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def read_losses(workdir: str) -> list[tuple[int, float]]:
    from lmjax.train import metrics

    return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)]


# --- errors: clear message, non-zero exit, nothing written ---------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.train.nope=1", ["config.train.nope", "steps", "batch_size"]),
        ("--config.nosection.x=1", ["config.nosection", "model", "train"]),
        ("--config.model.position=foo", ["model.position", "'foo'", "rope", "alibi"]),
        ("--config.train.steps=-5", ["train.steps", "-5", ">= 1"]),
        ("--config.model.vocab_size=100", ["model.vocab_size=100", "259"]),
    ],
)
def test_bad_config_fails_clearly_and_writes_nothing(tmp_path, override, expected):
    preset = write_tiny_preset(str(tmp_path))
    workdir = tmp_path / "run"
    result = run_main(f"--config={preset}", f"--workdir={workdir}", override)
    assert result.returncode != 0
    for piece in expected:
        assert piece in result.stderr, (piece, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not workdir.exists()


@pytest.mark.parametrize("mode", ["eval", "generate"])
def test_eval_and_generate_need_a_checkpoint(tmp_path, mode):
    preset = write_tiny_preset(str(tmp_path))
    workdir = tmp_path / "run"
    result = run_main(f"--config={preset}", f"--workdir={workdir}", f"--mode={mode}", "--prompt=def ")
    assert result.returncode != 0
    assert "no checkpoint" in result.stderr and str(workdir) in result.stderr
    assert not workdir.exists()


# --- one trained workdir for eval and generate ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(preset path, workdir, config, stdout) of a finished tiny run."""
    directory = str(tmp_path_factory.mktemp("trained"))
    preset = write_tiny_preset(directory)
    workdir = os.path.join(directory, "run")
    result = run_main(f"--config={preset}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return preset, workdir, tiny_config(directory), result.stdout


@pytest.mark.slow
def test_train_writes_metrics_summary_and_prints_baseline(trained):
    _, workdir, _, stdout = trained
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "val_loss", "val_ppl", "val_bpb"):
        assert key in records[-1]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    for key in ("name", "param_count", "non_embedding_params", "tokens_seen", "train_flops", "final_train_loss",
                "final_val_loss", "wall_time_s", "steps", "completed", "config"):
        assert key in summary
    assert summary["completed"] and summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 4 * 32
    assert summary["final_val_loss"] < records[0]["val_loss"] and summary["unigram_entropy"] > 0
    assert "unigram baseline" in stdout and "final val loss" in stdout and "sample:" in stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))


@pytest.mark.slow
def test_eval_mode_prints_loss_and_perplexity(trained):
    preset, workdir, _, _ = trained
    result = run_main(f"--config={preset}", f"--workdir={workdir}", "--mode=eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val loss" in result.stdout and "val ppl" in result.stdout
    reported = float(result.stdout.split("val loss")[1].split()[0])
    final = json.load(open(os.path.join(workdir, "summary.json")))["final_val_loss"]
    assert reported == pytest.approx(final, abs=1e-4)


@pytest.mark.slow
def test_generate_with_a_fixed_seed_is_reproducible(trained):
    from lmjax.infer import sampling

    preset, workdir, config, _ = trained
    args = dict(max_new_tokens=12, temperature=1.0, top_k=20, seed=7)
    first = sampling.generate_text(config, workdir, ["def ", "import os\n"], **args)
    assert first == sampling.generate_text(config, workdir, ["def ", "import os\n"], **args)
    assert first != sampling.generate_text(config, workdir, ["def ", "import os\n"], **{**args, "seed": 8})
    result = run_main(f"--config={preset}", f"--workdir={workdir}", "--mode=generate", "--prompt=def ",
                      "--prompt=import os\n", "--max_new_tokens=12", "--temperature=1.0", "--top_k=20", "--seed=7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "def " + first[0] in result.stdout and "import os\n" + first[1] in result.stdout


@pytest.mark.slow
def test_quantized_eval_and_generate_save_the_int8_weights_once(trained):
    from lmjax.infer import sampling

    preset, workdir, config, _ = trained
    result = run_main(f"--config={preset}", f"--workdir={workdir}", "--mode=eval", "--quantize=int8")
    assert result.returncode == 0, result.stderr[-3000:]
    reported = float(result.stdout.split("val loss")[1].split()[0])
    final = json.load(open(os.path.join(workdir, "summary.json")))["final_val_loss"]
    assert reported == pytest.approx(final, rel=0.02) and reported != final
    saved = os.path.join(workdir, "quantized", "int8", str(STEPS))
    assert os.path.isdir(saved)
    mtime = os.path.getmtime(saved)
    args = dict(max_new_tokens=8, temperature=0.0)
    texts = sampling.generate_text(config, workdir, ["def "], quantize="int8", **args)
    assert len(texts) == 1 and os.path.getmtime(saved) == mtime  # read back, not quantized again


@pytest.mark.slow
def test_speculative_generate_with_the_run_as_its_own_draft(trained):
    from lmjax.infer import sampling, speculative

    _, workdir, config, _ = trained
    texts, stats = speculative.generate_text(config, workdir, config, workdir, ["def "], 8, gamma=3, temperature=0.0)
    assert texts == sampling.generate_text(config, workdir, ["def "], max_new_tokens=8, temperature=0.0)
    assert stats.acceptance_rate == 1.0 and stats.passes == 2  # 7 tokens after the first, 4 per pass


@pytest.mark.slow
def test_greedy_generation_is_argmax_of_the_full_forward(trained):
    from lmjax import model
    from lmjax.train.workdir import Setup

    _, workdir, config, _ = trained
    setup = Setup(config, workdir)
    params = setup.restore(read_only=True).state.params
    prompt = [setup.tokenizer.eos_id] + setup.tokenizer.encode("def f(x):\n")
    new = model.generate(setup.config.model, params, [prompt], 10, temperature=0.0)[0]

    # One fixed-length buffer: causal attention makes the zeros after position t irrelevant to t.
    forward = jax.jit(lambda tokens: model.Transformer(setup.config.model).apply({"params": params}, tokens))
    tokens = np.zeros((1, len(prompt) + 10), np.int32)
    tokens[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + 10):
        tokens[0, t] = int(jnp.argmax(forward(tokens)[0, t - 1]))
    assert new == tokens[0, len(prompt):].tolist()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    preset = write_tiny_preset(str(tmp_path))
    workdir = tmp_path / "run"
    result = run_main(f"--config={preset}", f"--workdir={workdir}", "--config.optim.lr=1e30",
                      "--config.optim.warmup_steps=0", "--config.checkpoint.every_steps=1")
    assert result.returncode == 1
    assert "NaN/inf" in result.stderr and "last good checkpoint is step 1" in result.stderr, result.stderr[-2000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]


@pytest.mark.slow
def test_a_sample_longer_than_the_context_is_cut_before_training_not_after(tmp_path):
    preset = write_tiny_preset(str(tmp_path), steps=2)
    result = run_main(f"--config={preset}", f"--workdir={tmp_path / 'run'}", "--config.model.max_len=40",
                      "--config.eval.sample_tokens=96")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    warning = out.index("warning: logged samples cut to 35 tokens")  # 40 positions - EOS - "def "
    assert warning < out.index("first step") and "sample:" in out


@pytest.mark.slow
def test_eval_steps_zero_trains_without_validation(tmp_path):
    preset = write_tiny_preset(str(tmp_path), steps=2)
    workdir = tmp_path / "run"
    result = run_main(f"--config={preset}", f"--workdir={workdir}", "--config.eval.steps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and not any("val_loss" in r for r in records)
    summary = json.load(open(workdir / "summary.json"))
    assert summary["completed"] and summary["final_val_loss"] is None and "final val loss" not in result.stdout
