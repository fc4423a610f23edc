"""How fast is the data pipeline, and what does it cost once?

    python benchmarks/data_pipeline.py [--config=configs/gpt_small.py] [--batches=500]

Prints (1) the one-time costs in a fresh cache directory: SentencePiece training and tokenizing
each split, with corpus size and token counts; (2) the steady-state tokens/s of `next(pipeline)`
at the preset's batch shape, after those caches exist. (2) is what a training step waits for, so
it should be far above the trainer's tokens/s.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lmjax import cli  # noqa: E402
from lmjax import config as config_lib  # noqa: E402
from lmjax.data import build_tokenizer, make_pipeline, sources  # noqa: E402
from lmjax.data.pipeline import tokenize_split  # noqa: E402

_DEFAULT = "configs/gpt_small.py"
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Preset (default {_DEFAULT} if present).")
_BATCHES = flags.DEFINE_integer("batches", 500, "Batches to time.")


def main(argv) -> None:
    del argv
    cli.run(lambda: measure(_CONFIG.value or config_lib.load(_DEFAULT)))


def measure(config) -> None:
    data_cfg = config.data
    with tempfile.TemporaryDirectory() as cache:
        data_cfg.cache_dir = cache
        print(f"source: {sources.describe(data_cfg)}  tokenizer: {data_cfg.tokenizer} "
              f"vocab {data_cfg.vocab_size}  seq_len {data_cfg.seq_len}  "
              f"batch {config.train.batch_size}  packing {data_cfg.packing}")

        start = time.perf_counter()
        tokenizer = build_tokenizer(data_cfg)
        print(f"one-time: tokenizer training {time.perf_counter() - start:.2f}s "
              f"(reading the source included; vocab {tokenizer.vocab_size})")
        for split in sources.SPLITS:
            start = time.perf_counter()
            data = tokenize_split(data_cfg, split, tokenizer)
            seconds = time.perf_counter() - start
            docs = len(data["doc_ends"])
            print(f"one-time: tokenizing {split}: {seconds:.2f}s for {docs} docs, "
                  f"{int(data['num_bytes']) / 1e6:.2f} MB -> {len(data['tokens'])} tokens "
                  f"({int(data['num_bytes']) / len(data['tokens']):.3f} bytes/token)")

        start = time.perf_counter()
        pipeline = make_pipeline(data_cfg, tokenizer, "train", config.train.batch_size)
        print(f"make_pipeline from the caches: {time.perf_counter() - start:.3f}s")
        next(pipeline)
        tokens = 0
        start = time.perf_counter()
        for _ in range(_BATCHES.value):
            tokens += next(pipeline)["inputs"].size
        seconds = time.perf_counter() - start
        print(f"pipeline: {_BATCHES.value} batches of {config.train.batch_size}x{data_cfg.seq_len} "
              f"in {seconds:.3f}s = {tokens / seconds:,.0f} tokens/s "
              f"({seconds / _BATCHES.value * 1e6:.0f} us/batch)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
