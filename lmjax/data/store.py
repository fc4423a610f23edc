"""A token store: a tokenized corpus on disk, written once, read by every host at the speed of the step.

Layout of a store directory (`data.source=store:DIR`):

  DIR/index.json                    written last: its presence means the store is complete
  DIR/<split>/NNNNN.tokens          token ids, little-endian uint16 (vocab <= 65,536) or uint32;
                                    every document followed by EOS, as the in-memory pipeline lays
                                    them out, so both pack into the same rows
  DIR/<split>/NNNNN.ends            int64 end offset (within the shard) of each document
  DIR/<split>/counts.npy            how often each id occurs (the unigram baseline)
  DIR/<split>/progress.json         while writing: the finished shards, for resuming
  DIR/tokenizer.model               a SentencePiece tokenizer's model (data.tokenizer=sentencepiece)

Shards close at the first document boundary past `shard_tokens` tokens, so a document never
spans two shards. The writer streams documents in batches of about `batch_bytes` of text,
tokenizes each batch in the tokenizer's native threads (tiktoken, tokenizers and SentencePiece
release the GIL) and appends to the open shard, so its memory is one batch, whatever the corpus
size. A finished shard is published (renamed into place, or its upload completed) and recorded in
progress.json; an interrupted run resumes after the last finished shard. DIR may be local or any
fsspec URL such as gs://bucket/dir (store_files.py). The reader opens shards lazily and reads
byte ranges (a row is one positioned read, or one ranged request), so a process holds in memory
only the rows it asked for.

The index records the format version, the tokenizer (kind and fingerprint of its id mapping), the
source, and per shard its token and document counts and the text bytes and digest of its
documents; the reader refuses a store of another format version or tokenizer, and a shard whose
size disagrees with the index.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
from lmjax.data import store_files

FORMAT = "lmjax-token-store"
VERSION = 1
INDEX = "index.json"
PROGRESS = "progress.json"
COUNTS = "counts.npy"
SPM_MODEL = "tokenizer.model"  # a SentencePiece model the store was written with (trained ones have no other home)


class StoreError(ValueError):
    """A token store that cannot be read as asked."""


class IncompleteStoreError(StoreError):
    """No index.json: prepare did not finish (or never ran) in this directory."""


class StoreFormatError(StoreError):
    """The store was written by another version of its format."""


class TokenizerMismatchError(StoreError):
    """The store's ids come from another tokenizer than the one the run uses."""


class UnreadableShardError(StoreError):
    """A shard file is missing, truncated, or of another size than its index says."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def tokenizer_identity(tokenizer, kind: str) -> dict:
    return {"kind": kind, "fingerprint": tokenizer.fingerprint, "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id)}


# ---------------------------------------------------------------------------------------------
# writing


def _batches(docs: Iterable[str], batch_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer, docs: Sequence[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of `docs`, each followed by EOS; end offset of each document)."""
    ids = tokenizer.encode_batch(docs)
    ends = np.cumsum([len(x) + 1 for x in ids], dtype=np.int64)
    tokens = np.empty(int(ends[-1]), dtype)
    start = 0
    for x, end in zip(ids, ends):
        tokens[start : end - 1] = x
        start = end
    tokens[ends - 1] = tokenizer.eos_id
    return tokens, ends


class _ShardWriter:
    """Appends documents to shard NNNNN of `directory`; `finish` publishes its files."""

    def __init__(self, directory: str, number: int):
        self.name = f"{number:05d}"
        self.directory = directory
        self.file = store_files.AtomicWriter(store_files.join(directory, self.name + ".tokens"))
        self.ends: list[np.ndarray] = []
        self.num_tokens = self.num_docs = self.num_bytes = 0
        self.digest = hashlib.sha256()

    def add(self, docs: Sequence[str], tokens: np.ndarray, ends: np.ndarray) -> None:
        for doc in docs:
            data = doc.encode("utf-8", "surrogatepass")
            self.digest.update(len(data).to_bytes(8, "little") + data)
            self.num_bytes += len(data)
        self.file.write(tokens.tobytes())
        self.ends.append(ends + self.num_tokens)
        self.num_tokens += len(tokens)
        self.num_docs += len(docs)

    def finish(self) -> dict:
        ends = np.concatenate(self.ends).astype("<i8")
        store_files.write_atomic(store_files.join(self.directory, self.name + ".ends"), ends.tobytes())
        self.file.commit()  # the .tokens file last: a shard whose tokens exist is whole
        return {"name": self.name, "num_tokens": self.num_tokens, "num_docs": self.num_docs,
                "num_bytes": self.num_bytes, "digest": self.digest.hexdigest()[:16]}


