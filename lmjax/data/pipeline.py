"""make_pipeline: a deterministic, resumable, per-process iterator of packed training batches.

Design: the split is tokenized once (and cached), packed into `R` numbered rows (packing.py), and
the batch stream is a pure function of a counter. Global batch `i` holds the rows at positions
`i*B .. i*B+B-1` of the endless sequence epoch 0, epoch 1, ..., where epoch `e` is the rows in the
order of a keyed bijection of [0, R) (grain's `index_shuffle`, exactly grain's global shuffle
`MapDataset.range(R).shuffle(seed)` with a seed made from (data seed, seed)), computed index by
index so that no permutation of R rows is ever held — or in order when not shuffling. Batches
run straight across epoch boundaries, so no row is dropped. The state is just `{"batch": i}`
(plus epoch/row for information and checks): restoring it reproduces the uninterrupted stream
exactly, even under a different number of processes.

Each process computes the whole global batch's row indices and keeps rows [start, stop), the
rows its devices hold (`lmjax.sharding.process_rows`): it reads only those. Processes whose devices
hold copies of the same rows (a tensor axis spanning hosts) read the same rows.

`data.grain_workers > 0` computes batches in grain worker processes (`mp_prefetch`) with the same
order and state. The in-process loader is far faster than a train step consumes
(benchmarks/data_pipeline.py), so workers only pay off for expensive per-batch work; starting them
takes seconds.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from typing import Iterator

import numpy as np

from lmjax.data import auto_store, packing, sources, store
from lmjax.data.tokenizers import Tokenizer, cache_dir

STATE_VERSION = 1
SHUFFLE_ROUNDS = 4  # Feistel rounds of grain's index_shuffle (grain's own global shuffle uses 4)


def tokenize_split(data_cfg, split: str, tokenizer: Tokenizer, *, verbose: bool = False,
                   doc_ends: bool = True) -> dict:
    """The split's tokens (each document followed by EOS), the end offset of every document and
    the UTF-8 byte count. From a token store (`store:DIR`, or the one the first use of a `text:` or
    `tfds:` source writes: auto_store.py), `tokens` is a store.StoreTokens that reads slices from
    disk, `counts` holds each id's count, and `doc_ends` is read only when asked for. Other
    sources are tokenized into one int32 array, cached by (split content, tokenizer) under
    `cache_dir/tokens/`."""
    if tokenizer.eos_id < 0:
        raise ValueError("the tokenizer has no EOS id, which packing needs between documents")
    kind, _, arg = data_cfg.source.partition(":")
    if kind == "store":  # already tokenized on disk: read by slices, never loaded whole
        return store.read_split(os.path.expanduser(arg), split, tokenizer, doc_ends=doc_ends)
    if auto_store.enabled(data_cfg):
        return store.read_split(auto_store.ensure(data_cfg, tokenizer), split, tokenizer, doc_ends=doc_ends)
    data = sources.get_split(data_cfg, split)
    key = f"{data.fingerprint}-{tokenizer.fingerprint}"
    path = os.path.join(cache_dir(data_cfg), "tokens", hashlib.sha256(key.encode()).hexdigest()[:20] + ".npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    start = time.perf_counter()
    docs = data.documents()
    if not docs or not any(docs):
        raise ValueError(f"data.source {data_cfg.source!r} has no documents in split {split!r}")
    ids = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
    tokens = np.empty(int(lengths.sum()), np.int32)
    doc_ends = np.cumsum(lengths)
    for x, end, n in zip(ids, doc_ends, lengths):
        tokens[end - n : end - 1] = x
    tokens[doc_ends - 1] = tokenizer.eos_id
    num_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
    out = {"tokens": tokens, "doc_ends": doc_ends, "num_bytes": np.int64(num_bytes)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    if verbose:
        print(f"tokenized {split}: {len(docs)} docs, {num_bytes} bytes -> {len(tokens)} tokens "
              f"in {time.perf_counter() - start:.1f}s")
    return out


class BatchFn:
    """Global batch index -> this process's rows. A picklable plain object, so grain worker
    processes can compute batches too."""

    def __init__(self, packer, batch_size: int, rows: tuple[int, int], seed: tuple[int, int], shuffle: bool):
        self.packer = packer
        self.batch_size = batch_size
        self.offset, stop = rows
        self.rows_per_process = stop - self.offset
        self.seed = seed
        self.shuffle = shuffle

    def shuffle_seed(self) -> int:
        """A 32-bit seed made from (data seed, seed): epoch e's order is index_shuffle seeded by
        shuffle_seed + e, which is grain's own global shuffle (`MapDataset.shuffle(shuffle_seed)`)."""
        return int.from_bytes(hashlib.sha256(json.dumps(list(self.seed)).encode()).digest()[:4], "little")

    def row_indices(self, batch: int) -> np.ndarray:
        """Rows of this process's part of global batch `batch`. Position p of epoch e holds row
        index_shuffle(p) (grain's keyed bijection of [0, R)), computed per index, so no
        permutation of all R rows is ever held: it would grow with the corpus."""
        n = self.packer.num_rows
        k = batch * self.batch_size + self.offset + np.arange(self.rows_per_process, dtype=np.int64)
        epochs, idx = k // n, k % n
        if not self.shuffle:
            return idx
        from grain.experimental import index_shuffle

        base = self.shuffle_seed()
        return np.fromiter((index_shuffle(int(i), n - 1, (base + int(e)) % 2**32, SHUFFLE_ROUNDS)
                            for e, i in zip(epochs, idx)), np.int64, len(k))

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        return self.packer.rows(self.row_indices(int(batch)))


