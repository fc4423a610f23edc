"""Retrieval-augmented LM: BM25, in-context augmentation without leakage, kNN search and kNN-LM.

One tiny model (byte vocabulary, d=32, 2 layers, context 32) with numpy-drawn parameters, on the
bytes of a stdlib source file; the reference losses come from the plain forward (test_model's) and
the trainer's cross-entropy, computed on windows sliced here independently of lmjax.retrieval.
"""

import math
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import forward, init, tiny_cfg

from lmjax import config as config_lib
from lmjax.data.tokenizers import ByteTokenizer
from lmjax.model import Transformer
from lmjax.retrieval import evaluate, incontext, knnlm
from lmjax.retrieval.bm25 import BM25Retriever
from lmjax.retrieval.datastore import build_datastore, train_rows
from lmjax.retrieval.dense import DenseRetriever
from lmjax.retrieval.knn import (
    ExactIndex,
    knn_distribution,
    knn_target_logprob,
    nearest_neighbors,
)
from lmjax.retrieval.passages import chunk_bounds, make_passages
from lmjax.retrieval.scoring import make_score_fn, score_rows
from lmjax.retrieval.windows import sample_windows
from lmjax.train import checkpointing
from lmjax.train import step as step_lib
from lmjax.train import workdir as workdir_lib
from lmjax.train.loss import cross_entropy_sums
from lmjax.train.state import TrainState

C, P, Q = 32, 8, 16  # context, scored span, query tokens
TOKENIZER = ByteTokenizer()


def _stdlib_bytes(name: str, count: int) -> np.ndarray:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], name), "rb") as f:
        return np.frombuffer(f.read()[:count], np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def lm():
    cfg = tiny_cfg(vocab_size=TOKENIZER.vocab_size, max_len=C)
    params = init(cfg)
    stream = np.append(_stdlib_bytes("textwrap.py", 1500), TOKENIZER.eos_id).astype(np.int32)
    windows = sample_windows(stream, 24, P, C, seed=3)
    return {"cfg": cfg, "params": params, "model": Transformer(cfg), "stream": stream, "windows": windows,
            "score_span": make_score_fn(Transformer(cfg), params, P)}


def plain_logprobs(cfg, params, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) [R, L] from the plain forward's logits, normalized in float64."""
    logits = np.asarray(forward(cfg, params, jnp.asarray(inputs)), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z


def reference(lm) -> tuple[np.ndarray, float, float]:
    """On windows sliced here: log p of every scored token [W, P] and the model's loss (their mean),
    and the trainer's float32 loss (cross_entropy_sums)."""
    starts = lm["windows"].starts
    inputs = np.stack([lm["stream"][t + P - 1 - C : t + P - 1] for t in starts])
    targets = np.stack([lm["stream"][t + P - C : t + P] for t in starts])
    logprobs = plain_logprobs(lm["cfg"], lm["params"], inputs, targets)[:, -P:]
    weights = np.zeros(inputs.shape, np.float32)
    weights[:, -P:] = 1
    logits = forward(lm["cfg"], lm["params"], jnp.asarray(inputs))
    loss_sum, weight_sum, _ = cross_entropy_sums(logits, jnp.asarray(targets), jnp.asarray(weights))
    return logprobs, -float(logprobs.mean()), float(loss_sum / weight_sum)


class SpyRetriever:
    """Records every query; returns passage `answer` (or nothing) for each."""

    def __init__(self, answer: int = -1):
        self.queries, self.answer = [], answer

    def search(self, queries, k):
        self.queries.extend(queries)
        ids = np.full((len(queries), k), -1, np.int64)
        ids[:, 0] = self.answer
        return ids, (ids >= 0).astype(np.float32)


def test_bm25_returns_the_planted_document_for_an_exact_phrase():
    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, 30)) for _ in range(200)]
    texts[137] = " ".join(rng.choice(words, 10)) + " frobnicate the zanzibar quux " + " ".join(rng.choice(words, 10))
    retriever = BM25Retriever(texts)
    ids, scores = retriever.search(["def frobnicate zanzibar quux():", "nothing matches here"], k=3)
    assert ids[0, 0] == 137 and scores[0, 0] > 0
    assert (ids[1] == -1).all() and (scores[1] == 0).all()  # no shared word: no passage, not a random one
    with pytest.raises(ValueError, match="k=201"):
        retriever.search(["word1"], k=201)