def write_split(docs: Iterable[str], tokenizer, directory: str, settings: dict, *, shard_tokens: int,
                batch_bytes: int, log=print) -> tuple[list[dict], np.ndarray]:
    """Tokenize `docs` into shards under `directory`, resuming after the shards a previous,
    interrupted run with the same `settings` finished. Returns the shard entries and how often
    each id occurs."""
    store_files.makedirs(directory)
    progress_path = store_files.join(directory, PROGRESS)
    shards: list[dict] = []
    if store_files.exists(progress_path):
        progress = json.loads(store_files.read_bytes(progress_path))
        if progress["settings"] != settings:
            raise StoreError(
                f"{directory} holds an interrupted store made with other settings "
                f"({progress['settings']} vs {settings}): delete it or choose another --out"
            )
        shards = progress["shards"]
        if shards:
            log(f"{directory}: resuming after {len(shards)} finished shards")
    dtype = np.dtype(settings["dtype"])
    vocab_size = settings["tokenizer"]["vocab_size"]
    counts = _count_ids([store_files.join(directory, s["name"] + ".tokens") for s in shards if s["num_tokens"]],
                        dtype, vocab_size)
    skip = sum(s["num_docs"] for s in shards)
    writer = None
    start, done_bytes = time.perf_counter(), 0
    for batch in _batches(itertools.islice(docs, skip, None), batch_bytes):
        tokens, ends = _encode(tokenizer, batch, dtype)
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
        if writer is None:
            writer = _ShardWriter(directory, len(shards))
        writer.add(batch, tokens, ends)
        done_bytes += sum(len(d) for d in batch)
        if writer.num_tokens >= shard_tokens:
            shards.append(writer.finish())
            writer = None
            store_files.write_atomic(progress_path, json.dumps({"settings": settings, "shards": shards}).encode())
            seconds = time.perf_counter() - start
            log(f"{directory}: shard {len(shards) - 1} done, {sum(s['num_tokens'] for s in shards):,} tokens "
                f"({done_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s of text)")
    if writer is not None:
        shards.append(writer.finish())
        store_files.write_atomic(progress_path, json.dumps({"settings": settings, "shards": shards}).encode())
    return shards, counts


def write_store(split_docs: dict[str, Iterable[str]], tokenizer, tokenizer_kind: str, out_dir: str, *,
                source: dict, shard_tokens: int = 2**26, batch_bytes: int = 8 << 20, log=print) -> dict:
    """Write (or resume, or find complete) the store of `split_docs` ({split: documents}) at
    `out_dir`; returns its index. index.json is written last, by rename."""
    if tokenizer.eos_id < 0:
        raise ValueError("the tokenizer has no EOS id, which the store puts after every document")
    identity = tokenizer_identity(tokenizer, tokenizer_kind)
    dtype = token_dtype(tokenizer.vocab_size)
    index_path = store_files.join(out_dir, INDEX)
    if store_files.exists(index_path):
        index = read_index(out_dir)
        check_tokenizer(index, tokenizer, out_dir)
        if index["source"] != source:
            raise StoreError(f"{out_dir} already holds a store of another source ({index['source']}): "
                             f"delete it or choose another --out")
        log(f"{out_dir}: complete store found, nothing to do")
        return index
    splits = {}
    for split, docs in split_docs.items():
        settings = {"format": FORMAT, "version": VERSION, "tokenizer": identity, "dtype": dtype.str,
                    "shard_tokens": int(shard_tokens), "source": source, "split": split}
        directory = store_files.join(out_dir, split)
        shards, counts = write_split(docs, tokenizer, directory, settings, shard_tokens=shard_tokens,
                             batch_bytes=batch_bytes, log=log)
        if split == "train" and not any(s["num_bytes"] for s in shards):
            raise ValueError(f"data.source {source.get('source')!r} has no documents in split {split!r}")
        buffer = io.BytesIO()
        np.save(buffer, counts)
        store_files.write_atomic(store_files.join(directory, COUNTS), buffer.getvalue())
        splits[split] = {
            "num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": sum(s["num_docs"] for s in shards),
            "num_bytes": sum(s["num_bytes"] for s in shards),
            "digest": hashlib.sha256("".join(s["digest"] for s in shards).encode()).hexdigest()[:16],
            "shards": shards,
        }
        log(f"{split}: {splits[split]['num_docs']:,} docs, {splits[split]['num_bytes']:,} bytes -> "
            f"{splits[split]['num_tokens']:,} tokens in {len(shards)} shards")
    index = {"format": FORMAT, "version": VERSION, "tokenizer": identity, "dtype": dtype.str,
             "shard_tokens": int(shard_tokens), "source": source, "splits": splits}
    store_files.write_atomic(index_path, json.dumps(index, indent=1).encode())
    for split in splits:
        store_files.remove(store_files.join(out_dir, split, PROGRESS))
    return index


