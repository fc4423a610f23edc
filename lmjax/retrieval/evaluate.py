"""A trained run evaluated with and without retrieval on the same windows of its validation split.

Every mode scores the same tokens: a seeded sample of `num_windows` windows of `span` tokens, each
read with the run's training context (`data.seq_len`). Results are given for the windows in the
second half of the validation stream ("reported"); kNN-LM chooses lambda and T on those in the first
half ("held out"), whose figures are given too. The collection is the train split: for in-context
retrieval its passages (ranked by BM25, or by the model's own embeddings), for kNN-LM the
(hidden state, next token) pairs of a seeded sample of its rows (`datastore_tokens`; -1 all).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from ml_collections import config_dict

from lmjax.data import pipeline as pipeline_lib
from lmjax.retrieval import datastore as datastore_lib
from lmjax.retrieval import incontext, knnlm
from lmjax.retrieval.bm25 import BM25Retriever
from lmjax.retrieval.dense import DenseRetriever
from lmjax.retrieval.knn import ExactIndex
from lmjax.retrieval.passages import Passages, make_passages
from lmjax.retrieval.scoring import make_score_fn, score_rows
from lmjax.retrieval.windows import sample_windows
from lmjax.train import workdir as workdir_lib

MODES = ("none", "incontext", "knnlm")
RETRIEVERS = ("bm25", "dense")


@dataclasses.dataclass(frozen=True)
class Options:
    num_windows: int = 1024  # windows scored (-1: every window of the validation split)
    span: int = 32  # tokens scored per window (the retrieval stride)
    retriever: str = "bm25"  # in-context: bm25 | dense (the model's mean-pooled hidden states)
    query_tokens: int = 32  # in-context: tokens before the span that form the query
    chunk_tokens: int = 64  # in-context: passage length in tokens
    num_passages: int = 1  # in-context: passages retrieved per window
    passage_tokens: int = 64  # in-context: context budget of the prepended passages (EOS included)
    datastore_tokens: int = 500_000  # kNN-LM: train tokens in the datastore (-1: the whole split)
    neighbors: int = 64  # kNN-LM: K
    lambdas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
    temperatures: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
    batch_size: int = 32  # rows per forward pass
    seed: int = 0

    def check(self) -> None:
        """One error naming the first option out of range."""
        minimum = {"span": 1, "query_tokens": 1, "chunk_tokens": 1, "num_passages": 0, "passage_tokens": 0,
                   "neighbors": 1, "batch_size": 1}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= {low}")
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"--retriever={self.retriever!r}: expected one of {RETRIEVERS}")
        for name in ("num_windows", "datastore_tokens"):
            if getattr(self, name) != -1 and getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be positive, or -1 for all")


class RunEvaluator:
    """The restored model, its tokenizer and the validation windows, shared by every mode."""

    def __init__(self, config: config_dict.ConfigDict, workdir: str, options: Options):
        options.check()
        workdir_lib.require_checkpoint(workdir)
        self.options = options
        setup = workdir_lib.Setup(config, workdir)
        self.config, self.tokenizer, self.model = setup.config, setup.tokenizer, setup.model
        restored = setup.restore(read_only=True)
        self.step, self.params = restored.step, restored.state.params
        self.context = int(self.config.data.seq_len)
        stream = pipeline_lib.tokenize_split(self.config.data, "validation", self.tokenizer)["tokens"]
        self.windows = sample_windows(stream, options.num_windows, options.span, self.context, options.seed)
        self.heldout = self.windows.held_out()
        token_bytes = np.asarray(self.tokenizer.token_bytes(), np.float64)
        self.target_bytes = token_bytes[self.windows.targets()].sum(axis=1)
        self._score_span = make_score_fn(self.model, self.params, options.span)
        self._train, self._passages = None, {}

    def train_split(self) -> dict:
        if self._train is None:
            self._train = pipeline_lib.tokenize_split(self.config.data, "train", self.tokenizer)
        return self._train

    def passages(self, chunk_tokens: int) -> Passages:
        if chunk_tokens not in self._passages:
            train = self.train_split()
            self._passages[chunk_tokens] = make_passages(train["tokens"], train["doc_ends"], self.tokenizer, chunk_tokens)
        return self._passages[chunk_tokens]

    def score(self, rows: dict) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs of the span's tokens [W, P], hidden states there [W, P, D])."""
        logprob_WxL, features_WxPxD = score_rows(self._score_span, rows["inputs"], rows["targets"], self.options.batch_size)
        return logprob_WxL[:, -self.options.span :], features_WxPxD

    def summary(self, logprob_WxP: np.ndarray) -> dict:
        """Loss (nats/token) and bits/byte over the reported and the held-out windows."""
        out = {"step": self.step}
        for name, mask in (("", ~self.heldout), ("heldout_", self.heldout)):
            loss_sum = -float(logprob_WxP[mask].astype(np.float64).sum())
            out[f"{name}loss"] = loss_sum / max(logprob_WxP[mask].size, 1)
            out[f"{name}bpb"] = loss_sum / math.log(2) / max(float(self.target_bytes[mask].sum()), 1.0)
            out[f"{name}tokens"] = int(logprob_WxP[mask].size)
        return out

    def none(self) -> dict:
        logprob_WxP, _ = self.score(self.windows.plain_rows())
        return self.summary(logprob_WxP)

    def incontext(self, retriever: incontext.Retriever | None = None, **overrides) -> dict:
        """`overrides`: other values of the options (chunk_tokens, passage_tokens, ...) for this call."""
        o = dataclasses.replace(self.options, **overrides)
        o.check()
        start = time.perf_counter()
        passages = self.passages(o.chunk_tokens)
        if retriever is None and o.retriever == "bm25":
            retriever = BM25Retriever(passages.texts)
        elif retriever is None:
            retriever = DenseRetriever(self.model, self.params, self.tokenizer, passages, o.batch_size)
        indexed = time.perf_counter()
        rows = incontext.incontext_rows(retriever, passages, self.windows, self.tokenizer, query_tokens=o.query_tokens,
                                        num_passages=o.num_passages, passage_tokens=o.passage_tokens)
        retrieved = time.perf_counter()
        logprob_WxP, _ = self.score(rows)
        return {**self.summary(logprob_WxP), "passages": len(passages),
                "mean_prepended_tokens": float(rows["prepended"].mean()),
                "windows_with_passages": float((rows["prepended"] > 0).mean()),
                "index_s": indexed - start, "retrieve_s": retrieved - indexed}

    def knnlm(self) -> dict:
        o = self.options
        start = time.perf_counter()
        logprob_WxP, features_WxPxD = self.score(self.windows.plain_rows())
        rows = datastore_lib.train_rows(self.train_split()["tokens"], self.context, self.tokenizer.pad_id,
                                        o.datastore_tokens, o.seed)
        store = datastore_lib.build_datastore(make_score_fn(self.model, self.params, self.context), rows, o.batch_size)
        built = time.perf_counter()
        index = ExactIndex(store.keys)
        targets_WxP = self.windows.targets()
        neighbours = {}
        for name, mask in (("heldout", self.heldout), ("reported", ~self.heldout)):
            neighbours[name] = knnlm.find_neighbours(index, store, features_WxPxD[mask].reshape(-1, features_WxPxD.shape[-1]),
                                                     logprob_WxP[mask].reshape(-1), targets_WxP[mask].reshape(-1), o.neighbors)
        searched = time.perf_counter()
        best = knnlm.choose(neighbours["heldout"], o.lambdas, o.temperatures)
        logprob = np.zeros_like(logprob_WxP, np.float64)
        for name, mask in (("heldout", self.heldout), ("reported", ~self.heldout)):
            lp = knnlm.interpolated_logprob(neighbours[name], best["lambda"], best["temperature"])
            logprob[mask] = lp.reshape(-1, o.span)
        return {**self.summary(logprob), "lambda": best["lambda"], "temperature": best["temperature"],
                "heldout_grid": best["grid"],
                "datastore": len(store), "neighbors": o.neighbors,
                "median_nearest_distance": float(np.median(neighbours["heldout"].distances[:, 0])),
                "datastore_s": built - start, "search_s": searched - built}

    def run(self, mode: str) -> dict:
        if mode not in MODES:
            raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
        return {"mode": mode, **getattr(self, mode)()}


def evaluate_run(config: config_dict.ConfigDict | None, workdir: str, mode: str, options: Options) -> dict:
    """Loss and bits/byte of the newest checkpoint of `workdir` in `mode`; `config` None: the run's own."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
    options.check()
    config = workdir_lib.saved_config(workdir) if config is None else config
    return RunEvaluator(config, workdir, options).run(mode)
