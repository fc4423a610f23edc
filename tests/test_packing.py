import numpy as np
import pytest

from lmjax.data import packing

EOS, PAD = 99, 98


def tokenized(doc_lengths, seed=0):
    """Documents of random tokens (< 90), each followed by EOS, as the pipeline stores them."""
    rng = np.random.default_rng(seed)
    docs = [np.r_[rng.integers(0, 90, n - 1), EOS].astype(np.int32) for n in doc_lengths]
    return docs, np.concatenate(docs), np.cumsum(doc_lengths)


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_concat_uses_every_token_once_in_order(seq_len):
    docs, tokens, ends = tokenized([5, 1, 30, 12, 8])
    packer = packing.make_packer("concat", tokens, ends, seq_len, PAD)
    b = packer.rows(np.arange(packer.num_rows))
    w = b["weights"] == 1
    assert np.array_equal(b["targets"][w], tokens[1:])
    assert np.array_equal(b["inputs"][w], tokens[:-1])
    assert np.all(b["targets"][~w] == PAD)
    # No positions or segment ids: the model's defaults give plain causal attention over the row.
    assert {k: v.dtype for k, v in b.items()} == {"inputs": np.int32, "targets": np.int32, "weights": np.float32}


def test_concat_rows_are_shifted_windows():
    _, tokens, ends = tokenized([10, 10])
    b = packing.make_packer("concat", tokens, ends, 4, PAD).rows(np.array([1]))
    assert np.array_equal(b["inputs"][0], tokens[4:8])
    assert np.array_equal(b["targets"][0], tokens[5:9])


@pytest.mark.parametrize("seq_len", [4, 16, 64])
def test_segments_keep_documents_apart_and_restart_positions(seq_len):
    lengths = [3, 40, 17, 2, 9, 64, 65, 1, 30, 5, 11]
    # Token 1000*d + j is token j of document d, so every token names where it came from.
    tokens = np.concatenate([1000 * d + np.arange(n) for d, n in enumerate(lengths)]).astype(np.int32)
    packer = packing.make_packer("segments", tokens, np.cumsum(lengths), seq_len, PAD)
    b = packer.rows(np.arange(packer.num_rows))
    targets_seen = []
    for r in range(packer.num_rows):
        seg, w = b["segment_ids"][r], b["weights"][r]
        assert np.all((seg == 0) == (w == 0))  # padding, and only padding, has weight 0
        assert np.all(b["inputs"][r][seg == 0] == PAD) and np.all(b["positions"][r][seg == 0] == 0)
        assert np.all(seg[: (seg > 0).sum()] > 0)  # padding only at the end
        for s in np.unique(seg[seg > 0]):
            inp, tgt = b["inputs"][r][seg == s], b["targets"][r][seg == s]
            assert len(set((inp // 1000).tolist() + (tgt // 1000).tolist())) == 1  # one document
            assert np.array_equal(tgt, inp + 1)  # targets are the next tokens of that document
            assert np.array_equal(np.diff(inp), np.ones(len(inp) - 1))  # contiguous, in order
            assert np.array_equal(b["positions"][r][seg == s], np.arange(len(inp)))
            assert inp[0] % 1000 % seq_len == 0  # a document restarts positions at 0 (chunks: per chunk)
            targets_seen.extend(tgt.tolist())
    every_target = [1000 * d + j for d, n in enumerate(lengths) for j in range(1, n)]
    assert sorted(targets_seen) == every_target  # each token but a document's first: a target once


def test_first_fit_decreasing_never_overflows_a_row():
    sizes = np.random.default_rng(0).integers(1, 33, 500)
    bins = packing.first_fit_decreasing(sizes, 32)
    assert np.all(np.bincount(bins, weights=sizes) <= 32)
    assert bins.max() + 1 <= int(np.ceil(sizes.sum() / 32 * 1.25))  # near the lower bound


def test_bad_packing_arguments():
    _, tokens, ends = tokenized([10])
    with pytest.raises(ValueError, match="data.seq_len must be >= 1, got 0"):
        packing.make_packer("concat", tokens, ends, 0, PAD)
    with pytest.raises(ValueError, match="unknown data.packing 'bins'"):
        packing.make_packer("bins", tokens, ends, 8, PAD)


def reference_first_fit_decreasing(sizes, capacity):
    """The plain quadratic first-fit-decreasing: scan the open bins for the first with room."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # stable, like argsort(kind="stable")
    free, bin_of = [], [0] * len(sizes)
    for item in order:
        b = next((j for j, room in enumerate(free) if room >= sizes[item]), len(free))
        if b == len(free):
            free.append(capacity)
        free[b] -= sizes[item]
        bin_of[item] = b
    return bin_of


@pytest.mark.parametrize("capacity, high, n", [(32, 33, 500), (7, 8, 300), (64, 20, 400), (16, 17, 1)])
def test_first_fit_decreasing_equals_the_quadratic_scan(capacity, high, n):
    sizes = np.random.default_rng(capacity).integers(1, high, n)
    assert packing.first_fit_decreasing(sizes, capacity).tolist() == reference_first_fit_decreasing(sizes.tolist(), capacity)