def test_dense_retriever_finds_a_passage_from_its_own_text(lm):
    text = _stdlib_bytes("shlex.py", 600)
    passages = make_passages(np.append(text, TOKENIZER.eos_id), np.array([len(text) + 1]), TOKENIZER, chunk_tokens=20)
    retriever = DenseRetriever(lm["model"], lm["params"], TOKENIZER, passages, batch_size=16)
    ids, scores = retriever.search([passages.texts[i] for i in (3, 17, 29)], k=2)
    np.testing.assert_array_equal(ids[:, 0], [3, 17, 29])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)  # cosine similarity with itself
    assert (scores[:, 1] < scores[:, 0]).all()


def test_passages_cover_every_document_token_and_never_cross_documents():
    docs = ["abcdefghij", "xy", "0123456"]
    tokens = np.concatenate([np.append(TOKENIZER.encode(d), TOKENIZER.eos_id) for d in docs]).astype(np.int32)
    doc_ends = np.cumsum([len(d) + 1 for d in docs])
    passages = make_passages(tokens, doc_ends, TOKENIZER, chunk_tokens=4)
    assert passages.texts == ["abcd", "efgh", "ij", "xy", "0123", "456"]
    assert [TOKENIZER.decode(passages.ids(i)) for i in range(len(passages))] == passages.texts
    starts, stops = chunk_bounds(doc_ends, 4)
    assert list(zip(starts, stops)) == [(0, 4), (4, 8), (8, 10), (11, 13), (14, 18), (18, 21)]


def test_incontext_query_is_the_text_before_the_span_and_never_a_scored_token(lm):
    windows = lm["windows"]
    spy = SpyRetriever()
    incontext.incontext_rows(spy, None, windows, TOKENIZER, query_tokens=Q, num_passages=2, passage_tokens=16)
    assert spy.queries == [TOKENIZER.decode(lm["stream"][t - Q : t].tolist()) for t in windows.starts]
    # Window i's query does not change when everything from its first scored token on does.
    for i, t in enumerate(windows.starts):
        scrambled = lm["stream"].copy()
        scrambled[t:] = (scrambled[t:] + 1) % 256
        spy_scrambled = SpyRetriever()
        incontext.incontext_rows(spy_scrambled, None, type(windows)(scrambled, windows.starts, P, C), TOKENIZER,
                                 query_tokens=Q, num_passages=2, passage_tokens=16)
        assert spy_scrambled.queries[i] == spy.queries[i]
        assert spy_scrambled.queries[i + 1 :] != spy.queries[i + 1 :] or i == len(windows) - 1  # later ones do


def test_incontext_rows_prepend_passages_and_score_exactly_the_original_tokens(lm):
    windows, stream = lm["windows"], lm["stream"]
    passages = make_passages(stream, np.array([len(stream)]), TOKENIZER, chunk_tokens=12)
    rows = incontext.incontext_rows(SpyRetriever(answer=5), passages, windows, TOKENIZER, query_tokens=Q,
                                    num_passages=2, passage_tokens=16)
    passage = passages.ids(5)
    assert len(passage) == 12 and (rows["prepended"] == 13).all()
    for i, t in enumerate(windows.starts):
        row = np.append(rows["inputs"][i], rows["targets"][i, -1])
        np.testing.assert_array_equal(row[:12], passage)
        assert row[12] == TOKENIZER.eos_id
        np.testing.assert_array_equal(row[13:], stream[t + P - 1 - (C - 13) : t + P])  # the text, cut at the far end
    np.testing.assert_array_equal(rows["targets"][rows["weights"] > 0].reshape(-1, P), windows.targets())
    # A best passage longer than the budget is cut to fit; a second one that does not fit is dropped.
    np.testing.assert_array_equal(incontext.prepended([np.arange(20), np.arange(3)], 16, 99), np.append(np.arange(15), 99))
    np.testing.assert_array_equal(incontext.prepended([np.arange(3), np.arange(4)], 16, 99), [0, 1, 2, 3, 99, 0, 1, 2, 99])
    with pytest.raises(ValueError, match="passage_tokens=25"):
        incontext.incontext_rows(SpyRetriever(), passages, windows, TOKENIZER, query_tokens=Q, num_passages=1,
                                 passage_tokens=C - P + 1)


