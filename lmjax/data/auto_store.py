"""The first use of a `text:` or `tfds:` source tokenizes it into a token store; every later run,
and every other process, reads that store instead of tokenizing again.

Where: `data.store_dir` (local or gs://; None: `<data.cache_dir>/stores`, beside the tokenizer
cache), one directory per key. The key hashes the source's identity (its files' names, sizes and
modification times, or the TFDS dataset's version and split: read without reading the text), the
split settings, `data.max_documents`, the tokenizer's identity and the store format, so editing a
file or changing the tokenizer writes a new store, and nothing else does. `data.store_dir=""`
turns this off: the split is then tokenized in memory (and cached) as for the other sources.

Concurrent first use: a store is complete once its index.json exists, and index.json is written
last (store.py), so a run that dies mid-way leaves a store the next run resumes, never one that
looks complete. On a local disk the writer holds an exclusive `flock` on `<key>.lock`; the other
processes block on it, then find the index and read. The lock dies with its holder, so a killed
writer never blocks anyone. Buckets have no locks: there process 0 of a multi-process job writes
and the others wait for its index; independent runs that race on one bucket store write the same
bytes to the same objects (the shards are a pure function of the text), which is wasted work,
never a corrupt store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time

from lmjax.data import sources, store, store_files
from lmjax.data.tokenizers import cache_dir

KINDS = ("text", "tfds")
SHARD_TOKENS = 2**26  # tokens per shard (a shard closes at the first document end past it)
BATCH_BYTES = 8 << 20  # text tokenized per batch: the writer's memory
POLL_SECONDS = 5.0


def enabled(data_cfg) -> bool:
    return data_cfg.source.partition(":")[0] in KINDS and data_cfg.get("store_dir", None) != ""


def root(data_cfg) -> str:
    directory = data_cfg.get("store_dir", None)
    if directory is None:
        return os.path.join(cache_dir(data_cfg), "stores")
    return directory if store_files.is_remote(directory) else os.path.expanduser(directory)


def key(data_cfg, tokenizer) -> str:
    """A name for the store of (source content, split settings, tokenizer, store format)."""
    parts = {
        "source": data_cfg.source,
        "splits": {split: sources.get_split(data_cfg, split).identity for split in sources.SPLITS},
        "max_documents": data_cfg.get("max_documents", None),
        "tokenizer": store.tokenizer_identity(tokenizer, data_cfg.tokenizer),
        "format": [store.FORMAT, store.VERSION, SHARD_TOKENS],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def ensure(data_cfg, tokenizer, *, log=print, process_index: int | None = None) -> str:
    """The directory of `data_cfg.source`'s token store, written first if no run has yet.
    `process_index` (default: JAX's) decides who writes a bucket store: process 0."""
    directory = store_files.join(root(data_cfg), key(data_cfg, tokenizer))
    index = store_files.join(directory, store.INDEX)
    if store_files.exists(index):
        return directory
    if store_files.is_remote(directory):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        if process_index != 0:
            log(f"waiting for process 0 to write the token store of {data_cfg.source} at {directory}")
            while not store_files.exists(index):
                time.sleep(POLL_SECONDS)
            return directory
        _write(data_cfg, tokenizer, directory, log)
        return directory
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    with open(directory + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this block ends, or when the process dies
        if not store_files.exists(index):  # another process may have written it while we waited
            _write(data_cfg, tokenizer, directory, log)
    return directory


def _write(data_cfg, tokenizer, directory: str, log) -> None:
    log(f"first use of data.source {data_cfg.source!r}: writing its token store to {directory}")
    start = time.perf_counter()
    split_docs = {split: sources.get_split(data_cfg, split).stream() for split in sources.SPLITS}
    store.write_store(split_docs, tokenizer, data_cfg.tokenizer, directory, source=sources.describe(data_cfg),
                      shard_tokens=SHARD_TOKENS, batch_bytes=BATCH_BYTES, log=log)
    log(f"token store written in {time.perf_counter() - start:.1f}s")
