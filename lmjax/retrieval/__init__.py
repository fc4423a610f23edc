"""Retrieval-augmented language modelling: in-context retrieval (Ram et al. 2023) and kNN-LM
(Khandelwal et al. 2020), evaluated on a trained run's validation split with the train split as
the collection.

Files:
  passages.py   the train split cut into token passages (the collection)
  bm25.py       a BM25 retriever over passage texts, through the `bm25s` library
  dense.py      a dense retriever: the model's own mean-pooled final hidden states
  windows.py    evaluation windows: a scored span, its preceding context and its retrieval query
  scoring.py    one jitted forward: target log-probabilities and final hidden states
  incontext.py  rows with retrieved passages prepended within the context budget
  knn.py        exact nearest neighbours (jnp, batched) and the kNN next-token distribution
  datastore.py  the kNN-LM datastore: (final hidden state, next token) pairs of the train split
  knnlm.py      interpolation of the model with the kNN distribution, lambda and T chosen on held-out windows
  evaluate.py   `evaluate_run`: one mode (none | incontext | knnlm) on a trained run
  __main__.py   `python -m lmjax.retrieval --workdir=DIR --mode=...`

Shape letters, besides the model's (B, L, D, V): W windows, P span (scored tokens per window),
Q query vectors, M datastore entries, K neighbours.
"""

from lmjax.retrieval.bm25 import BM25Retriever
from lmjax.retrieval.datastore import Datastore, build_datastore
from lmjax.retrieval.dense import DenseRetriever
from lmjax.retrieval.knn import knn_distribution, knn_target_logprob, nearest_neighbors
from lmjax.retrieval.passages import Passages, make_passages
from lmjax.retrieval.windows import Windows, sample_windows

__all__ = [
    "BM25Retriever", "Datastore", "DenseRetriever", "Passages", "Windows", "build_datastore", "knn_distribution",
    "knn_target_logprob", "make_passages", "nearest_neighbors", "sample_windows",
]
