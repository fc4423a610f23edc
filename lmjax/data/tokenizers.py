"""Tokenizers: one small interface (`Tokenizer`) over SentencePiece, bytes, characters and the
pretrained ones of pretrained_tokenizers.py.

`build_tokenizer(data_cfg)` picks one by `data_cfg.tokenizer`:
  gpt2           GPT-2's byte-level BPE (tiktoken r50k_base, 50,257 ids).
  <path>.json    a Hugging Face tokenizer.json (a Llama tokenizer as is).
  <path>.model   an existing SentencePiece model.
  sentencepiece  loads `data_cfg.tokenizer_path` if set (or `<dir>/tokenizer.model` of a
                 `prepared:<dir>` source), else trains BPE/unigram on the train split and caches the
                 model under `cache_dir/tokenizers/` keyed by a hash of (corpus, settings).
  byte           the 256 byte values, then pad, bos, eos.
  char           the corpus's own characters in sorted order (nanoGPT's shakespeare_char ids), then eos.

SentencePiece settings, chosen so that any text (code included) round-trips exactly:
  normalization_rule_name="identity" and remove_extra_whitespaces=False (the defaults NFKC-fold
  characters and collapse spaces), byte_fallback=True (unseen characters become byte pieces instead
  of <unk>), allow_whitespace_only_pieces=True (indentation runs become single pieces such as
  8 spaces; without it every space of indentation is one token: on pystdlib it raises bytes/token
  from 1.88 to 3.28), "\n" as a user-defined symbol (the trainer reads one line per sentence so
  it never sees newlines; as a symbol it is one piece even with byte_fallback off), and
  add_dummy_prefix=False (no "▁" glued to the start of each encoded text: a line starts the same
  way in training sentences and in documents; 3.31 bytes/token on pystdlib validation, vocab 4096).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm
from etils import epath

from lmjax import fileio
from lmjax.data import pretrained_tokenizers, sources

SPM_PAD, SPM_UNK, SPM_BOS, SPM_EOS = 0, 1, 2, 3
TOKENIZERS = ("sentencepiece", "byte", "char", "gpt2")  # or a path to a .json / .model file
TOKENIZER_FILES = (".json", ".model")
SPM_MODEL_TYPES = ("bpe", "unigram")


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline, trainer and sampler need from a tokenizer. Absent special ids are -1."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    fingerprint: str  # identifies the id mapping, for caches of token ids

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special ids): bits per byte counts the bytes of
        exactly the tokens evaluated."""
        ...


class SentencePieceTokenizer:
    def __init__(self, model_proto: bytes, num_threads: int = -1):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.num_threads = num_threads
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id = self.processor.pad_id()
        self.fingerprint = "spm-" + hashlib.sha256(model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> "SentencePieceTokenizer":
        path = os.path.expanduser(path)  # local or gs:// (a tokenizer pinned in a bucket workdir)
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"data.tokenizer_path {path!r} does not exist")
        return cls(epath.Path(path).read_bytes())

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # SentencePiece's batch encode runs in C++ threads (num_threads=-1: all cores).
        return self.processor.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        p, out = self.processor, np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if p.is_byte(i):
                out[i] = 1
            elif not (p.is_control(i) or p.is_unknown(i) or p.is_unused(i)):
                out[i] = len(p.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))  # the piece's text
        return out

    def save(self, path: str) -> None:
        fileio.write_atomic(path, self.model_proto)  # concurrent runs never read half a cached model


class ByteTokenizer:
    """UTF-8 bytes; ids 0..255 are the byte values."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return (np.arange(self.vocab_size) < 256).astype(np.int64)


class CharTokenizer:
    """One id per character of the corpus (sorted), then EOS: with no other specials the ids of a
    single-document corpus are exactly nanoGPT's shakespeare_char ids."""

    def __init__(self, chars: Sequence[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.eos_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self.bos_id = self.pad_id = -1
        digest = hashlib.sha256("".join(self.chars).encode("utf-8", "surrogatepass")).hexdigest()
        self.fingerprint = "char-" + digest[:16]

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"char tokenizer: character {e.args[0]!r} is not in its vocabulary") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids if 0 <= i < len(self.chars))

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars] + [0], np.int64)


def cache_dir(data_cfg) -> str:
    path = data_cfg.get("cache_dir", None) or os.path.join("~", ".cache", "lmjax")
    return os.path.expanduser(path)


def training_sentences(docs: Sequence[str], max_sentences: int) -> list[str]:
    """Non-blank lines of the corpus, an evenly spaced subset of at most `max_sentences`: the cap
    keeps tokenizer training to seconds while still seeing every part of the corpus."""
    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    if len(lines) > max_sentences:
        picks = np.linspace(0, len(lines) - 1, max_sentences).astype(np.int64)
        lines = [lines[i] for i in picks]
    return lines