class Pipeline:
    """An endless iterator of batch dicts (numpy, [rows, seq_len]) with a tiny JSON state."""

    def __init__(self, batch_fn: BatchFn, *, split: str, num_tokens: int, num_bytes: int,
                 grain_workers: int = 0, prefetch_threads: int = 0, info: dict | None = None):
        self.batch_fn = batch_fn
        self.split = split
        self.info = info or {}  # source description (pystdlib: the Python version), for records
        self.num_tokens = num_tokens
        self.num_bytes = num_bytes
        self.bytes_per_token = num_bytes / max(num_tokens, 1)
        self.rows_per_epoch = batch_fn.packer.num_rows
        self.seq_len = batch_fn.packer.seq_len
        self.grain_workers = grain_workers
        self.prefetch_threads = prefetch_threads
        self._batch = 0
        self._grain_iter: Iterator | None = None

    def __iter__(self) -> "Pipeline":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.grain_workers > 0 or self.prefetch_threads > 0:
            if self._grain_iter is None:
                self._grain_iter = self._start_grain(self._batch)
            # Plain copies: grain hands out shared-memory arrays that must not outlive it.
            out = {k: np.array(v) for k, v in next(self._grain_iter).items()}
        else:
            out = self.batch_fn(self._batch)
        self._batch += 1
        return out

    def get_state(self) -> dict:
        position = self._batch * self.batch_fn.batch_size
        return {
            "version": STATE_VERSION,
            "batch": self._batch,
            "epoch": position // self.rows_per_epoch,
            "row": position % self.rows_per_epoch,
            "rows_per_epoch": self.rows_per_epoch,
            "batch_size": self.batch_fn.batch_size,
        }

    def set_state(self, state: dict) -> None:
        state = json.loads(json.dumps(state))  # accept any JSON round trip of get_state()
        for key in ("rows_per_epoch", "batch_size"):
            if key in state and state[key] != self.get_state()[key]:
                raise ValueError(
                    f"pipeline state was saved with {key}={state[key]} but this pipeline has "
                    f"{self.get_state()[key]}: the data, tokenizer, seq_len or batch size changed"
                )
        self._batch = int(state["batch"])
        self.close()

    def close(self) -> None:
        """Stop grain worker processes or threads (if any); iterating again restarts them."""
        if self._grain_iter is not None:
            self._grain_iter.close()
            self._grain_iter = None

    def _start_grain(self, first_batch: int) -> Iterator:
        """Batches computed ahead of time by grain worker processes, or by grain's prefetch threads
        (which overlap the waits of reads from a bucket), in the same order (batch i is still
        `batch_fn(i)`, so the state and resume logic are unchanged)."""
        import grain
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = grain.MapDataset.range(first_batch, 2**62).map(self.batch_fn)
        if self.grain_workers > 0:
            options = grain.multiprocessing.MultiprocessingOptions(num_workers=self.grain_workers)
            iterator = iter(ds.to_iter_dataset().mp_prefetch(options))
        else:
            read = grain.ReadOptions(num_threads=self.prefetch_threads, prefetch_buffer_size=2 * self.prefetch_threads)
            iterator = iter(ds.to_iter_dataset(read))
        atexit.register(self.close)
        return iterator


def packed_split(data_cfg, tokenizer: Tokenizer, split: str) -> tuple[packing.Packer, dict]:
    """The split tokenized (cached) and packed into numbered rows of `data.seq_len`: (packer, tokens)."""
    sources._check_split(split)
    seq_len = int(data_cfg.seq_len)
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    data = tokenize_split(data_cfg, split, tokenizer, doc_ends=data_cfg.packing != "concat")
    if len(data["tokens"]) < seq_len + 1:
        raise ValueError(
            f"data.source {data_cfg.source!r} split {split!r} has {len(data['tokens'])} tokens: "
            f"too few for one row of data.seq_len={seq_len}"
        )
    packer = packing.make_packer(data_cfg.packing, data["tokens"], data.get("doc_ends"), seq_len, tokenizer.pad_id)
    return packer, data


def make_pipeline(
    data_cfg,
    tokenizer: Tokenizer,
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool | None = None,
    rows: tuple[int, int] | None = None,
) -> Pipeline:
    """Batches of `split` ('train' or 'validation'); `batch_size` is global, in sequences.

    The row order depends on (data_cfg.seed, seed). `shuffle=None` shuffles the train split when
    `data_cfg.shuffle` and never the validation split. `rows` is the part [start, stop) of every
    global batch this process reads (`lmjax.sharding.process_rows`); None: all of it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    rows = (0, batch_size) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"rows={rows} is not a part of a batch of {batch_size} rows")
    if shuffle is None:
        shuffle = bool(data_cfg.shuffle) and split == "train"
    packer, data = packed_split(data_cfg, tokenizer, split)
    batch_fn = BatchFn(packer, batch_size, rows, (int(data_cfg.seed), int(seed)), shuffle)
    return Pipeline(batch_fn, split=split, num_tokens=len(data["tokens"]),
                    num_bytes=int(data["num_bytes"]), grain_workers=int(data_cfg.grain_workers),
                    prefetch_threads=int(data_cfg.get("prefetch_threads", 0)),
                    info=dict(sources.describe(data_cfg), split=split,
                              documents=int(data["num_docs"]) if "num_docs" in data else len(data["doc_ends"])))
