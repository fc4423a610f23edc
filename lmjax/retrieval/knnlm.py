"""kNN-LM (Khandelwal et al. 2020): p = lambda * p_knn + (1 - lambda) * p_lm, the kNN distribution
over the next tokens of the datastore entries nearest to the model's hidden state.

The neighbours of every scored position are searched once; the interpolation weight lambda and
the temperature T are then chosen on a grid by the loss of held-out windows and applied to the
reported ones, which never inform the choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lmjax.retrieval.datastore import Datastore
from lmjax.retrieval.knn import ExactIndex, interpolate_logprob, knn_target_logprob


@dataclasses.dataclass
class Neighbours:
    """What the interpolation needs of every scored token [Q]: the model's log-prob of the target,
    the target, and its K neighbours' squared distances and next tokens [Q, K]."""

    lm_logprob: np.ndarray
    targets: np.ndarray
    distances: np.ndarray
    tokens: np.ndarray


def find_neighbours(index: ExactIndex, datastore: Datastore, features_QxD: np.ndarray, lm_logprob_Q: np.ndarray,
                    targets_Q: np.ndarray, k: int) -> Neighbours:
    distances_QxK, indices_QxK = index.search(features_QxD, k)
    return Neighbours(np.asarray(lm_logprob_Q, np.float32), np.asarray(targets_Q, np.int32), distances_QxK,
                      datastore.values[indices_QxK])


def interpolated_logprob(n: Neighbours, lam: float, temperature: float) -> np.ndarray:
    """log p(target) [Q] under the interpolated distribution."""
    knn = knn_target_logprob(n.distances, n.tokens, n.targets, temperature)
    return np.asarray(interpolate_logprob(n.lm_logprob, knn, lam), np.float64)


def choose(n: Neighbours, lambdas: Sequence[float], temperatures: Sequence[float]) -> dict:
    """The (lambda, T) of the grid with the lowest mean loss on `n`, that loss, and the whole grid's."""
    if not lambdas or not temperatures:
        raise ValueError("kNN-LM needs at least one lambda and one temperature to choose from")
    if any(not 0 <= lam < 1 for lam in lambdas):
        raise ValueError(f"lambdas must be in [0, 1) (at 1 a token no neighbour has costs infinity), got {list(lambdas)}")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    grid = [{"lambda": float(lam), "temperature": float(temperature),
             "loss": -float(interpolated_logprob(n, lam, temperature).mean())}
            for temperature in temperatures for lam in lambdas]
    best = min(grid, key=lambda g: g["loss"])
    return {**best, "grid": grid}