def test_incontext_with_no_passage_equals_the_plain_model_loss(lm):
    rows = incontext.incontext_rows(SpyRetriever(answer=-1), None, lm["windows"], TOKENIZER, query_tokens=Q,
                                    num_passages=1, passage_tokens=16)
    logprob, _ = score_rows(lm["score_span"], rows["inputs"], rows["targets"], batch_size=16)
    loss = -float((logprob.astype(np.float64) * rows["weights"]).sum() / rows["weights"].sum())
    ref_logprobs, ref_loss, trainer_loss = reference(lm)
    assert abs(loss - ref_loss) < 1e-6
    assert abs(loss - trainer_loss) < 1e-5  # the trainer's float32 sums
    np.testing.assert_allclose(logprob[:, -P:], ref_logprobs, atol=1e-5)


def test_knn_search_and_distribution_match_a_hand_computation():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((50, 4)).astype(np.float32)
    queries = rng.standard_normal((7, 4)).astype(np.float32)
    # Blocks of 16 over 50 keys: the top-k is merged across blocks, the padding never returned.
    distances, indices = nearest_neighbors(queries, keys, k=5, block=16, batch=4)
    brute = ((queries[:, None] - keys[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(indices, np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :5], rtol=1e-5, atol=1e-5)

    d = np.array([[1.0, 2.0, 4.0], [0.0, 3.0, 3.0]], np.float32)
    tokens = np.array([[5, 5, 2], [1, 3, 1]])
    T = 2.0
    w0 = np.exp([-0.5, -1.0, -2.0]) / np.exp([-0.5, -1.0, -2.0]).sum()
    w1 = np.exp([0.0, -1.5, -1.5]) / np.exp([0.0, -1.5, -1.5]).sum()
    expected = np.zeros((2, 8))
    expected[0, 5], expected[0, 2] = w0[0] + w0[1], w0[2]
    expected[1, 1], expected[1, 3] = w1[0] + w1[2], w1[1]
    np.testing.assert_allclose(knn_distribution(d, tokens, 8, T), expected, rtol=1e-6)
    logp = knn_target_logprob(d, tokens, np.array([5, 3]), T)
    np.testing.assert_allclose(logp, np.log([expected[0, 5], expected[1, 3]]), rtol=1e-6)
    assert knn_target_logprob(d, tokens, np.array([7, 7]), T)[0] == -np.inf  # no neighbour has it


@pytest.fixture(scope="module")
def span_scores(lm):
    logprob, features = score_rows(lm["score_span"], lm["windows"].plain_rows()["inputs"],
                                   lm["windows"].plain_rows()["targets"], batch_size=16)
    return logprob[:, -P:], features


def _neighbours(lm, span_scores, store, k=8):
    logprob, features = span_scores
    return knnlm.find_neighbours(ExactIndex(store.keys), store, features.reshape(-1, features.shape[-1]),
                                 logprob.reshape(-1), lm["windows"].targets().reshape(-1), k)


def test_knnlm_with_lambda_zero_is_the_model(lm, span_scores):
    score_all = make_score_fn(lm["model"], lm["params"], C)
    other_text = np.append(_stdlib_bytes("shlex.py", 2000), TOKENIZER.eos_id)
    store = build_datastore(score_all, train_rows(other_text, C, TOKENIZER.pad_id), batch_size=16)
    assert len(store) == len(other_text) - 1  # every token of the text is a value once
    n = _neighbours(lm, span_scores, store)
    loss = -float(knnlm.interpolated_logprob(n, 0.0, 1.0).mean())
    assert abs(loss - reference(lm)[1]) < 1e-6
    mixed = -float(knnlm.interpolated_logprob(n, 0.3, 1.0).mean())
    assert mixed != loss and math.isfinite(mixed)
    best = knnlm.choose(n, [0.0, 0.3], [1.0])
    assert best["loss"] == min(loss, mixed)


def test_knnlm_over_a_datastore_of_the_evaluated_text_drives_the_loss_to_zero(lm, span_scores):
    """The leakage direction: if the datastore holds the evaluated positions, kNN-LM finds them."""
    score_all = make_score_fn(lm["model"], lm["params"], C)
    store = build_datastore(score_all, lm["windows"].plain_rows(), batch_size=16)
    assert len(store) == len(lm["windows"]) * P
    n = _neighbours(lm, span_scores, store)
    assert np.median(n.distances[:, 0]) < 1e-3  # each position finds itself
    loss = -float(knnlm.interpolated_logprob(n, 0.999, 0.1).mean())
    assert loss < 0.01 and reference(lm)[1] > 3.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="--mode='bogus'"):
        evaluate.evaluate_run(None, "/nonexistent", "bogus", evaluate.Options())
    with pytest.raises(ValueError, match="--neighbors=0 must be >= 1"):
        evaluate.evaluate_run(None, "/nonexistent", "knnlm", evaluate.Options(neighbors=0))
    with pytest.raises(ValueError, match="--retriever='tfidf'"):
        evaluate.evaluate_run(None, "/nonexistent", "incontext", evaluate.Options(retriever="tfidf"))
    with pytest.raises(ValueError, match="num_windows=100"):
        sample_windows(np.zeros(100, np.int32), 100, P, C)
    with pytest.raises(ValueError, match="lambdas must be in"):
        knnlm.choose(knnlm.Neighbours(*[np.zeros((1, 1))] * 4), [1.0], [1.0])


def test_every_mode_on_a_saved_run_scores_the_same_windows(tmp_path, lm):
    """The path the CLI takes: the run's stored config, tokenizer and checkpoint, its validation split."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(bytes(_stdlib_bytes(name, 3000).astype(np.uint8)).decode("utf-8", "replace")
                                  for name in ("shlex.py", "textwrap.py", "keyword.py")))
    c = config_lib.default_config()
    c.data.update(source=f"text:{corpus}", tokenizer="byte", seq_len=C, cache_dir=str(tmp_path / "cache"),
                  doc_split="blank_line", text_split="tail", val_fraction=0.3)
    c.model.update({key: lm["cfg"][key] for key in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "max_len",
                                                     "init_std")})
    workdir = str(tmp_path / "run")
    setup = workdir_lib.Setup(c, workdir)
    tx, _ = step_lib.make_tx(setup.config, step_lib.abstract_params(setup.config, setup.model))
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint)
    state = TrainState(jnp.int32(7), lm["params"], tx.init(lm["params"]), jax.random.PRNGKey(0))
    checkpointing.save(manager, 7, state, data_state={}, config=config_lib.to_json(setup.config))
    manager.wait_until_finished()
    manager.close()

    options = evaluate.Options(num_windows=24, span=P, query_tokens=Q, chunk_tokens=12, passage_tokens=16,
                               datastore_tokens=-1, neighbors=4, lambdas=(0.0,), temperatures=(1.0,), batch_size=16)
    evaluator = evaluate.RunEvaluator(workdir_lib.saved_config(workdir), workdir, options)
    none, ic, kn = (evaluator.run(mode) for mode in evaluate.MODES)
    assert none["step"] == 7 and none["tokens"] + none["heldout_tokens"] == 24 * P
    # The reported windows' loss, recomputed from the plain forward on the windows the evaluator chose.
    rows = evaluator.windows.plain_rows()
    logprobs = plain_logprobs(lm["cfg"], lm["params"], rows["inputs"], rows["targets"])[:, -P:]
    assert abs(none["loss"] + logprobs[~evaluator.heldout].mean()) < 1e-6
    assert abs(kn["loss"] - none["loss"]) < 1e-6 and kn["lambda"] == 0.0  # lambda 0 is the model
    assert kn["datastore"] > 0 and ic["passages"] > 0 and ic["windows_with_passages"] > 0
    assert ic["tokens"] == none["tokens"] and ic["loss"] != none["loss"]
    assert none["bpb"] == pytest.approx(none["loss"] / math.log(2))  # bytes: one per byte token
