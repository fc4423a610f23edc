"""benchmarks/vs_pytorch.py compares lmjax with nanoGPT on one run: the preset must be that run, and
the data both sides see must be the same ids. None of this needs PyTorch."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.data import sources
from lmjax.data.tokenizers import CharTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "benchmarks", "vs_pytorch.py")

# nanoGPT's config/train_shakespeare_char.py with the README's CPU flags, and its defaults
# (train.py, model.py) that the README run keeps.
NANOGPT_README_CPU = {
    "model.num_layers": 4,  # --n_layer=4
    "model.num_heads": 4,  # --n_head=4
    "model.num_kv_heads": 4,  # multi-head attention
    "model.embed_dim": 128,  # --n_embd=128
    "model.mlp_ratio": 4.0,  # c_fc: n_embd -> 4 * n_embd
    "model.max_len": 64,  # --block_size=64
    "data.seq_len": 64,  # --block_size=64
    "model.use_bias": False,  # bias = False
    "model.tie_embeddings": True,  # wte.weight = lm_head.weight
    "model.mlp": "gelu",  # nn.GELU(): exact
    "model.dropout": 0.0,  # --dropout=0.0
    "model.position": "learned",  # wpe
    "model.norm": "layernorm",
    "model.norm_eps": 1e-5,  # F.layer_norm(..., 1e-5)
    "model.init_std": 0.02,
    "model.dtype": "float32",
    "data.tokenizer": "char",  # shakespeare_char
    "data.text_split": "tail",  # first 90% train, the rest val
    "data.val_fraction": 0.1,
    "train.steps": 2000,  # --max_iters=2000 --lr_decay_iters=2000
    "train.batch_size": 12,  # --batch_size=12
    "train.microbatches": 1,  # gradient_accumulation_steps = 1
    "optim.name": "adamw",
    "optim.lr": 1e-3,  # learning_rate
    "optim.schedule": "cosine",
    "optim.warmup_steps": 100,  # warmup_iters
    "optim.min_lr_ratio": 0.1,  # min_lr = 1e-4
    "optim.b1": 0.9,  # beta1
    "optim.b2": 0.99,  # beta2
    "optim.eps": 1e-8,  # torch.optim.AdamW's default
    "optim.weight_decay": 0.1,  # weight_decay, on every 2-D parameter
    "optim.decay_embeddings": True,  # wte and wpe are 2-D
    "optim.clip": 1.0,  # grad_clip
    "train.z_loss": 0.0,
}


def get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def harness():
    spec = importlib.util.spec_from_file_location("vs_pytorch_under_test", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shakespeare_char_preset_is_nanogpts_readme_cpu_run():
    config = config_lib.load("configs/shakespeare_char.py", {"data.source": "text:/any/input.txt"})
    config_lib.check(config)
    got = {key: get(config, key) for key in NANOGPT_README_CPU}
    assert got == NANOGPT_README_CPU
    mod = harness()
    assert (mod.BLOCK_SIZE, mod.BATCH_SIZE, mod.N_LAYER, mod.N_HEAD, mod.N_EMBD) == (
        config.data.seq_len, config.train.batch_size, config.model.num_layers, config.model.num_heads,
        config.model.embed_dim)
    assert (mod.LEARNING_RATE, mod.BETAS, mod.WEIGHT_DECAY, mod.GRAD_CLIP) == (
        config.optim.lr, (config.optim.b1, config.optim.b2), config.optim.weight_decay, config.optim.clip)


def test_nanogpt_data_written_by_the_harness_has_lmjax_char_ids(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak!\n" * 3 + "Zz?"
    out = harness().write_nanogpt_data(text, str(tmp_path))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)

    tokenizer = CharTokenizer(text)  # lmjax's ids for a corpus of this one text
    lmjax_train, lmjax_val = (sources.tail_split([text], split, 0.1) for split in ("train", "validation"))
    assert train.tolist() == tokenizer.encode("".join(lmjax_train))
    assert val.tolist() == tokenizer.encode("".join(lmjax_val))
    assert len(train) + len(val) == len(text) and len(train) == int(len(text) * 0.9)
    assert meta["vocab_size"] == tokenizer.vocab_size - 1 == len(set(text))  # lmjax adds EOS after them
    assert meta["stoi"] == tokenizer.index and meta["itos"] == dict(enumerate(tokenizer.chars))
    assert np.array_equal(out["train"], train) and np.array_equal(out["val"], val)


def test_val_windows_cover_the_split_once_with_next_char_targets():
    x, y = harness().val_windows(np.arange(200, dtype=np.uint16))
    assert x.shape == y.shape == (3, 64)  # (200 - 1) // 64 whole windows
    assert x.ravel().tolist() == list(range(192)) and y.ravel().tolist() == list(range(1, 193))


@pytest.mark.parametrize("args, expected", [
    (["--data={data}"], "--nanogpt_dir"),
    (["--data={data}", "--nanogpt_dir={tmp}/no_nanogpt"], "is not a nanoGPT checkout"),
])
def test_harness_without_nanogpt_is_one_error_line(tmp_path, args, expected):
    data = tmp_path / "input.txt"
    data.write_text("hello\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("LMJAX_TRACEBACK", None)
    argv = [a.format(data=data, tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, HARNESS, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["input.txt"]


def test_dot_libraries_lists_the_steps_matmuls_at_the_models_sizes():
    """benchmarks/dot_libraries.py times the step's matmuls: their FLOPs against a hand count."""
    spec = importlib.util.spec_from_file_location("dot_libraries_under_test", os.path.join(REPO, "benchmarks", "dot_libraries.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = module.SHAPES["gpt_small"]  # 4 layers, d=192, 6 heads, context 128, batch 32, vocabulary 4,096
    rows = {what: (a, b) for what, a, b in module.step_matmuls(shape)}
    T, D, F, V = 32 * 128, 192, 768, 4096
    fwd = {what: module.flops(a, b) for what, (a, b) in rows.items() if "forward" in what}
    # one layer's q, k, v and out projections, its two MLP matmuls, and the head: 2 FLOPs per multiply-add
    assert 4 * fwd["q/k/v/out: forward, input grad"] + fwd["mlp up: forward; mlp down: input grad"] + \
        fwd["mlp down: forward; mlp up: input grad"] == 2 * T * (4 * D * D + 2 * D * F)
    assert fwd["lm head: forward"] == 2 * T * D * V
    for layer in ("q/k/v/out", "mlp up", "mlp down"):  # a weight gradient costs its forward matmul
        forward = next(f for what, f in fwd.items() if what.startswith(layer + ": forward"))
        assert module.flops(*rows[layer + ": weight grad"]) == forward
    # attention: q k^T and p v over 32 x 6 (row, head) pairs of 128 x 128 logits with 32-wide heads
    assert module.flops(*rows["attention: q k^T, dp"]) == module.flops(*rows["attention: p v, dq, dk, dv"]) == 2 * 32 * 6 * 128 * 128 * 32
