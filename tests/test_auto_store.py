"""The first use of a text: source writes its token store (locally or behind a URL); later uses
and concurrent first uses read that one store, with the in-memory pipeline's batches."""

import os
import threading

import fsspec
import numpy as np
import pytest

from lmjax.data import auto_store, build_tokenizer, make_pipeline, pipeline, prepare, store
from tests.test_store import KEYS, corpus_cfg, same, store_cfg

SHARD_TOKENS, BATCH_BYTES = 400, 300


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(auto_store, "SHARD_TOKENS", SHARD_TOKENS)
    monkeypatch.setattr(auto_store, "BATCH_BYTES", BATCH_BYTES)


def auto_cfg(tmp_path, store_dir=None):
    c = corpus_cfg(tmp_path)
    c.store_dir = store_dir
    return c


def in_memory_batches(c, n, split="train", batch=8):
    ref = c.copy_and_resolve_references()
    ref.store_dir = ""
    pipe = make_pipeline(ref, build_tokenizer(ref), split, batch, shuffle=split == "train")
    return [next(pipe) for _ in range(n)]


def batches(c, n, split="train", batch=8):
    pipe = make_pipeline(c, build_tokenizer(c), split, batch, shuffle=split == "train")
    return [next(pipe) for _ in range(n)]


def stores_under(root):
    return sorted(d for d in os.listdir(root) if not d.endswith(".lock"))


def test_first_use_writes_the_store_and_the_second_reads_it(tmp_path, small_shards, monkeypatch):
    c = auto_cfg(tmp_path)
    want = in_memory_batches(c, 12)  # more than an epoch
    first = batches(c, 12)
    root = os.path.join(c.cache_dir, "stores")
    (key,) = stores_under(root)
    index = store.read_index(os.path.join(root, key))
    assert len(index["splits"]["train"]["shards"]) >= 3 and index["source"]["source"] == c.source
    monkeypatch.setattr(store, "write_store", lambda *a, **k: pytest.fail("the second use wrote the store again"))
    second = batches(c, 12)
    for a, b, w in zip(first, second, want):
        assert same(a, w, KEYS["concat"]) and same(b, w, KEYS["concat"])
    assert same(batches(c, 1, "validation", 4)[0], in_memory_batches(c, 1, "validation", 4)[0], KEYS["concat"])
    data = pipeline.tokenize_split(c, "train", build_tokenizer(c), doc_ends=False)
    assert "doc_ends" not in data and data["num_docs"] == index["splits"]["train"]["num_docs"]


def test_the_key_follows_the_files_and_the_tokenizer(tmp_path):
    c = auto_cfg(tmp_path)
    tok = build_tokenizer(c)
    before = auto_store.key(c, tok)
    assert auto_store.key(c, tok) == before
    path = tmp_path / "corpus" / "doc007.txt"
    path.write_text(path.read_text() + " more")
    edited = auto_store.key(c, tok)
    gpt2 = c.copy_and_resolve_references()
    gpt2.tokenizer = "gpt2"
    assert len({before, edited, auto_store.key(gpt2, build_tokenizer(gpt2))}) == 3


def test_concurrent_first_uses_write_one_store_and_read_it(tmp_path, small_shards, monkeypatch):
    c = auto_cfg(tmp_path)
    tok = build_tokenizer(c)
    encode = type(tok).encode_batch
    writing = threading.Event()

    def slow(self, texts):  # the writer is still writing when the others arrive
        writing.set()
        threading.Event().wait(0.02)
        return encode(self, texts)

    monkeypatch.setattr(type(tok), "encode_batch", slow)
    logs, results, errors = [], {}, []

    def use(i):
        try:
            if i:
                writing.wait(10)
            directory = auto_store.ensure(c, tok, log=lambda s: logs.append((i, s)))
            results[i] = store.read_split(directory, "train", tok)["tokens"][:]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=use, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    writers = {i for i, line in logs if line.startswith("first use")}
    assert writers == {0}  # one wrote; the others waited on its lock, then read
    assert all(np.array_equal(results[i], results[0]) for i in (1, 2))
    monkeypatch.setattr(type(tok), "encode_batch", encode)
    assert np.array_equal(results[0], pipeline.tokenize_split(dict_cfg(c, ""), "train", tok)["tokens"])


