"""Emergence on a laptop: five 2-layer models (38K..450K parameters) trained on the same synthetic
arithmetic corpus, then asked BIG-bench's arithmetic questions.

  python -m launch.sweep --sweep=configs/sweeps/emergence.py --backend=local
  python -m benchmarks.emergence --sweep_dir=runs/emergence --limit=100

A demo, not a test. Choices:
- The corpus is `arithmetic:` (lmjax/data/arithmetic.py): seeded addition, subtraction and
  multiplication with 1-3 digit operands, in the layout the harness gives BIG-bench prompts, so a
  0-shot BIG-bench question looks like the start of a training document. Division is left out: its
  exact quotients are mostly 1 or the dividend, which a tiny model learns as a shortcut.
- `holdout=0.5`: half of every problem space (by a hash of the question) is never generated, and
  the benchmark asks only BIG-bench questions from that half: without it the 20,000 documents
  (160K problems) hold most 1- and 2-digit BIG-bench questions by chance, and accuracy measures
  memory.
- Byte tokenizer: every digit is one token (a BPE would merge digits differently in every number)
  and no tokenizer is trained.
- Every model sees the same 1.2M tokens (600 steps of 16 x 128), so compute grows with N alone, as
  in the model families emergence was reported on; N counts every parameter, since at these sizes
  the embedding is a large part of the model.
- Depth is fixed at 2 layers, only the width scales (32..128, head_dim 16).
"""

from lmjax import config
from lmjax.scaling import sweeps

BASE = "configs/gpt_small.py"
COMMON = {
    "data.source": "arithmetic:seed=0,digits=3,ops=add+sub+mul,holdout=0.5",
    "data.tokenizer": "byte",
    "model.vocab_size": 259,  # the byte tokenizer's (256 bytes, pad, bos, eos): total N needs it
    "data.seq_len": 128,
    "model.max_len": 128,
    "train.batch_size": 16,  # 2,048 tokens per step
    "train.log_every": 50,
    "optim.lr": 2e-3,
    "eval.steps": 8,  # 16K validation tokens, once at the end
    "eval.every_steps": 1_000_000,
    "eval.num_samples": 0,
    "checkpoint.every_steps": 200,
    "checkpoint.max_to_keep": 1,
}
SIZES = (38e3, 75e3, 125e3, 261e3, 446e3)  # total parameters of widths 32, 48, 64, 96, 128
TOKENS = 600 * 16 * 128
OPTIONS = sweeps.RunOptions(num_layers=2, head_dim=16, count="total", min_steps=20)


def make(name: str, sizes, tokens: float) -> sweeps.Sweep:
    """The sweep at other sizes or token counts (a smoke test runs a smaller one)."""
    base = config.load(BASE, COMMON)
    return sweeps.Sweep(name, BASE, sweeps.kaplan(base, sizes, tokens, OPTIONS), COMMON)


def get_sweep() -> sweeps.Sweep:
    return make("emergence", SIZES, TOKENS)
