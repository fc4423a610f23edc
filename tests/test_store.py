"""The token store: written streaming and resumably, read by slices, and the same batches as the
in-memory pipeline."""

import json
import os
import pickle

import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data import build_tokenizer, make_pipeline, pipeline, prepare, sources, store
from lmjax.train import validation

KEYS = {"concat": ("inputs", "targets", "weights"),
        "segments": ("inputs", "targets", "weights", "positions", "segment_ids")}
SHARD_TOKENS, BATCH_BYTES = 400, 300  # several shards and several tokenizer batches per shard


def corpus_cfg(tmp_path, tokenizer="byte", n_docs=60):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "naïve", "☃"]
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(n_docs):
        (corpus / f"doc{i:03d}.txt").write_text(f"doc {i}: " + " ".join(rng.choice(words, int(rng.integers(3, 40)))))
    c = default_config().data
    c.source = f"text:{corpus}/*.txt"
    c.val_fraction = 0.2
    c.tokenizer = tokenizer
    c.seq_len = 16
    c.cache_dir = str(tmp_path / "cache")
    c.store_dir = ""  # the in-memory pipeline, the reference the store must match
    return c


def store_cfg(c, directory):
    s = c.copy_and_resolve_references()
    s.source = f"store:{directory}"
    return s


@pytest.fixture(scope="module")
def byte_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    c = corpus_cfg(tmp)
    directory = str(tmp / "store")
    index = prepare.prepare_store(c, directory, shard_tokens=SHARD_TOKENS, batch_bytes=BATCH_BYTES, log=lambda s: None)
    return c, directory, index


def same(a, b, keys):
    return all(np.array_equal(a[k], b[k]) for k in keys)