def spm_settings(data_cfg) -> dict:
    if data_cfg.spm_model_type not in SPM_MODEL_TYPES:
        raise ValueError(f"data.spm_model_type must be one of {SPM_MODEL_TYPES}, got {data_cfg.spm_model_type!r}")
    return dict(
        vocab_size=int(data_cfg.vocab_size),
        model_type=data_cfg.spm_model_type,
        character_coverage=float(data_cfg.character_coverage),
        byte_fallback=bool(data_cfg.byte_fallback),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        pad_id=SPM_PAD,
        unk_id=SPM_UNK,
        bos_id=SPM_BOS,
        eos_id=SPM_EOS,
        max_sentence_length=16384,
    )


def train_sentencepiece(docs: Sequence[str], data_cfg) -> SentencePieceTokenizer:
    settings = spm_settings(data_cfg)
    sentences = training_sentences(docs, int(data_cfg.tokenizer_max_sentences))
    if not sentences:
        raise ValueError(f"data.source {data_cfg.source!r}: no text to train a tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as e:
        problem = "too small" if "smaller than required_chars" in str(e) else "too large"
        raise ValueError(
            f"data.vocab_size={data_cfg.vocab_size} is {problem} for the train split of data.source "
            f"{data_cfg.source!r} ({len(sentences)} lines); SentencePiece said: {e}"
        ) from e
    return SentencePieceTokenizer(model.getvalue())


def _spm_cache_path(data_cfg, train_fingerprint: str) -> str:
    key = json.dumps(
        [train_fingerprint, spm_settings(data_cfg), int(data_cfg.tokenizer_max_sentences), spm.__version__],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(data_cfg), "tokenizers", f"spm-{digest}.model")


def _prepared_model(data_cfg) -> str | None:
    """`<dir>/tokenizer.model` of a `prepared:<dir>` source, if it was trained with the settings
    `data_cfg` asks for."""
    kind, _, arg = data_cfg.source.partition(":")
    if kind != "prepared":
        return None
    directory = os.path.expanduser(arg)
    path = os.path.join(directory, "tokenizer.model")
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            trained_with = json.load(f).get("tokenizer_settings")
    except FileNotFoundError:
        return None
    wanted = json.loads(json.dumps(spm_settings(data_cfg)))
    return path if os.path.isfile(path) and trained_with == wanted else None


def check_name(kind: str) -> None:
    if kind not in TOKENIZERS and not kind.endswith(TOKENIZER_FILES):
        raise ValueError(
            f"unknown data.tokenizer {kind!r}: expected one of {TOKENIZERS}, or the path of a Hugging Face "
            f"tokenizer.json or a SentencePiece .model"
        )


def build_tokenizer(data_cfg, *, verbose: bool = False, use_prepared: bool = True) -> Tokenizer:
    """The tokenizer `data_cfg` asks for, trained on (and cached for) its train split if needed."""
    kind = data_cfg.tokenizer
    check_name(kind)
    if kind == "gpt2":
        return pretrained_tokenizers.TiktokenTokenizer()
    if kind.endswith(".json"):
        return pretrained_tokenizers.HuggingFaceTokenizer(kind)
    if kind.endswith(".model"):
        return SentencePieceTokenizer.load(kind)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars: set[str] = set()
        for split in sources.SPLITS:
            for doc in sources.get_split(data_cfg, split).documents():
                chars.update(doc)
        return CharTokenizer(sorted(chars))
    if data_cfg.get("tokenizer_path", None):
        return SentencePieceTokenizer.load(data_cfg.tokenizer_path)
    source_kind, _, source_dir = data_cfg.source.partition(":")
    if source_kind == "store":  # tokenized already: the model it was tokenized with
        return SentencePieceTokenizer.load(os.path.join(os.path.expanduser(source_dir), "tokenizer.model"))
    prepared = _prepared_model(data_cfg) if use_prepared else None
    if prepared:
        return SentencePieceTokenizer.load(prepared)
    train = sources.get_split(data_cfg, "train")
    path = _spm_cache_path(data_cfg, train.fingerprint)
    if os.path.isfile(path):
        return SentencePieceTokenizer.load(path)
    start = time.perf_counter()
    tokenizer = train_sentencepiece(train.documents(), data_cfg)
    tokenizer.save(path)
    if verbose:
        print(f"trained SentencePiece ({data_cfg.vocab_size}) in {time.perf_counter() - start:.1f}s -> {path}")
    return tokenizer