def _count_ids(paths: Sequence[str], dtype: np.dtype, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
    """How often each id occurs in the shards (those a resumed run finished before), read a few
    MB at a time."""
    counts = np.zeros(vocab_size, np.int64)
    for path in paths:
        total = store_files.size(path) // dtype.itemsize
        for start in range(0, total, chunk):
            ids = np.frombuffer(_read(path, start * dtype.itemsize, min(start + chunk, total) * dtype.itemsize), dtype)
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def _read(path: str, start: int, stop: int) -> bytes:
    if store_files.is_remote(path):
        return store_files.read_range(path, start, stop)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


# ---------------------------------------------------------------------------------------------
# reading


def read_index(directory: str) -> dict:
    path = store_files.join(directory, INDEX)
    if not store_files.exists(path):
        if any(store_files.exists(store_files.join(directory, s, PROGRESS)) for s in ("train", "validation")):
            raise IncompleteStoreError(
                f"token store {directory} is incomplete (no {INDEX}): its prepare was interrupted; run "
                f"python -m lmjax.data.prepare --store again to finish it"
            )
        raise IncompleteStoreError(f"no token store at {directory} (no {INDEX}): write one with "
                                   f"python -m lmjax.data.prepare --store")
    try:
        index = json.loads(store_files.read_bytes(path))
    except ValueError as e:
        raise StoreFormatError(f"{path} is not a token store index: {e}") from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise StoreFormatError(
            f"token store {directory} has format {index.get('format')!r} version {index.get('version')!r}; "
            f"this lmjax reads {FORMAT!r} version {VERSION}: prepare it again"
        )
    return index


def check_tokenizer(index: dict, tokenizer, directory: str) -> None:
    stored = index["tokenizer"]
    if stored["fingerprint"] != tokenizer.fingerprint:
        raise TokenizerMismatchError(
            f"token store {directory} was written with tokenizer {stored['kind']!r} ({stored['fingerprint']}), "
            f"but this run's tokenizer is {tokenizer.fingerprint}: set data.tokenizer to the store's, or "
            f"prepare a store with this one"
        )


class StoreTokens:
    """One split's token stream across its shards, read by slices: `tokens[a:b]` (int32) reads
    just those ids from disk. Pickles without its open files (grain workers reopen them)."""

    def __init__(self, directory: str, split: str, index: dict):
        info = index["splits"].get(split)
        if info is None:
            raise StoreError(f"token store {directory} has no split {split!r} (it has {sorted(index['splits'])})")
        self.dtype = np.dtype(index["dtype"])
        self.paths = [store_files.join(directory, split, s["name"] + ".tokens") for s in info["shards"]]
        sizes = np.array([s["num_tokens"] for s in info["shards"]], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        for path, n in zip(self.paths, sizes):
            self._check_size(path, int(n) * self.dtype.itemsize)
        self._files: dict[int, object] = {}

    @staticmethod
    def _check_size(path: str, expected: int) -> None:
        try:
            actual = store_files.size(path)
        except (OSError, FileNotFoundError) as e:
            raise UnreadableShardError(f"token store shard {path} cannot be read: {e}") from e
        if actual != expected:
            raise UnreadableShardError(f"token store shard {path} has {actual} bytes; its index says {expected}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}

    def _read(self, shard: int, start: int, stop: int) -> bytes:
        path = self.paths[shard]
        if store_files.is_remote(path):
            return store_files.read_range(path, start, stop)
        if shard not in self._files:
            self._files[shard] = open(path, "rb")  # noqa: SIM115 - held open across reads
        # A positioned read, not seek + read: prefetch threads share this object.
        return os.pread(self._files[shard].fileno(), stop - start, start)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("StoreTokens reads contiguous slices only")
        start, stop, _ = key.indices(len(self))
        out = np.empty(max(stop - start, 0), np.int32)
        pos = start
        while pos < stop:
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            end = min(stop, int(self.starts[shard + 1]))
            offset = (pos - int(self.starts[shard])) * self.dtype.itemsize
            nbytes = (end - pos) * self.dtype.itemsize
            data = self._read(shard, offset, offset + nbytes)
            if len(data) != nbytes:
                raise UnreadableShardError(f"token store shard {self.paths[shard]} ended early "
                                           f"({len(data)} of {nbytes} bytes at token {pos - self.starts[shard]})")
            out[pos - start : end - start] = np.frombuffer(data, self.dtype)
            pos = end
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All of the split's tokens in memory, for the evaluations that want an array (small splits)."""
        return self[:] if dtype is None else self[:].astype(dtype)


def read_split(directory: str, split: str, tokenizer, *, doc_ends: bool = True) -> dict:
    """What the pipeline needs of one split: tokens (StoreTokens), global document ends (only with
    `doc_ends`: concat packing needs none, and they grow with the corpus), the document count, text
    bytes and token counts, after checking the format, the tokenizer and every shard's size."""
    index = read_index(directory)
    check_tokenizer(index, tokenizer, directory)
    tokens = StoreTokens(directory, split, index)
    info = index["splits"][split]
    out = {"tokens": tokens, "num_docs": int(info["num_docs"]), "num_bytes": np.int64(info["num_bytes"])}
    if doc_ends:
        ends = []
        for shard, start in zip(info["shards"], tokens.starts):
            path = store_files.join(directory, split, shard["name"] + ".ends")
            StoreTokens._check_size(path, shard["num_docs"] * 8)
            ends.append(np.frombuffer(store_files.read_bytes(path), "<i8") + start)
        out["doc_ends"] = np.concatenate([np.zeros(0, np.int64), *ends])
    out["counts"] = np.load(io.BytesIO(store_files.read_bytes(store_files.join(directory, split, COUNTS))))
    return out
