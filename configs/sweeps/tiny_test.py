"""Two tiny runs of a few steps each: the local launcher's end-to-end test, not a scaling study."""

from lmjax import config
from lmjax.scaling import sweeps

BASE = "configs/gpt_small.py"
COMMON = {
    "data.source": "text:lmjax/*.py",  # ~100 KB of our own code: quicker to load than the stdlib corpus
    "data.text_split": "tail",  # the last 5% of it is the validation split
    "data.tokenizer": "byte",  # no tokenizer to train
    "data.seq_len": 32,
    "model.max_len": 32,
    "train.batch_size": 4,
    "train.log_every": 2,
    "eval.steps": 1,
    "eval.every_steps": 1000,  # evaluate once, at the end
    "eval.num_samples": 0,
    "checkpoint.every_steps": 2,
}


def get_sweep() -> sweeps.Sweep:
    base = config.load(BASE, COMMON)
    opts = sweeps.RunOptions(aspect_ratio=16, head_dim=16, min_steps=2)
    runs = sweeps.kaplan(base, sizes=[12e3, 40e3], tokens=4 * 4 * 32, opts=opts)
    return sweeps.Sweep("tiny_test", BASE, runs, COMMON)
