import os
import shutil

import pytest

from lmjax.config import default_config
from lmjax.data import build_tokenizer, tokenizers
from lmjax.data import sources

TRICKY = "def f(x):\n\tif x:  # naïve ☃ 日本語\n        return  x\n\n\n    \r\n  trailing   \n"


def code_corpus(tmp_path, n_files=12):
    """A small real corpus: a few stdlib modules copied as .txt files."""
    root = sources.pystdlib_root()
    files = [f for f in sources.pystdlib_files() if 4000 < os.path.getsize(os.path.join(root, f)) < 20000]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, f in enumerate(files[:n_files]):
        shutil.copyfile(os.path.join(root, f), corpus / f"{i}.txt")
    c = default_config().data
    c.source = f"text:{corpus}/*.txt"
    c.val_fraction = 0.0
    c.vocab_size = 400
    c.cache_dir = str(tmp_path / "cache")
    return c


def test_sentencepiece_round_trips_code_and_unseen_characters(tmp_path):
    c = code_corpus(tmp_path)
    tok = build_tokenizer(c)
    assert isinstance(tok, tokenizers.Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (400, 0, 2, 3)
    for doc in sources.get_split(c, "train").documents()[:3] + [TRICKY]:
        assert tok.decode(tok.encode(doc)) == doc
    assert tok.encode_batch([TRICKY, "x"]) == [tok.encode(TRICKY), tok.encode("x")]


def test_sentencepiece_indentation_and_newline_are_single_pieces(tmp_path):
    tok = build_tokenizer(code_corpus(tmp_path))
    assert len(tok.encode("\n")) == 1
    # 8 spaces of indentation cost far fewer tokens than 8 (one per space without
    # allow_whitespace_only_pieces).
    assert len(tok.encode("        return")) <= 3


def test_sentencepiece_is_cached_and_not_retrained(tmp_path, monkeypatch):
    c = code_corpus(tmp_path)
    first = build_tokenizer(c)
    models = os.listdir(tmp_path / "cache" / "tokenizers")
    assert len(models) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizers, "train_sentencepiece", fail)
    second = build_tokenizer(c)
    assert second.fingerprint == first.fingerprint
    c.vocab_size = 300  # other settings: another cache entry, so training is needed
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer(c)


def test_tokenizer_path_loads_an_existing_model(tmp_path):
    c = code_corpus(tmp_path)
    trained = build_tokenizer(c)
    path = str(tmp_path / "mine.model")
    trained.save(path)
    c2 = default_config().data
    c2.tokenizer_path = path
    assert build_tokenizer(c2).encode(TRICKY) == trained.encode(TRICKY)
    c2.tokenizer_path = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer(c2)


def test_vocab_size_too_large_for_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc abc abd\n" * 5)
    c = default_config().data
    c.source = f"text:{tmp_path}/tiny.txt"
    c.val_fraction = 0.0
    c.vocab_size = 5000
    c.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="data.vocab_size=5000 is too large"):
        build_tokenizer(c)
    c.vocab_size = 100  # byte fallback alone needs 256 pieces
    with pytest.raises(ValueError, match="data.vocab_size=100 is too small"):
        build_tokenizer(c)


def test_byte_tokenizer_round_trips():
    c = default_config().data
    c.tokenizer = "byte"
    tok = build_tokenizer(c)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}


def test_char_tokenizer_uses_corpus_characters_in_sorted_order(tmp_path):
    text = "hello world\nthe quick brown fox\n"
    (tmp_path / "input.txt").write_text(text)
    c = default_config().data
    c.source = f"text:{tmp_path}/input.txt"
    c.text_split = "tail"
    c.val_fraction = 0.1
    c.tokenizer = "char"
    tok = build_tokenizer(c)
    chars = sorted(set(text))  # nanoGPT shakespeare_char: stoi over sorted(set(data))
    assert tok.encode(text) == [chars.index(ch) for ch in text]
    assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (len(chars) + 1, len(chars), -1, -1)
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode("Z")


def test_unknown_tokenizer_kind():
    c = default_config().data
    c.tokenizer = "wordpiece"
    with pytest.raises(ValueError, match="unknown data.tokenizer 'wordpiece'"):
        build_tokenizer(c)
