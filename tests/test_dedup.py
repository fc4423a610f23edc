import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data import dedup, filters


def random_doc(rng, n_words=300, vocab=5000):
    return " ".join(f"w{i}" for i in rng.integers(0, vocab, n_words))


def test_exact_dedup_removes_copies_up_to_case_and_whitespace():
    docs = ["Hello  world\n", "other", "hello world", "HELLO\tWORLD ", "other", "third"]
    assert dedup.exact_duplicates(docs).tolist() == [False, False, True, True, True, False]


@pytest.mark.parametrize("overlap", [0, 100, 250, 400, 500])
def test_minhash_estimates_known_jaccard_within_its_error(overlap):
    num_perm = 256
    words = [f"t{i}" for i in range(1000)]
    a = " ".join(words[:500])
    b = " ".join(words[500 - overlap : 1000 - overlap])
    jaccard = overlap / (1000 - overlap)  # shingle_size 1: the sets are the words
    sig = dedup.minhash_signatures([a, b], num_perm=num_perm, shingle_size=1)
    estimate = dedup.estimated_jaccard(sig[0], sig[1])
    sigma = np.sqrt(jaccard * (1 - jaccard) / num_perm)
    assert abs(estimate - jaccard) <= 4 * sigma + 1e-9


def test_minhash_error_shrinks_like_one_over_sqrt_num_perm():
    rng = np.random.default_rng(0)
    base = [f"t{i}" for i in range(2000)]
    pairs = []
    for _ in range(40):
        order = rng.permutation(2000)
        pairs.append((" ".join(base[i] for i in order[:1200]), " ".join(base[i] for i in order[800:])))
    truth = [len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split())) for a, b in pairs]
    for num_perm in (64, 256):
        sig = dedup.minhash_signatures([d for p in pairs for d in p], num_perm=num_perm, shingle_size=1,
                                       seed=1)
        errors = [dedup.estimated_jaccard(sig[2 * i], sig[2 * i + 1]) - t for i, t in enumerate(truth)]
        expected = np.sqrt(np.mean([t * (1 - t) for t in truth]) / num_perm)
        assert 0.5 * expected < np.sqrt(np.mean(np.square(errors))) < 1.6 * expected


def test_lsh_finds_planted_near_duplicates_and_keeps_distinct_documents():
    rng = np.random.default_rng(0)
    originals = [random_doc(rng) for _ in range(60)]
    docs = list(originals)
    planted = {}
    for src in range(0, 60, 6):  # near-copies: 3 of 300 words changed (Jaccard of 5-grams ~0.9)
        words = originals[src].split()
        for i in rng.choice(len(words), 3, replace=False):
            words[i] = "edited"
        planted[len(docs)] = src
        docs.append(" ".join(words))
    sig = dedup.minhash_signatures(docs, num_perm=128, shingle_size=5)
    near = dedup.near_duplicates(sig, bands=16, threshold=0.8)
    assert np.flatnonzero(near).tolist() == sorted(planted)


def test_lsh_rejects_bands_that_do_not_divide_num_perm():
    sig = np.zeros((2, 128), np.uint32)
    with pytest.raises(ValueError, match="num_perm=128 is not divisible by data.clean.bands=10"):
        dedup.near_duplicates(sig, bands=10, threshold=0.8)


def test_short_documents_still_get_signatures():
    sig = dedup.minhash_signatures(["a b", "a b", "c"], num_perm=32, shingle_size=5)
    assert np.array_equal(sig[0], sig[1]) and not np.array_equal(sig[0], sig[2])


def test_quality_filters_each_catch_their_kind_of_document():
    clean = default_config().data.clean
    rng = np.random.default_rng(0)
    good = random_doc(rng, 100) + "\n" + random_doc(rng, 100)
    assert filters.first_failure(good, clean) is None
    assert filters.first_failure("tiny", clean) == "too_short"
    assert filters.first_failure("x" * (clean.max_chars + 1), clean) == "too_long"
    assert filters.first_failure("\n".join(["same line here"] * 10 + [good]), clean) == "repeated_lines"
    assert filters.first_failure("buy now cheap " * 50, clean) == "repeated_ngrams"
    assert filters.first_failure("<<>>{{}}##@@" * 20 + good[:50], clean) == "non_alnum"
    assert filters.repeated_line_ratio("a\nb\na\n\n") == pytest.approx(1 / 3)
    assert filters.non_alnum_ratio("ab!!") == 0.5
