import json

import grain
import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data import build_tokenizer, make_pipeline, pipeline

KEYS = ("inputs", "targets", "weights")  # concat packing; segments adds positions and segment_ids


def corpus_cfg(tmp_path, n_docs=40, tokenizer="byte", packing="concat", seq_len=16):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(words, int(rng.integers(3, 30))))
        (corpus / f"doc{i:03d}.txt").write_text(f"doc {i}: {text}\n")
    c = default_config().data
    c.source = f"text:{corpus}/*.txt"
    c.val_fraction = 0.25
    c.tokenizer = tokenizer
    c.vocab_size = 300  # byte fallback alone takes 256 + specials
    c.packing = packing
    c.seq_len = seq_len
    c.cache_dir = str(tmp_path / "cache")
    return c


def make(c, batch_size=8, **kw):
    return make_pipeline(c, build_tokenizer(c), "train", batch_size, **kw)


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


def test_batches_have_the_contract_shapes_and_dtypes(tmp_path):
    p = make(corpus_cfg(tmp_path), batch_size=8)
    b = next(p)
    assert set(b) == set(KEYS)
    assert all(b[k].shape == (8, 16) for k in KEYS)
    assert [b[k].dtype for k in KEYS] == [np.int32, np.int32, np.float32]
    assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


