"""Tokenizers made elsewhere, used as they are: GPT-2's byte-level BPE and any Hugging Face
`tokenizer.json` (a Llama or Mistral tokenizer, say).

  gpt2            tiktoken's `r50k_base`: GPT-2's 50,257 ids, `<|endoftext|>` = 50256 is EOS.
                  tiktoken downloads its BPE file once (or reads it from $TIKTOKEN_CACHE_DIR).
  <path>.json     the Hugging Face `tokenizers` library (the `hf` extra). EOS, BOS and PAD are the
                  first special tokens found under their usual names.

Both encode text as text: a document containing "<|endoftext|>" is not cut there (tiktoken's
`encode_ordinary`, tokenizers' `encode_special_tokens`), so only the pipeline decides where
documents end.
Batches are encoded in the libraries' native threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Sequence

import numpy as np

GPT2_ENCODING = "r50k_base"
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _threads() -> int:
    return max(os.cpu_count() or 1, 1)


class TiktokenTokenizer:
    """A tiktoken encoding (GPT-2's by default); ids are the encoding's own."""

    def __init__(self, name: str = GPT2_ENCODING):
        import tiktoken

        try:
            self.encoding = tiktoken.get_encoding(name)
        except Exception as e:  # no network and no cached BPE file: say where tiktoken looks
            raise ValueError(
                f"tiktoken could not load encoding {name!r} ({type(e).__name__}: {e}); it downloads its "
                f"BPE file on first use, or reads it from $TIKTOKEN_CACHE_DIR"
            ) from e
        self.vocab_size = self.encoding.n_vocab
        self.eos_id = self.encoding.eot_token
        self.bos_id = self.pad_id = -1
        ranks = self.encoding._mergeable_ranks  # the BPE itself: the ids are a function of it
        digest = hashlib.sha256(self.encoding._pat_str.encode())
        for piece, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            digest.update(rank.to_bytes(4, "little") + len(piece).to_bytes(2, "little") + piece)
        self.fingerprint = f"tiktoken-{name}-{digest.hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=_threads())

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.eos_id])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int64)
        for piece, rank in self.encoding._mergeable_ranks.items():
            out[rank] = len(piece)
        return out


class HuggingFaceTokenizer:
    """A `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as e:
            raise ValueError(
                f"data.tokenizer={path!r} needs the Hugging Face tokenizers library: pip install 'lmjax[hf]'"
            ) from e
        from etils import epath

        path = os.path.expanduser(path)
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"data.tokenizer {path!r} does not exist")
        text = epath.Path(path).read_text()
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise ValueError(f"data.tokenizer {path!r} is not a Hugging Face tokenizer.json: {e}") from e
        self.tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a document is text
        self.spec = json.loads(text)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special = {t["id"] for t in self.spec.get("added_tokens", []) if t.get("special")}
        self.eos_id, self.bos_id, self.pad_id = (self._first_id(names) for names in (EOS_NAMES, BOS_NAMES, PAD_NAMES))
        self.fingerprint = "hf-" + hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def _first_id(self, names: Sequence[str]) -> int:
        for name in names:
            i = self.tokenizer.token_to_id(name)
            if i is not None:
                return int(i)
        return -1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

    def _byte_level(self) -> bool:
        """GPT-2-style byte-level BPE writes each byte as one printable character."""
        def types(node) -> list[str]:
            if not node:
                return []
            return [node.get("type", "")] + [t for child in node.get("decoders", []) for t in types(child)]

        return "ByteLevel" in types(self.spec.get("decoder"))

    def token_bytes(self) -> np.ndarray:
        """Bytes per id: characters of a byte-level piece; a `<0xNN>` byte-fallback piece is one byte;
        otherwise the piece's UTF-8 with "▁" as a space; special tokens 0."""
        byte_level = self._byte_level()
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = self.tokenizer.id_to_token(i)
            if piece is None or i in self.special:
                continue
            if byte_level:
                out[i] = len(piece)
            elif _BYTE_PIECE.match(piece):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out