def test_store_layout_and_index(byte_store):
    c, directory, index = byte_store
    assert (index["format"], index["version"], index["dtype"]) == (store.FORMAT, store.VERSION, "<u2")
    assert index["tokenizer"]["fingerprint"] == "byte-v1"
    train = index["splits"]["train"]
    assert len(train["shards"]) >= 3
    assert all(s["num_tokens"] >= SHARD_TOKENS for s in train["shards"][:-1])  # closed at the first doc end past it
    docs = sources.get_split(c, "train").documents()
    assert train["num_docs"] == len(docs) and train["num_bytes"] == sum(len(d.encode()) for d in docs)
    assert train["num_tokens"] == train["num_bytes"] + len(docs)  # byte ids + one EOS per document
    assert not any(name.endswith((".tmp", store.PROGRESS)) for _, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_store_batches_equal_the_in_memory_pipeline(byte_store, packing):
    c, directory, _ = byte_store
    c = c.copy_and_resolve_references()
    c.packing = packing
    tok = build_tokenizer(c)
    memory = make_pipeline(c, tok, "train", 8, shuffle=True)
    stored = make_pipeline(store_cfg(c, directory), tok, "train", 8, shuffle=True)
    assert (stored.rows_per_epoch, stored.num_tokens, stored.num_bytes) == (
        memory.rows_per_epoch, memory.num_tokens, memory.num_bytes)
    for _ in range(2 * memory.rows_per_epoch // 8 + 2):  # across two epoch boundaries
        assert same(next(stored), next(memory), KEYS[packing])
    v_memory, v_stored = (make_pipeline(x, tok, "validation", 4) for x in (c, store_cfg(c, directory)))
    assert same(next(v_stored), next(v_memory), KEYS[packing])


def test_resume_is_exact_across_a_change_in_the_number_of_processes(byte_store, monkeypatch):
    c, directory, _ = byte_store
    s = store_cfg(c, directory)
    tok = build_tokenizer(s)
    one = make_pipeline(s, tok, "train", 8)
    for _ in range(5):
        next(one)
    state = json.loads(json.dumps(one.get_state()))
    assert set(state) <= {"version", "batch", "epoch", "row", "rows_per_epoch", "batch_size"}
    expected = [next(one) for _ in range(3)]
    halves = [make_pipeline(s, tok, "train", 8, rows=r) for r in ((0, 4), (4, 8))]
    reads = {id(h.batch_fn.packer.tokens): [] for h in halves}  # first token of every read, per process
    read = store.StoreTokens.__getitem__
    monkeypatch.setattr(store.StoreTokens, "__getitem__", lambda self, key: reads[id(self)].append(key.start) or read(self, key))
    for h in halves:
        h.set_state(state)
    for want in expected:
        got = [next(h) for h in halves]
        for k in KEYS["concat"]:
            assert np.array_equal(np.concatenate([g[k] for g in got]), want[k])
    first, second = (set(r) for r in reads.values())
    assert len(first) == len(second) == 3 * 4 and not first & second  # each reads its own rows, once


def test_unigram_counts_and_pickled_reader(byte_store):
    c, directory, _ = byte_store
    tok = build_tokenizer(c)
    memory = pipeline.tokenize_split(c, "train", tok)
    stored = pipeline.tokenize_split(store_cfg(c, directory), "train", tok)
    assert np.array_equal(stored["counts"], np.bincount(memory["tokens"], minlength=tok.vocab_size))
    assert np.array_equal(stored["doc_ends"], memory["doc_ends"])
    from_store, from_memory = default_config(), default_config()
    from_store.data, from_memory.data = store_cfg(c, directory), c
    assert validation.unigram_entropy(from_store, tok) == pytest.approx(validation.unigram_entropy(from_memory, tok))
    tokens = pickle.loads(pickle.dumps(stored["tokens"]))  # what a grain worker gets
    assert np.array_equal(tokens[395:812], memory["tokens"][395:812])  # across shard boundaries


def test_interrupted_prepare_leaves_no_complete_store_and_resumes(tmp_path, monkeypatch):
    c = corpus_cfg(tmp_path)
    directory = str(tmp_path / "store")
    tok = build_tokenizer(c)
    calls = []
    original = type(tok).encode_batch

    def failing(self, texts):
        calls.append(len(texts))
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed mid-shard
        return original(self, texts)

    monkeypatch.setattr(type(tok), "encode_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_store(c, directory, shard_tokens=SHARD_TOKENS, batch_bytes=BATCH_BYTES, log=lambda s: None)
    assert not os.path.exists(os.path.join(directory, store.INDEX))
    with pytest.raises(store.IncompleteStoreError, match="incomplete"):
        make_pipeline(store_cfg(c, directory), tok, "train", 8)
    done = json.load(open(os.path.join(directory, "train", store.PROGRESS)))["shards"]
    assert 1 <= len(done) < 4
    monkeypatch.setattr(type(tok), "encode_batch", original)
    logs = []
    resumed = prepare.prepare_store(c, directory, shard_tokens=SHARD_TOKENS, batch_bytes=BATCH_BYTES, log=logs.append)
    assert any(f"resuming after {len(done)} finished shards" in line for line in logs)
    fresh = prepare.prepare_store(c, str(tmp_path / "fresh"), shard_tokens=SHARD_TOKENS, batch_bytes=BATCH_BYTES,
                                  log=lambda s: None)
    assert resumed == fresh
    for shard in fresh["splits"]["train"]["shards"]:
        for ext in (".tokens", ".ends"):
            a, b = (open(os.path.join(d, "train", shard["name"] + ext), "rb").read() for d in (directory, str(tmp_path / "fresh")))
            assert a == b


def test_bad_stores_are_named_errors(tmp_path, byte_store):
    c, directory, _ = byte_store
    gpt2 = store_cfg(c, directory)
    gpt2.tokenizer = "gpt2"
    with pytest.raises(store.TokenizerMismatchError, match="written with tokenizer 'byte'"):
        make_pipeline(gpt2, build_tokenizer(gpt2), "train", 8)
    copy = tmp_path / "copy"
    os.system(f"cp -r {directory} {copy}")
    s, tok = store_cfg(c, copy), build_tokenizer(c)
    index = json.loads((copy / store.INDEX).read_text())
    (copy / store.INDEX).write_text(json.dumps(dict(index, version=0)))
    with pytest.raises(store.StoreFormatError, match="version 0"):
        make_pipeline(s, tok, "train", 8)
    (copy / store.INDEX).write_text(json.dumps(index))
    shard = copy / "train" / "00001.tokens"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(store.UnreadableShardError, match="00001.tokens"):
        make_pipeline(s, tok, "train", 8)
    shard.unlink()
    with pytest.raises(store.UnreadableShardError, match="00001.tokens"):
        make_pipeline(s, tok, "train", 8)
    with pytest.raises(store.IncompleteStoreError, match="no token store"):
        make_pipeline(store_cfg(c, tmp_path / "nowhere"), tok, "train", 8)
    c2 = c.copy_and_resolve_references()
    c2.source = c.source.replace("*.txt", "doc00*.txt")
    with pytest.raises(store.StoreError, match="already holds a store of another source"):
        prepare.prepare_store(c2, directory, log=lambda s: None)
    c2.source = f"text:{tmp_path}/nothing-*.txt"
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.txt.*matched no files"):
        prepare.prepare_store(c2, str(tmp_path / "none"), log=lambda s: None)


def test_gpt2_store_streams_documents_without_loading_the_split(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "hello.txt").write_text("Hello world")
    (tmp_path / "a" / "other.txt").write_text("def f(x):\n    return x\n")
    c = default_config().data
    c.source, c.tokenizer, c.val_fraction = f"text:{tmp_path}/a/*.txt", "gpt2", 0.0
    monkeypatch.setattr(sources.Split, "documents", lambda self: pytest.fail("the split was loaded whole"))
    index = prepare.prepare_store(c, str(tmp_path / "store"), log=lambda s: None)
    assert index["dtype"] == "<u2" and index["tokenizer"]["vocab_size"] == 50257
    tokens = np.fromfile(tmp_path / "store" / "train" / "00000.tokens", "<u2")
    assert tokens[:3].tolist() == [15496, 995, 50256]  # "Hello world", then EOS


def test_sentencepiece_store_keeps_its_model(tmp_path):
    c = corpus_cfg(tmp_path, tokenizer="sentencepiece")
    c.vocab_size = 300
    directory = tmp_path / "store"
    prepare.prepare_store(c, str(directory), log=lambda s: None)
    trained = build_tokenizer(c)
    from_store = build_tokenizer(store_cfg(c, directory))  # DIR/tokenizer.model, no training
    assert from_store.fingerprint == trained.fingerprint
    assert next(make_pipeline(store_cfg(c, directory), from_store, "train", 2))["inputs"].shape == (2, 16)
