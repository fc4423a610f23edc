"""The validation set: a fixed sample over the whole split, the same on every process count, and bits
per byte counted over exactly the bytes of the tokens evaluated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmjax import sharding
from lmjax.config import default_config
from lmjax.data import build_tokenizer
from lmjax.model import Transformer
from lmjax.train import step as step_lib
from lmjax.train import validation

from test_tokenizers import TRICKY, code_corpus


def corpus_config(tmp_path, *, n_docs=60, eval_steps=2, batch_size=4, tokenizer="char"):
    """Documents of one or three bytes per character, in files whose names sort them by kind, so
    the first rows of the split are all of one kind and the split's average bytes/token is neither."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_docs):
        alphabet = "日本語の文字列" if i % 2 else "abcdefgh"
        text = "".join(rng.choice(list(alphabet), int(rng.integers(20, 80))))
        (corpus / f"{'a' if i % 2 else 'b'}{i:03d}.txt").write_text(text)
    c = default_config()
    c.data.update(source=f"text:{corpus}/*.txt", tokenizer=tokenizer, val_fraction=0.5, seq_len=16,
                  cache_dir=str(tmp_path / "cache"))
    c.model.update(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=2, max_len=16)
    c.train.batch_size = batch_size
    c.eval.steps = eval_steps
    return c


def rows_of(val_set):
    return [b["inputs"].tobytes() + b["weights"].tobytes() for b in val_set]


def test_the_sample_is_seeded_spread_over_the_split_and_the_same_every_time(tmp_path):
    c = corpus_config(tmp_path, n_docs=200, eval_steps=2)
    tok = build_tokenizer(c.data)
    val = validation.ValidationSet(c, tok)
    assert len(val) == 2 and rows_of(val) == rows_of(validation.ValidationSet(c, tok)) == rows_of(val)
    assert len(set(val.sample)) == 8 and max(val.sample) > val.packer.num_rows / 2

    def kinds(inputs):  # which alphabets the rows' first tokens come from
        return {tok.decode([int(t)]).isascii() for t in inputs[:, 0]}

    # Files sort by kind, so the split's first rows (what an unshuffled cut evaluated) hold one kind;
    # the sample holds both.
    assert kinds(val.packer.rows(np.arange(8))["inputs"]) == {False}
    assert kinds(np.concatenate([b["inputs"] for b in val])) == {False, True}
    c.data.seed = 1
    assert rows_of(validation.ValidationSet(c, tok)) != rows_of(val)


def test_every_process_count_evaluates_the_same_rows(tmp_path):
    c = corpus_config(tmp_path, eval_steps=3, batch_size=4)
    tok = build_tokenizer(c.data)
    whole = list(validation.ValidationSet(c, tok))
    halves = [list(validation.ValidationSet(c, tok, rows)) for rows in ((0, 2), (2, 4))]
    for batch, first, second in zip(whole, *halves):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_minus_one_evaluates_every_target_token_of_the_split_once(tmp_path):
    c = corpus_config(tmp_path, eval_steps=-1, batch_size=4)
    tok = build_tokenizer(c.data)
    val = validation.ValidationSet(c, tok)
    every_row = val.packer.rows(np.arange(val.packer.num_rows))
    assert len(val) == math.ceil(val.packer.num_rows / 4)
    weighted = sum(float(b["weights"].sum()) for b in val)  # the last batch's padding rows weigh 0
    assert weighted == float(every_row["weights"].sum())


def test_target_bytes_are_the_utf8_bytes_of_the_evaluated_tokens(tmp_path):
    c = corpus_config(tmp_path, eval_steps=2)
    tok = build_tokenizer(c.data)
    for batch in validation.ValidationSet(c, tok):
        by_hand = sum(len(tok.decode([int(t)]).encode("utf-8")) * w
                      for t, w in zip(batch["targets"].ravel(), batch["weights"].ravel()))
        assert float(batch["target_bytes"].sum()) == by_hand


def test_sentencepiece_token_bytes_add_up_to_the_text(tmp_path):
    c = code_corpus(tmp_path)
    tok = build_tokenizer(c)
    table = tok.token_bytes()
    for text in [TRICKY, "x", open(__file__).read()]:
        assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert table[tok.eos_id] == table[tok.pad_id] == 0


def test_bits_per_byte_divide_by_the_evaluated_bytes_not_the_split_average(tmp_path):
    c = corpus_config(tmp_path, eval_steps=1)
    tok = build_tokenizer(c.data)
    c.model.vocab_size = tok.vocab_size
    mesh = sharding.make_mesh(c.mesh)
    model = Transformer(c.model)
    state, shardings = step_lib.create_train_state(c, model, mesh)
    eval_step = step_lib.make_eval_step(c, model, mesh, shardings)
    val = validation.ValidationSet(c, tok)
    result = validation.evaluate_params(eval_step, state.params, val, mesh, sharding.rules(c.mesh))

    (batch,) = list(val)
    evaluated_bytes = sum(len(tok.decode([int(t)]).encode("utf-8")) * w
                          for t, w in zip(batch["targets"].ravel(), batch["weights"].ravel()))
    tokens = float(batch["weights"].sum())
    assert result["val_tokens"] == tokens
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * tokens / math.log(2) / evaluated_bytes, rel=1e-5)
    packer_all = val.packer.rows(np.arange(val.packer.num_rows))
    split_bytes_per_token = float((val.token_bytes[packer_all["targets"]] * packer_all["weights"]).sum()
                                  / packer_all["weights"].sum())
    assert abs(evaluated_bytes / tokens - split_bytes_per_token) > 0.05  # the two differ on this corpus


def test_eval_steps_zero_has_no_validation_and_eval_mode_says_so(tmp_path):
    c = corpus_config(tmp_path, eval_steps=0)
    assert validation.validation_set(c, build_tokenizer(c.data)) is None
    with pytest.raises(ValueError, match="config.eval.steps=0 disables validation"):
        validation.evaluate(c, str(tmp_path / "run"))
