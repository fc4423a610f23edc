"""Where documents come from: `config.data.source` -> the documents of one split.

Source kinds:
  pystdlib          the running interpreter's standard library `*.py` files (no download, ~12 MB).
  text:<glob>       local `.txt` files (one document per file, or per blank-line block) and `.jsonl`
                    files (one document per line, field `text_key`).
  tfds:<name>[/<config>]  a TensorFlow Datasets text dataset read through `tfds.data_source`
                    (ArrayRecord; no TensorFlow needed).
  prepared:<dir>    the output of `python -m lmjax.data.prepare` (cleaned train/validation jsonl).
  store:<dir>       a token store (`python -m lmjax.data.prepare --store`, store.py): token ids,
                    not text; the pipeline reads it directly, so it has no documents here.
  arithmetic:<seed> a synthetic arithmetic corpus in BIG-bench's question format, made from a seed
                    (`lmjax.data.arithmetic`, which lists its other options).

Every split has a `fingerprint` (a content hash, or the dataset identity for tfds) so that caches
keyed by it (tokenizers, token arrays) are invalidated when the text changes.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import os
import sys
import sysconfig
from typing import Callable, Iterator, Sequence

from lmjax.data import store_files

SPLITS = ("train", "validation")
SOURCE_KINDS = ("pystdlib", "text:", "tfds:", "prepared:", "store:", "arithmetic:")
DOC_SPLITS = ("file", "blank_line")  # text: one document per file, or per blank-line block
TEXT_SPLITS = ("hash", "tail")  # text: validation by a hash of each document, or the tail of the text
TFDS_BATCH = 1024  # tfds: records per read
PYSTDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


class Split:
    """The documents of one split of a source: all of them (`documents()`, for corpora that fit in
    memory) or one at a time (`stream()`, for the token store, which never holds the split).

    `fingerprint` (a content hash, computed on first use) keys the caches derived from the split.
    """

    def __init__(self, source: str, split: str, fingerprint: str | Callable[[], str],
                 load: Callable[[], list[str]], info: dict | None = None,
                 stream: Callable[[], Iterator[str]] | None = None, identity: str | None = None):
        self.source, self.split, self.load, self.info = source, split, load, info or {}
        self._fingerprint = fingerprint
        self._stream = stream
        self._identity = identity

    @property
    def identity(self) -> str:
        """Names the split's content without reading it (file sizes and times, a dataset version),
        to key the token store its first use writes; the content fingerprint where there is none."""
        return self._identity or self.fingerprint

    @property
    def fingerprint(self) -> str:
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint = value

    def documents(self) -> list[str]:
        return self.load()

    def stream(self) -> Iterator[str]:
        return self._stream() if self._stream is not None else iter(self.load())


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key`: the same on every run and machine
    (unlike Python's salted `hash`)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_validation(key: str, val_fraction: float) -> bool:
    return stable_fraction(key) < val_fraction


def content_fingerprint(docs: Sequence[str], *extra: str) -> str:
    h = hashlib.sha256()
    for part in extra:
        h.update(part.encode("utf-8") + b"\0")
    for doc in docs:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------------------------
# pystdlib


def pystdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def pystdlib_files() -> list[str]:
    """Relative paths of the stdlib's `*.py` files (test folders and installed packages excluded),
    sorted so the listing is stable."""
    root = pystdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in PYSTDLIB_EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def pystdlib_split_files(split: str, val_fraction: float) -> list[str]:
    _check_split(split)
    want_val = split == "validation"
    return [f for f in pystdlib_files() if in_validation(f, val_fraction) == want_val]


def describe_pystdlib() -> dict:
    """The interpreter whose stdlib is the corpus: its contents (and so every figure derived from
    it) depend on this version."""
    return {
        "python_version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "stdlib": pystdlib_root(),
    }


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _pystdlib_split(data_cfg, split: str) -> Split:
    root = pystdlib_root()
    files = pystdlib_split_files(split, data_cfg.val_fraction)

    def stream() -> Iterator[str]:
        return (_read_text(os.path.join(root, f)) for f in files)

    load = functools.cache(lambda: list(stream()))
    info = dict(describe_pystdlib(), files=len(files))
    return Split("pystdlib", split, lambda: content_fingerprint(load(), "pystdlib", split, *files), load, info, stream)


# ---------------------------------------------------------------------------------------------
# text:<glob>


def _text_files(pattern: str) -> list[str]:
    pattern = os.path.expanduser(pattern)
    if not glob.has_magic(pattern):
        if not os.path.isfile(pattern):
            raise FileNotFoundError(f"data.source text file not found: {pattern!r}")
        return [pattern]
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"data.source glob {pattern!r} matched no files")
    return paths


def _file_documents(path: str, data_cfg) -> list[str]:
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if data_cfg.text_key not in record:
                    raise ValueError(
                        f"{path}:{lineno} has no field data.text_key={data_cfg.text_key!r} "
                        f"(fields: {sorted(record)})"
                    )
                docs.append(record[data_cfg.text_key])
        return docs
    text = _read_text(path)
    if data_cfg.doc_split == "file":
        return [text]
    if data_cfg.doc_split == "blank_line":
        blocks = [b.strip("\n") for b in text.split("\n\n")]
        return [b for b in blocks if b.strip()]
    raise ValueError(f"data.doc_split must be one of {DOC_SPLITS}, got {data_cfg.doc_split!r}")


def _check_first_record(path: str, data_cfg) -> None:
    """Fail at once, not after hours of streaming, when .jsonl records lack data.text_key."""
    if not path.endswith(".jsonl"):
        return
    with open(path, encoding="utf-8") as f:
        line = next((line for line in f if line.strip()), None)
    if line is not None and data_cfg.text_key not in json.loads(line):
        raise ValueError(f"{path}:1 has no field data.text_key={data_cfg.text_key!r} (fields: {sorted(json.loads(line))})")


def tail_split(docs: list[str], split: str, val_fraction: float) -> list[str]:
    """nanoGPT's split: the last `val_fraction` of the characters are validation (a document
    straddling the cut is cut in two)."""
    total = sum(len(d) for d in docs)
    cut = int(total * (1.0 - val_fraction))
    train, val, seen = [], [], 0
    for d in docs:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            train.append(d[: cut - seen])
            val.append(d[cut - seen :])
        seen += len(d)
    return [d for d in (train if split == "train" else val) if d]


def _text_split(data_cfg, split: str, pattern: str, source: str) -> Split:
    paths = _text_files(pattern)
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    if len(paths) == 1:
        common = os.path.dirname(common)
    if data_cfg.text_split not in TEXT_SPLITS:
        raise ValueError(f"data.text_split must be one of {TEXT_SPLITS}, got {data_cfg.text_split!r}")
    if data_cfg.doc_split not in DOC_SPLITS:
        raise ValueError(f"data.doc_split must be one of {DOC_SPLITS}, got {data_cfg.doc_split!r}")

    _check_first_record(paths[0], data_cfg)

    def keyed() -> Iterator[tuple[str, str]]:  # (stable key, document), one file in memory at a time
        for path in paths:
            rel = os.path.relpath(os.path.abspath(path), common)
            yield from ((f"{rel}#{i}", d) for i, d in enumerate(_file_documents(path, data_cfg)))

    def stream() -> Iterator[str]:
        if data_cfg.text_split == "tail":  # a cut at a fraction of all characters: needs the whole text
            return iter(tail_split([d for _, d in keyed()], split, data_cfg.val_fraction))
        want_val = split == "validation"
        return (d for k, d in keyed() if in_validation(k, data_cfg.val_fraction) == want_val)

    load = functools.cache(lambda: list(stream()))
    info = {"files": len(paths)}
    fp = lambda: content_fingerprint(load(), source, split, data_cfg.text_split, str(data_cfg.val_fraction))  # noqa: E731
    stats = [os.stat(p) for p in paths]
    identity = content_fingerprint(
        [], source, split, data_cfg.text_split, str(data_cfg.val_fraction), data_cfg.doc_split, data_cfg.text_key,
        *(f"{os.path.relpath(os.path.abspath(p), common)}:{st.st_size}:{st.st_mtime_ns}" for p, st in zip(paths, stats)))
    return Split(source, split, fp, load, info, stream, identity)


# ---------------------------------------------------------------------------------------------
# prepared:<dir>


def prepared_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.jsonl")


def _prepared_split(data_cfg, split: str, directory: str, source: str) -> Split:
    path = prepared_path(os.path.expanduser(directory), split)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.source {source!r}: {path} not found (write it with python -m lmjax.data.prepare)"
        )

    def stream() -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line)["text"] for line in f if line.strip())

    load = functools.cache(lambda: list(stream()))
    return Split(source, split, lambda: content_fingerprint(load(), source, split), load, {}, stream)


# ---------------------------------------------------------------------------------------------
# tfds:<name>[/<config>]


def _tfds_split(data_cfg, split: str, name: str, source: str) -> Split:
    import tensorflow_datasets as tfds

    data_dir = data_cfg.get("tfds_data_dir", None)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"data.source {source!r}: unknown TFDS dataset {name!r}") from e
    if not builder.is_prepared():
        if not data_cfg.tfds_download:
            raise FileNotFoundError(
                f"data.source {source!r}: TFDS dataset {name!r} is not prepared in data_dir "
                f"{builder.data_dir!r}; set data.tfds_download=True or run `tfds build {name}`"
            )
        builder.download_and_prepare()
    tfds_split = data_cfg.train_split if split == "train" else data_cfg.val_split
    try:
        source_ds = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
        raise ValueError(
            f"data.source {source!r}: tfds.data_source needs the ArrayRecord format; this copy was "
            f"prepared in another format. Rebuild it with file_format='array_record' "
            f"(reading TFRecord data needs TensorFlow: pip install tensorflow)"
        ) from e
    key = data_cfg.text_key
    max_docs = data_cfg.get("max_documents", None)
    count = len(source_ds) if max_docs is None else min(max_docs, len(source_ds))

    def stream() -> Iterator[str]:
        """Records read TFDS_BATCH at a time (one ArrayRecord read each), never the whole split."""
        for start in range(0, count, TFDS_BATCH):
            for record in source_ds.__getitems__(list(range(start, min(start + TFDS_BATCH, count)))):
                value = record[key]
                yield value.decode("utf-8") if isinstance(value, bytes) else str(value)

    fp = content_fingerprint(
        [], source, str(builder.version), tfds_split, str(count), str(builder.data_dir)
    )
    return Split(source, split, fp, lambda: list(stream()), {"version": str(builder.version), "examples": count},
                 stream, fp)


# ---------------------------------------------------------------------------------------------
# arithmetic:<spec>


def _arithmetic_split(data_cfg, split: str, arg: str, source: str) -> Split:
    from lmjax.data import arithmetic

    spec = arithmetic.parse(arg)
    count = arithmetic.num_documents(spec, split, data_cfg.val_fraction)
    # The text is a pure function of the spec: fingerprint that, and generate only on a cache miss.
    fp = content_fingerprint([], source, repr(spec), split, str(count), arithmetic.VERSION)
    return Split(source, split, fp, lambda: arithmetic.documents(spec, split, data_cfg.val_fraction),
                 {"documents": count})


# ---------------------------------------------------------------------------------------------


def get_split(data_cfg, split: str) -> Split:
    """The documents of `split` ('train' or 'validation') of `data_cfg.source`."""
    _check_split(split)
    source = data_cfg.source
    kind, _, arg = source.partition(":")
    if kind == "pystdlib" and not arg:
        result = _pystdlib_split(data_cfg, split)
    elif kind == "text" and arg:
        result = _text_split(data_cfg, split, arg, source)
    elif kind == "prepared" and arg:
        result = _prepared_split(data_cfg, split, arg, source)
    elif kind == "tfds" and arg:
        result = _tfds_split(data_cfg, split, arg, source)
    elif kind == "arithmetic" and arg:
        result = _arithmetic_split(data_cfg, split, arg, source)
    elif kind == "store" and arg:
        raise ValueError(
            f"data.source {source!r} holds token ids, not text: it cannot train a tokenizer or be prepared "
            f"again (set data.tokenizer to the store's, or use the text source it was made from)"
        )
    else:
        raise ValueError(
            f"unknown data.source {source!r}: expected pystdlib, text:<glob>, tfds:<name>[/<config>], "
            f"prepared:<dir>, store:<dir> or arithmetic:<seed>"
        )
    max_docs = data_cfg.get("max_documents", None)
    if max_docs is not None and kind != "tfds":
        full, full_stream, full_fp = result.load, result._stream, result._fingerprint
        result.load = functools.cache(lambda: full()[:max_docs])
        result._stream = lambda: itertools.islice(full_stream(), max_docs)
        result._fingerprint = lambda: content_fingerprint(
            [], full_fp() if callable(full_fp) else full_fp, f"max={max_docs}")
    return result


def describe(data_cfg) -> dict:
    """Metadata of the source to store with anything derived from it."""
    out = {"source": data_cfg.source}
    kind, _, arg = data_cfg.source.partition(":")
    if kind == "pystdlib":
        out.update(describe_pystdlib())
    elif kind in ("store", "prepared"):  # the source it was made from, when its description is readable
        path = store_files.join(arg if store_files.is_remote(arg) else os.path.expanduser(arg),
                                "index.json" if kind == "store" else "meta.json")
        try:
            out[f"{kind}_from"] = json.loads(store_files.read_bytes(path))["source"]
        except (FileNotFoundError, KeyError, ValueError):
            pass
    return out
