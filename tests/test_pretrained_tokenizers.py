"""GPT-2's tokenizer, a Hugging Face tokenizer.json, a SentencePiece .model by path, and the padded
vocabulary of configs/gpt2_124m.py (padding ids out of the loss and out of sampling)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.config import default_config
from lmjax.data import build_tokenizer, tokenizers
from lmjax.model import Transformer, decoding, padded_vocab_size
from lmjax.model.transformer import PADDING_LOGIT
from lmjax.train.loss import cross_entropy_sums

TEXTS = ["Hello world", "def f(x):\n\treturn x  # naïve ☃ 日本語\n", "  spaces   and\n\nnewlines ", "<|endoftext|> as text"]


def data_cfg(tokenizer):
    c = default_config().data
    c.tokenizer = tokenizer
    return c


def assert_exact_tokenizer(tok):
    """Round trip, batch = one by one, and token_bytes counting exactly the UTF-8 bytes encoded."""
    assert isinstance(tok, tokenizers.Tokenizer)
    batch = tok.encode_batch(TEXTS)
    assert batch == [tok.encode(t) for t in TEXTS]
    for text, ids in zip(TEXTS, batch):
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
        assert tok.eos_id not in ids  # special-token text is encoded as text
    assert tok.token_bytes()[tok.eos_id] == 0 and len(tok.token_bytes()) == tok.vocab_size


def test_gpt2_is_tiktoken_r50k_base():
    tok = build_tokenizer(data_cfg("gpt2"))
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert_exact_tokenizer(tok)
    assert tok.fingerprint.startswith("tiktoken-r50k_base-")
    gpt2 = config_lib.load("configs/gpt2_124m.py")
    assert gpt2.data.tokenizer == "gpt2" and gpt2.model.vocab_size == 50257
    assert padded_vocab_size(gpt2.model) == 50304 and 50304 % 128 == 0


def tiny_hf_tokenizer(path):
    """A byte-level BPE tokenizer.json, trained in-process (what a GPT-2/Llama-3 style file holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox\n"] * 20 + TEXTS, trainer)
    tok.save(str(path))
    return tok


def test_hugging_face_tokenizer_json_by_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    reference = tiny_hf_tokenizer(path)
    tok = build_tokenizer(data_cfg(str(path)))
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, -1)
    assert tok.vocab_size == reference.get_vocab_size()
    assert tok.encode("hello world") == reference.encode("hello world").ids
    assert len(tok.encode("hello world")) < len("hello world")  # merges learned, not bytes
    assert_exact_tokenizer(tok)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_tokenizer(data_cfg(str(tmp_path / "nope.json")))


def test_sentencepiece_model_by_path(tmp_path):
    c = default_config().data
    c.vocab_size = 300
    trained = tokenizers.train_sentencepiece(["hello world, the quick brown fox\n" * 20] + TEXTS, c)
    trained.save(str(tmp_path / "m.model"))
    tok = build_tokenizer(data_cfg(str(tmp_path / "m.model")))
    assert tok.fingerprint == trained.fingerprint and tok.encode(TEXTS[1]) == trained.encode(TEXTS[1])


def test_unknown_tokenizer_is_refused_by_the_config_check():
    c = default_config()
    c.data.tokenizer = "gpt3"
    with pytest.raises(ValueError, match="unknown data.tokenizer 'gpt3'"):
        config_lib.check(c)


@pytest.fixture(scope="module")
def padded():
    """A 61-id model padded to 64 rows, and the same weights read as 64 real ids: loss, gradient,
    logits and samples of both, from one compiled function."""
    cfg = default_config().model
    cfg.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, max_len=32, vocab_size=61, vocab_multiple=16)
    unmasked = cfg.copy_and_resolve_references()
    unmasked.update(vocab_size=64, vocab_multiple=None)
    model, plain = Transformer(cfg), Transformer(unmasked)
    tokens = jax.random.randint(jax.random.key(1), (16, 9), 0, 61)
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], jnp.ones((16, 8))

    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), shapes)

    @jax.jit
    def run(params):

        def loss_fn(p):
            logits = model.apply({"params": p}, inputs)
            return cross_entropy_sums(logits, targets, weights)[0], logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        plain_logits = plain.apply({"params": params}, inputs)
        sample_key = jax.random.key(2)
        return {
            "embedding": params["embedding"], "logits": logits, "loss": loss, "grads": grads["embedding"],
            "real_only": cross_entropy_sums(logits[..., :61], targets, weights)[0],  # softmax over the 61 real ids
            # What generate() draws from, at a hot temperature: with the mask, and without it.
            "sampled": decoding.sample(logits.reshape(-1, 64), sample_key, 5.0),
            "sampled_plain": decoding.sample(plain_logits.reshape(-1, 64), sample_key, 5.0),
        }

    return jax.tree.map(np.asarray, run(params))


def test_padding_ids_are_out_of_the_loss(padded):
    assert padded["embedding"].shape == (64, 32)
    assert padded["logits"].shape == (16, 8, 64) and np.all(padded["logits"][..., 61:] == PADDING_LOGIT)
    np.testing.assert_allclose(padded["loss"], padded["real_only"], rtol=1e-6)
    assert np.all(padded["grads"][61:] == 0)  # padding rows are never trained
    assert np.any(padded["grads"][:61] != 0)


def test_padding_ids_are_never_sampled(padded):
    assert padded["sampled_plain"].max() >= 61  # a hot temperature does reach the last rows...
    ids = padded["sampled"]
    assert len(ids) == 16 * 8 and ids.max() < 61 and len(np.unique(ids)) > 20  # ...but not through the mask