@pytest.mark.parametrize("packing", ["concat", "segments"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_gives_the_same_batches_across_an_epoch_boundary(tmp_path, packing, shuffle):
    c = corpus_cfg(tmp_path, packing=packing)
    ref = make(c, batch_size=8, shuffle=shuffle)
    rows = ref.rows_per_epoch
    assert rows % 8  # so one batch straddles the epoch boundary
    expected = [next(ref) for _ in range(2 * rows // 8 + 3)]
    for k in (1, rows // 8, rows // 8 + 1):  # inside epoch 0, the straddling batch, just after it
        p = make(c, batch_size=8, shuffle=shuffle)
        for _ in range(k):
            next(p)
        state = json.loads(json.dumps(p.get_state()))
        resumed = make(c, batch_size=8, shuffle=shuffle)
        resumed.set_state(state)
        for want in expected[k : k + rows // 8 + 2]:
            assert same(next(resumed), want)
    assert ref.get_state()["epoch"] >= 2


def test_each_epoch_is_a_new_permutation_of_all_rows(tmp_path):
    p = make(corpus_cfg(tmp_path), batch_size=1, shuffle=True)
    rows = p.rows_per_epoch
    epochs = [[next(p)["inputs"][0].tobytes() for _ in range(rows)] for _ in range(2)]
    all_rows = p.batch_fn.packer.rows(np.arange(rows))["inputs"]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(r.tobytes() for r in all_rows)
    assert epochs[0] != epochs[1]
    fresh = pipeline.BatchFn(p.batch_fn.packer, 1, (0, 1), (0, 0), True)  # a pure function of (seed, epoch, index)
    assert [fresh(rows + i)["inputs"][0].tobytes() for i in range(rows)] == epochs[1]


def test_order_depends_on_both_seeds_and_unshuffled_is_in_order(tmp_path):
    c = corpus_cfg(tmp_path)
    firsts = [next(make(c, shuffle=True, seed=s))["inputs"] for s in (0, 0, 1)]
    assert np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[0], firsts[2])
    c.seed = 5
    assert not np.array_equal(next(make(c, shuffle=True, seed=0))["inputs"], firsts[0])
    p = make(c, shuffle=False)
    assert same(next(p), p.batch_fn.packer.rows(np.arange(8)))


def test_processes_read_their_rows_of_the_global_batch(tmp_path):
    c = corpus_cfg(tmp_path)
    whole = make(c, batch_size=8, shuffle=True)
    parts = [make(c, batch_size=8, shuffle=True, rows=(2 * i, 2 * i + 2)) for i in range(4)]
    replica = make(c, batch_size=8, shuffle=True, rows=(2, 4))  # a host holding copies of part 1's rows
    for _ in range(5):
        g = next(whole)
        local = [next(p) for p in parts]
        assert all(b["inputs"].shape == (2, 16) for b in local)
        for k in KEYS:
            assert np.array_equal(np.concatenate([b[k] for b in local]), g[k])
        assert same(next(replica), local[1])
    with pytest.raises(ValueError, match=r"rows=\(6, 10\) is not a part of a batch of 8 rows"):
        make(c, batch_size=8, rows=(6, 10))


def test_validation_is_unshuffled_and_repeats_the_same_fixed_set(tmp_path):
    c = corpus_cfg(tmp_path)
    tok = build_tokenizer(c)
    first = [next(make_pipeline(c, tok, "validation", 4)) for _ in range(2)]
    again = make_pipeline(c, tok, "validation", 4)
    assert same(next(again), first[0])
    v = make_pipeline(c, tok, "validation", 4)
    for _ in range(3 * v.rows_per_epoch):  # wraps around, never stops
        next(v)


def test_num_tokens_and_bytes_per_token(tmp_path):
    c = corpus_cfg(tmp_path)
    from lmjax.data import sources

    docs = sources.get_split(c, "train").documents()
    p = make(c)
    nbytes = sum(len(d.encode()) for d in docs)
    assert p.num_tokens == nbytes + len(docs)  # byte tokens + one EOS per document
    assert p.bytes_per_token == pytest.approx(nbytes / (nbytes + len(docs)))


def test_tokenized_split_is_cached(tmp_path, monkeypatch):
    c = corpus_cfg(tmp_path, tokenizer="sentencepiece")
    tok = build_tokenizer(c)
    first = next(make_pipeline(c, tok, "train", 8))

    def fail(texts):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(tok, "encode_batch", fail)
    assert same(next(make_pipeline(c, tok, "train", 8)), first)


def test_state_from_another_dataset_is_rejected(tmp_path):
    c = corpus_cfg(tmp_path)
    state = make(c).get_state()
    c.seq_len = 8
    with pytest.raises(ValueError, match="rows_per_epoch"):
        make(c).set_state(state)


def test_bad_inputs_are_clear_errors(tmp_path):
    c = corpus_cfg(tmp_path)
    c.seq_len = 0
    with pytest.raises(ValueError, match="data.seq_len must be >= 1, got 0"):
        make(c)
    c = corpus_cfg(tmp_path, seq_len=100_000)
    with pytest.raises(ValueError, match="too few for one row of data.seq_len=100000"):
        make(c)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    c.source = f"text:{tmp_path}/blank/*.txt"
    c.val_fraction = 0.0
    with pytest.raises(ValueError, match="has no documents in split 'train'"):
        make(c)


def test_pystdlib_pipeline_records_the_python_version(tmp_path):
    import sys

    c = default_config().data
    c.tokenizer = "byte"
    c.max_documents = 3  # the real corpus, cut short to keep the test fast
    c.cache_dir = str(tmp_path / "cache")
    p = make(c, batch_size=2)
    assert p.info["python_version"] == sys.version.split()[0] and p.info["documents"] == 3
    assert next(p)["inputs"].shape == (2, c.seq_len)


def test_the_shuffle_never_holds_a_permutation_of_all_rows():
    class Rows:  # 10^12 rows: a permutation of them would need 8 TB
        num_rows, seq_len = 10**12, 4

        def rows(self, indices):
            return {"rows": indices}

    fn = pipeline.BatchFn(Rows(), 64, (0, 64), (0, 0), True)
    last = Rows.num_rows // 64 - 1  # the last batch of epoch 0, then the first of epoch 1
    got = [fn(b)["rows"] for b in (0, 1, last, last + 1)]
    assert all(((0 <= r) & (r < Rows.num_rows)).all() for r in got)
    assert len(np.unique(np.concatenate(got[:3]))) == 3 * 64  # a bijection within an epoch
    assert not np.array_equal(got[0], got[3])  # epoch 1 is another order
    assert np.array_equal(pipeline.BatchFn(Rows(), 64, (32, 64), (0, 0), True)(1)["rows"], got[1][32:])
    grain_order = grain.MapDataset.range(Rows.num_rows).shuffle(seed=fn.shuffle_seed())  # grain's global shuffle
    assert [grain_order[int(k)] for k in (0, 65, last * 64 + 3, (last + 1) * 64 + 5)] == [
        int(got[0][0]), int(got[1][1]), int(got[2][3]), int(got[3][5])]


def test_prefetch_threads_serve_the_same_batches_and_resume(tmp_path):
    c = corpus_cfg(tmp_path)
    plain = make(c, batch_size=4, shuffle=True)
    want = [next(plain) for _ in range(8)]
    c.prefetch_threads = 3
    ahead = make(c, batch_size=4, shuffle=True)
    got = [next(ahead) for _ in range(4)]
    resumed = make(c, batch_size=4, shuffle=True)
    resumed.set_state(json.loads(json.dumps(ahead.get_state())))
    got += [next(resumed) for _ in range(4)]
    ahead.close()
    resumed.close()
    assert all(same(a, b) for a, b in zip(got, want))
