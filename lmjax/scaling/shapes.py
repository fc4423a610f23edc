"""The shape rule: a target non-embedding parameter count -> depth, width and heads.

A sweep asks for sizes, not shapes. Following Kaplan et al. (2020), who found loss depends on
shape only weakly at fixed N, every size keeps the same aspect ratio d_model / n_layers and the
same head_dim, so the sweep varies one thing. A transformer block has about 12 d^2 parameters
(4 d^2 attention + 8 d^2 MLP at mlp_ratio 4), so N ~ 12 L d^2 = 12 r^2 L^3 with d = r L. The rule
takes the depth from that closed form (and its neighbours, since depth is an integer) and widths
that are multiples of head_dim, and keeps the shape whose exact count, from
`lmjax.model.param_count` on the base config, lies closest to the target.
"""

from __future__ import annotations

import dataclasses
import math

from ml_collections import config_dict

from lmjax import model as model_lib

# Largest relative miss |count / target - 1| a shape may have before the rule refuses the size.
DEFAULT_TOLERANCE = 0.25


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    embed_dim: int
    num_heads: int
    non_embedding_params: int

    def overrides(self) -> dict[str, int]:
        """`config.model` overrides, as `--config.model.k=v` keys. MHA: kv heads = heads."""
        return {"model.num_layers": self.num_layers, "model.embed_dim": self.embed_dim,
                "model.num_heads": self.num_heads, "model.num_kv_heads": self.num_heads,
                "model.head_dim": self.embed_dim // self.num_heads}


def count_non_embedding(model_cfg: config_dict.ConfigDict, num_layers: int, embed_dim: int, head_dim: int) -> int:
    """Exact non-embedding parameters of the base model at this shape."""
    cfg = config_dict.ConfigDict(model_cfg.to_dict())
    cfg.num_layers, cfg.embed_dim = num_layers, embed_dim
    cfg.num_heads = cfg.num_kv_heads = embed_dim // head_dim
    cfg.head_dim = head_dim
    if cfg.vocab_size is None:  # only embeddings depend on it; param_count insists on a value
        cfg.vocab_size = 1
    return model_lib.param_count(cfg, non_embedding=True)


def shape_for_params(target: float, model_cfg: config_dict.ConfigDict, *, aspect_ratio: float = 32.0,
                     head_dim: int = 32, tolerance: float = DEFAULT_TOLERANCE) -> Shape:
    """The shape with aspect ratio ~`aspect_ratio` (d_model / n_layers) whose count is nearest `target`.

    Raises ValueError when no shape comes within `tolerance` (too small for one layer of one head,
    for example), naming the target and the closest count.
    """
    if target <= 0:
        raise ValueError(f"target parameter count must be positive, got {target}")
    if model_cfg.get("mlp_dim") is not None:
        raise ValueError(f"the shape rule sizes the MLP as model.mlp_ratio x width, but the base config "
                         f"fixes model.mlp_dim={model_cfg.mlp_dim}; leave it unset")
    depth = (target / (12 * aspect_ratio ** 2)) ** (1 / 3)
    candidates = {}
    for layers in {max(1, round(depth) + k) for k in (-1, 0, 1)}:
        ideal_width = math.sqrt(target / (12 * layers))
        for k in (-1, 0, 1):
            width = max(1, round(ideal_width / head_dim) + k) * head_dim
            candidates[layers, width] = count_non_embedding(model_cfg, layers, width, head_dim)

    def score(shape: tuple[int, int]) -> float:
        """Miss in log count first; off-ratio shapes pay a little, so the nearest depth wins ties."""
        layers, width = shape
        return abs(math.log(candidates[shape] / target)) + 0.05 * abs(math.log(width / layers / aspect_ratio))

    layers, width = min(candidates, key=score)
    miss = candidates[layers, width] / target - 1
    if abs(miss) > tolerance:
        raise ValueError(
            f"no shape with head_dim={head_dim} and aspect ratio ~{aspect_ratio:g} has ~{target:.3g} "
            f"non-embedding parameters: the nearest ({layers} layers x {width} wide) has "
            f"{candidates[layers, width]:,} ({miss:+.0%}); the smallest shape has "
            f"{count_non_embedding(model_cfg, 1, head_dim, head_dim):,}"
        )
    return Shape(layers, width, width // head_dim, candidates[layers, width])


def closed_form_non_embedding(num_layers: int, embed_dim: int) -> float:
    """12 L d^2: the textbook count (no biases or norms), for cross-checking `param_count`."""
    return 12.0 * num_layers * embed_dim ** 2
