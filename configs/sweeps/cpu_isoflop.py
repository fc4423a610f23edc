"""Chinchilla approach 2 on a laptop: 3 compute budgets x 5 model sizes on the embedded pystdlib corpus.

`python -m launch.sweep --sweep=configs/sweeps/cpu_isoflop.py --backend=local --parallel=2` then
`python -m launch.analyze --sweep_dir=runs/cpu_isoflop`. A demo, not a test: ~35 minutes of
2-core CPU time, mostly the largest budget's small models (the 25K model at C=1e12 reads 6.5M tokens).
C = 6 N D counts non-embedding N; for models this small the 1,024-token LM head and attention cost
as much again. Measured here: at C=1e11 the loss still falls at the smallest size (its optimum lies
below 12K non-embedding parameters), so analyze leaves that profile out of approach 2 and says so;
the larger budgets have their minima inside their sizes.
"""

from lmjax.scaling import sweeps

BASE = "configs/gpt_small.py"
COMMON = {
    "data.vocab_size": 1024,  # small vocabulary: a cheap LM head for tiny models
    "data.seq_len": 128,
    "train.batch_size": 16,  # 2,048 tokens per step
    "train.log_every": 50,
    "optim.lr": 2e-3,  # tiny models train well at a high peak lr
    "eval.steps": 10,
    "eval.every_steps": 1_000_000,  # evaluate once, at the end
    "eval.num_samples": 0,
    "checkpoint.every_steps": 500,
}
BUDGETS = (1e11, 3e11, 1e12)
SIZES = {
    1e11: (12e3, 25e3, 50e3, 100e3, 200e3),
    3e11: (25e3, 50e3, 100e3, 200e3, 400e3),
    1e12: (25e3, 50e3, 100e3, 200e3, 400e3),
}


def get_sweep() -> sweeps.Sweep:
    base = sweeps.load_config(BASE, COMMON)
    runs = sweeps.isoflop(base, BUDGETS, SIZES, sweeps.RunOptions(aspect_ratio=32, head_dim=8, min_steps=20))
    return sweeps.Sweep("cpu_isoflop", BASE, runs, COMMON)