def dict_cfg(c, store_dir):
    out = c.copy_and_resolve_references()
    out.store_dir = store_dir
    return out


def test_an_interrupted_first_use_leaves_no_complete_store_and_the_next_finishes_it(tmp_path, small_shards,
                                                                                    monkeypatch):
    c = auto_cfg(tmp_path)
    tok = build_tokenizer(c)
    encode, calls = type(tok).encode_batch, []

    def failing(self, texts):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed mid-shard
        return encode(self, texts)

    monkeypatch.setattr(type(tok), "encode_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        make_pipeline(c, tok, "train", 8)
    directory = os.path.join(c.cache_dir, "stores", auto_store.key(c, tok))
    assert os.path.isdir(directory) and not os.path.exists(os.path.join(directory, store.INDEX))
    with pytest.raises(store.IncompleteStoreError, match="incomplete"):
        store.read_index(directory)
    monkeypatch.setattr(type(tok), "encode_batch", encode)
    logs = []
    auto_store.ensure(c, tok, log=logs.append)  # the lock died with the interrupted writer: no wait
    assert any("resuming after" in line for line in logs)
    for got, want in zip(batches(c, 10), in_memory_batches(c, 10)):
        assert same(got, want, KEYS["concat"])


def test_a_store_behind_a_url_is_written_and_read_through_fsspec(tmp_path, small_shards):
    fs = fsspec.filesystem("memory")
    c = auto_cfg(tmp_path, store_dir="memory://lmjax-test/stores")
    try:
        want = in_memory_batches(c, 10)
        got = batches(c, 10)
        for a, b in zip(got, want):
            assert same(a, b, KEYS["concat"])
        (key,) = fs.ls("/lmjax-test/stores", detail=False)
        remote = f"memory://{key}"
        assert not os.path.exists(os.path.join(c.cache_dir, "stores"))  # nothing written locally
        # prepare --store to a URL, then train from it as store:URL, segments packing included
        explicit = "memory://lmjax-test/explicit"
        prepare.prepare_store(c, explicit, shard_tokens=SHARD_TOKENS, batch_bytes=BATCH_BYTES, log=lambda s: None)
        for packing in ("concat", "segments"):
            s = store_cfg(c, explicit)
            s.packing = packing
            ref = c.copy_and_resolve_references()
            ref.packing = packing
            for a, b in zip(batches(s, 6), in_memory_batches(ref, 6)):
                assert same(a, b, KEYS[packing])
        assert fs.cat_file(f"{remote}/train/00000.tokens") == fs.cat_file(f"{explicit}/train/00000.tokens")
        fs.rm_file(f"{explicit}/train/00001.tokens")
        with pytest.raises(store.UnreadableShardError, match="00001.tokens"):
            make_pipeline(store_cfg(c, explicit), build_tokenizer(c), "train", 8)
    finally:
        fs.rm("/lmjax-test", recursive=True)


def test_in_a_bucket_process_0_writes_and_the_others_wait_for_its_index(tmp_path, small_shards, monkeypatch):
    monkeypatch.setattr(auto_store, "POLL_SECONDS", 0.01)
    c = auto_cfg(tmp_path, store_dir="memory://lmjax-test-wait/stores")
    tok = build_tokenizer(c)
    logs, got = [], {}
    waiter = threading.Thread(target=lambda: got.update(
        one=auto_store.ensure(c, tok, log=lambda s: logs.append(("one", s)), process_index=1)))
    try:
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not fsspec.filesystem("memory").exists("/lmjax-test-wait/stores")
        got["zero"] = auto_store.ensure(c, tok, log=lambda s: logs.append(("zero", s)), process_index=0)
        waiter.join(30)
        assert not waiter.is_alive() and got["one"] == got["zero"]
        assert [who for who, line in logs if line.startswith("first use")] == ["zero"]
        assert [who for who, line in logs if line.startswith("waiting")] == ["one"]
    finally:
        fsspec.filesystem("memory").rm("/lmjax-test-wait", recursive=True)
