"""Chinchilla approach 2 on a laptop: 3 compute budgets x 4-5 model sizes on the embedded pystdlib corpus.

  python -m launch.sweep --sweep=configs/sweeps/cpu_isoflop.py --backend=local --parallel=2
  python -m launch.analyze --sweep_dir=runs/cpu_isoflop --isoflop_window=3 --bootstrap=200

A demo, not a test (its wall time and results are in the README). Choices, each
forced by something measured on the first versions of this sweep:
- N counts every parameter (Hoffmann et al.), not the non-embedding ones (Kaplan et al.): at these
  sizes the 1,024 x d tied embedding / LM head is half the model and most of its compute, so with
  non-embedding N the smallest models got several times the FLOPs their C said, and won.
- Depth is fixed at 2 layers and only the width scales (8..96): the aspect-ratio rule alternates
  between one and two layers below ~100K parameters, and one-layer models (no induction heads) lie on
  a different, jagged curve.
- Batch 8 x 128 tokens: the largest model of each budget still gets 436 or more steps, and these
  small steps run faster per token on a CPU than batch 16.
- `--isoflop_window=3` fits each parabola to the lowest-loss size and its neighbours: far from the
  optimum the profiles flatten (under-trained large models) and stop being parabolas in log N.
"""

from lmjax import config
from lmjax.scaling import sweeps

BASE = "configs/gpt_small.py"
COMMON = {
    "data.vocab_size": 1024,  # small vocabulary: a cheap LM head for tiny models
    "data.seq_len": 128,
    "train.batch_size": 8,  # 1,024 tokens per step
    "train.log_every": 100,
    "optim.lr": 2e-3,  # tiny models train well at a high peak lr
    "eval.steps": -1,  # the whole validation split, once at the end: no sampling noise between sizes
    "eval.every_steps": 1_000_000,  # evaluate once, at the end
    "eval.num_samples": 0,
    "checkpoint.every_steps": 1000,
}
BUDGETS = (3e11, 1e12, 3e12)
# Total parameters of 2-layer models of width 8, 16, 24, 32, 48, 64, 96 (head_dim 8, vocab 1,024).
SIZES = {
    3e11: (11e3, 25e3, 42e3, 62e3, 110e3),
    1e12: (25e3, 42e3, 62e3, 110e3, 170e3),
    3e12: (62e3, 110e3, 170e3, 330e3),
}
OPTIONS = sweeps.RunOptions(num_layers=2, head_dim=8, count="total", min_steps=50)


def get_sweep() -> sweeps.Sweep:
    base = config.load(BASE, COMMON)
    return sweeps.Sweep("cpu_isoflop", BASE, sweeps.isoflop(base, BUDGETS, SIZES, OPTIONS), COMMON)
