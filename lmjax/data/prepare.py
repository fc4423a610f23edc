"""`python -m lmjax.data.prepare --config=configs/X.py --out=DIR [--store]`: clean a source once,
or tokenize it once into a token store, and keep it.

With --store: tokenize `data.source` with `data.tokenizer` into a token store at DIR (store.py:
binary shards and an index; resumable, streaming, no cleaning). Train on it with
`--config.data.source=store:DIR`. A cleaned `prepared:<dir>` can itself be stored.

Without --store:

Stages, in order, over the train split followed by the validation split (so dedup also removes
validation documents that copy training ones): quality filters, exact dedup, MinHash/LSH near
dedup. Each stage prints the documents and bytes it removed. Writes to DIR:

  train.jsonl, validation.jsonl   the cleaned documents, {"text": ...} per line
  tokenizer.model                 SentencePiece trained on the cleaned train split (if the config's
                                  tokenizer is sentencepiece; byte/char need no file)
  meta.json                       source description, config, per-stage counts, tokenizer settings

Train on it later with `--config.data.source=prepared:DIR`: the pipeline reads the two jsonl files
and build_tokenizer loads DIR/tokenizer.model while the config's tokenizer settings match the ones
it was trained with (otherwise it trains and caches a new one from the cleaned corpus).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax.data import dedup, filters, sources, store, store_files, tokenizers

META = "meta.json"


def _nbytes(docs) -> int:
    return sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)


def clean(docs: list[str], clean_cfg, *, log=print) -> tuple[np.ndarray, list[dict]]:
    """Keep-mask of `docs` after all stages, and one stats row per stage."""
    sizes = np.array([len(d.encode("utf-8", "surrogatepass")) for d in docs], np.int64)
    keep = np.ones(len(docs), bool)
    stats = []

    def record(stage: str, removed: np.ndarray, seconds: float) -> None:
        keep[removed] = False
        row = {"stage": stage, "removed_docs": int(removed.sum()), "removed_bytes": int(sizes[removed].sum()),
               "docs_left": int(keep.sum()), "bytes_left": int(sizes[keep].sum()), "seconds": round(seconds, 2)}
        stats.append(row)
        log(f"{stage:<24} removed {row['removed_docs']:>7} docs {row['removed_bytes']:>12} bytes | "
            f"left {row['docs_left']:>7} docs {row['bytes_left']:>12} bytes ({seconds:.1f}s)")

    record("input", np.zeros(len(docs), bool), 0.0)
    for name, drop in filters.filters(clean_cfg).items():
        start = time.perf_counter()
        removed = np.array([k and drop(d) for d, k in zip(docs, keep)], bool)
        record(f"filter:{name}", removed, time.perf_counter() - start)
    if clean_cfg.exact_dedup:
        start = time.perf_counter()
        idx = np.flatnonzero(keep)
        removed = np.zeros(len(docs), bool)
        removed[idx] = dedup.exact_duplicates([docs[i] for i in idx])
        record("exact_dedup", removed, time.perf_counter() - start)
    if clean_cfg.near_dedup:
        start = time.perf_counter()
        idx = np.flatnonzero(keep)
        sig = dedup.minhash_signatures([docs[i] for i in idx], clean_cfg.num_perm, clean_cfg.shingle_size)
        removed = np.zeros(len(docs), bool)
        removed[idx] = dedup.near_duplicates(sig, clean_cfg.bands, clean_cfg.jaccard_threshold)
        record("near_dedup", removed, time.perf_counter() - start)
    return keep, stats


def _write_jsonl(path: str, docs) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare(data_cfg, out_dir: str, *, log=print) -> dict:
    """Clean `data_cfg.source`, write the prepared directory, return its metadata."""
    train = sources.get_split(data_cfg, "train").documents()
    val = sources.get_split(data_cfg, "validation").documents()
    log(f"source {data_cfg.source}: {len(train)} train + {len(val)} validation documents")
    keep, stats = clean(train + val, data_cfg.clean, log=log)
    kept = {
        "train": [d for d, k in zip(train, keep[: len(train)]) if k],
        "validation": [d for d, k in zip(val, keep[len(train) :]) if k],
    }
    for split, docs in kept.items():
        if not docs:
            raise ValueError(
                f"data.source {data_cfg.source!r}: the {split} split is empty after cleaning "
                f"(loosen data.clean thresholds); stages: {[(s['stage'], s['removed_docs']) for s in stats]}"
            )
    os.makedirs(out_dir, exist_ok=True)
    for split, docs in kept.items():
        _write_jsonl(sources.prepared_path(out_dir, split), docs)
    meta = {
        "source": sources.describe(data_cfg),
        "stats": stats,
        "docs": {s: len(d) for s, d in kept.items()},
        "bytes": {s: _nbytes(d) for s, d in kept.items()},
        "data_config": data_cfg.to_dict(),
    }
    if data_cfg.tokenizer == "sentencepiece":
        model_path = os.path.join(out_dir, "tokenizer.model")
        if data_cfg.get("tokenizer_path", None):
            shutil.copyfile(os.path.expanduser(data_cfg.tokenizer_path), model_path)
        else:
            start = time.perf_counter()
            prepared_cfg = data_cfg.copy_and_resolve_references()
            prepared_cfg.source = f"prepared:{out_dir}"
            tokenizers.build_tokenizer(prepared_cfg, use_prepared=False).save(model_path)
            meta["tokenizer_settings"] = tokenizers.spm_settings(data_cfg)
            log(f"tokenizer: SentencePiece {data_cfg.vocab_size} -> {model_path} "
                f"({time.perf_counter() - start:.1f}s)")
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    return meta


def prepare_store(data_cfg, out_dir: str, *, shard_tokens: int = 2**26, batch_bytes: int = 8 << 20,
                  log=print) -> dict:
    """Tokenize both splits of `data_cfg.source`, streamed, into a token store at `out_dir`."""
    tokenizer = tokenizers.build_tokenizer(data_cfg, verbose=True)
    split_docs = {split: sources.get_split(data_cfg, split).stream() for split in sources.SPLITS}
    complete = store_files.exists(store_files.join(out_dir, store.INDEX))
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer) and not complete:  # store:DIR runs load it
        tokenizer.save(store_files.join(out_dir, store.SPM_MODEL))
    return store.write_store(split_docs, tokenizer, data_cfg.tokenizer, out_dir, source=sources.describe(data_cfg),
                             shard_tokens=shard_tokens, batch_bytes=batch_bytes, log=log)


def main(argv) -> None:
    del argv
    cfg = flags.FLAGS.config
    data_cfg = cfg.data if "data" in cfg else cfg
    if flags.FLAGS.store:
        cli.run(lambda: prepare_store(data_cfg, flags.FLAGS.out, shard_tokens=flags.FLAGS.shard_tokens))
    else:
        cli.run(lambda: prepare(data_cfg, flags.FLAGS.out))


if __name__ == "__main__":
    # Flags are defined only when run as a command: importing prepare_store from a script with
    # flags of its own (benchmarks/data_pipeline.py) must not collide with them.
    config_flags.DEFINE_config_file("config", None, "Preset file (its data section is used).")
    flags.DEFINE_string("out", None, "Directory to write the prepared corpus and tokenizer to.")
    flags.DEFINE_bool("store", False, "Write a token store (tokenized shards, no cleaning) instead.")
    flags.DEFINE_integer("shard_tokens", 2**26, "--store: tokens per shard (closed at a document end).")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main, flags_parser=cli.parse_flags)
