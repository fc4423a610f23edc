"""Duplicate removal: exact (hash of normalized text) and near (MinHash signatures + LSH banding).

MinHash: a document is the set of its word n-grams ("shingles"). For a random hash h, the chance
that min h(A) == min h(B) is the Jaccard similarity |A & B| / |A | B|, so the share of equal entries
in two signatures of `num_perm` such minima estimates it with standard error sqrt(J(1-J)/num_perm).
LSH: signatures are cut into `bands` bands of `rows` values; documents whose band agrees exactly in
any band become candidates (probability 1 - (1 - J^rows)^bands, a steep S-curve), and candidates are
kept as duplicates only if their estimated Jaccard reaches the threshold.

Everything after splitting text into words is numpy: words get stable 64-bit ids (blake2b of each
distinct word), shingles combine n ids by multiply-add in wrapping uint64 arithmetic, and the
`num_perm` hash functions are multiply-shift hashes applied to all shingles of a chunk at once.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_SHINGLE_MULT = np.uint64(0x9E3779B97F4A7C15)


def normalize(text: str) -> str:
    """Case and whitespace do not make a document new."""
    return _SPACE.sub(" ", text.lower()).strip()


def exact_duplicates(docs: Sequence[str]) -> np.ndarray:
    """Boolean mask of documents whose normalized text already occurred earlier."""
    seen: set[bytes] = set()
    dup = np.zeros(len(docs), bool)
    for i, doc in enumerate(docs):
        digest = hashlib.blake2b(normalize(doc).encode("utf-8", "surrogatepass"), digest_size=16).digest()
        dup[i] = digest in seen
        seen.add(digest)
    return dup


def _word_ids(words: list[str]) -> np.ndarray:
    """A stable 64-bit id per word (hashing each distinct word once)."""
    index = {w: i for i, w in enumerate(dict.fromkeys(words))}
    inverse = np.fromiter(map(index.__getitem__, words), np.int64, len(words))
    ids = np.array(
        [int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
         for w in index],
        dtype=np.uint64,
    )
    return ids[inverse]


def shingle_hashes(docs: Sequence[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word n-gram of every document, document index of each). A document
    shorter than n words is one shingle of all its words."""
    per_doc = [_WORD.findall(doc.lower()) for doc in docs]
    counts = np.array([len(w) for w in per_doc], np.int64)
    if not counts.sum():
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    ids = _word_ids([w for words in per_doc for w in words])
    doc_of_word = np.repeat(np.arange(len(docs)), counts)
    n = shingle_size
    with np.errstate(over="ignore"):
        h = ids.copy()
        for j in range(1, n):  # fold in word k + j if it belongs to the same document as word k
            same_doc = doc_of_word[j:] == doc_of_word[:-j]
            h[:-j] = np.where(same_doc, h[:-j] * _SHINGLE_MULT + ids[j:], h[:-j])
    # A shingle starting at word k is kept if word k + n - 1 is in the same document, or if k is
    # the first word of a document shorter than n (its one shingle is all its words).
    first = np.cumsum(counts) - counts
    k = np.arange(len(ids))
    last = np.minimum(k + n - 1, len(ids) - 1)
    valid = doc_of_word[last] == doc_of_word
    short = (counts[doc_of_word] < n) & (k == first[doc_of_word])
    return h[valid | short], doc_of_word[valid | short]


def minhash_signatures(
    docs: Sequence[str], num_perm: int = 128, shingle_size: int = 5, seed: int = 0,
    chunk: int = 1 << 12,
) -> np.ndarray:
    """uint32 [len(docs), num_perm] MinHash signatures (all-max for a document with no words)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**64, num_perm, dtype=np.uint64)
    sig = np.full((len(docs), num_perm), np.iinfo(np.uint32).max, np.uint32)
    hashes, doc_of = shingle_hashes(docs, shingle_size)
    for s in range(0, len(hashes), chunk):
        h, d = hashes[s : s + chunk], doc_of[s : s + chunk]
        with np.errstate(over="ignore"):
            values = ((h[:, None] * a + b) >> np.uint64(32)).astype(np.uint32)
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        mins = np.minimum.reduceat(values, starts, axis=0)
        sig[d[starts]] = np.minimum(sig[d[starts]], mins)
    return sig


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def near_duplicates(signatures: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """Boolean mask of documents that are near-duplicates of an earlier one (LSH candidates with
    estimated Jaccard >= threshold). Within an LSH bucket each document is compared with the
    bucket's earliest member; documents are grouped with union-find and the earliest is kept."""
    n, num_perm = signatures.shape
    if num_perm % bands:
        raise ValueError(f"data.clean.num_perm={num_perm} is not divisible by data.clean.bands={bands}")
    rows = num_perm // bands
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    weights = np.random.default_rng(1).integers(0, 2**64, rows, dtype=np.uint64) | np.uint64(1)
    for band in range(bands):
        block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (block * weights).sum(axis=1)
        _, first_index, inverse = np.unique(keys, return_index=True, return_inverse=True)
        leader = first_index[inverse.reshape(-1)]
        for i in np.flatnonzero(leader != np.arange(n)):
            j = leader[i]
            if np.array_equal(block[i], block[j]) and estimated_jaccard(signatures[i], signatures[j]) >= threshold:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)])
    return roots != np.arange(n)
