"""The shape rule: a target non-embedding parameter count -> depth, width and heads.

A sweep asks for sizes, not shapes. Following Kaplan et al. (2020), who found loss depends on
shape only weakly at fixed N, every size keeps the same aspect ratio d_model / n_layers and the
same head_dim, so the sweep varies one thing. A transformer block has about 12 d^2 parameters
(4 d^2 attention + 8 d^2 MLP at mlp_ratio 4), so N ~ 12 L d^2 = 12 r^2 L^3 with d = r L. The rule
takes the depth from that closed form (and its neighbours, since depth is an integer) and widths
that are multiples of head_dim, and keeps the shape whose exact count, from
`lmjax.model.param_count` on the base config, lies closest to the target.

Below ~100K parameters that rule has to alternate between one and two layers, and one-layer models
(which cannot form induction heads) fall on a different loss curve than two-layer ones, which makes
small IsoFLOP profiles jagged. `num_layers` fixes the depth instead and scales only the width.
"""

from __future__ import annotations

import dataclasses
import math

from ml_collections import config_dict

from lmjax import model as model_lib

# What N counts: Kaplan et al. leave the embeddings out; Hoffmann et al. count every parameter.
# At small sizes the LM head is most of the compute, and the choice moves the optimum a lot.
COUNTS = ("non_embedding", "total")

# Largest relative miss |count / target - 1| a shape may have before the rule refuses the size.
DEFAULT_TOLERANCE = 0.25


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    embed_dim: int
    num_heads: int
    non_embedding_params: int
    params: int  # the N the shape was chosen by: non-embedding or total parameters, as counted

    def overrides(self) -> dict[str, int]:
        """`config.model` overrides, as `--config.model.k=v` keys. MHA: kv heads = heads."""
        return {"model.num_layers": self.num_layers, "model.embed_dim": self.embed_dim,
                "model.num_heads": self.num_heads, "model.num_kv_heads": self.num_heads,
                "model.head_dim": self.embed_dim // self.num_heads}


def count_non_embedding(model_cfg: config_dict.ConfigDict, num_layers: int, embed_dim: int, head_dim: int) -> int:
    """Exact non-embedding parameters of the base model at this shape."""
    return count_params(model_cfg, num_layers, embed_dim, head_dim, "non_embedding")


def count_params(model_cfg: config_dict.ConfigDict, num_layers: int, embed_dim: int, head_dim: int,
                 count: str = "non_embedding") -> int:
    """Exact parameters of the base model at this shape: non-embedding (Kaplan) or total (Hoffmann)."""
    if count not in COUNTS:
        raise ValueError(f"count={count!r}: expected one of {COUNTS}")
    if count == "total" and model_cfg.get("vocab_size") is None:
        raise ValueError("counting total parameters needs the vocabulary size: set data.vocab_size (or model.vocab_size)")
    cfg = config_dict.ConfigDict(model_cfg.to_dict())
    cfg.num_layers, cfg.embed_dim = num_layers, embed_dim
    cfg.num_heads = cfg.num_kv_heads = embed_dim // head_dim
    cfg.head_dim = head_dim
    if cfg.vocab_size is None:  # only embeddings depend on it; param_count insists on a value
        cfg.vocab_size = 1
    return model_lib.param_count(cfg, non_embedding=count == "non_embedding")


def shape_for_params(target: float, model_cfg: config_dict.ConfigDict, *, aspect_ratio: float = 32.0,
                     head_dim: int = 32, tolerance: float = DEFAULT_TOLERANCE, num_layers: int | None = None,
                     count: str = "non_embedding") -> Shape:
    """The shape with aspect ratio ~`aspect_ratio` (d_model / n_layers) whose count is nearest `target`;
    with `num_layers`, the width at that depth whose count is nearest (the aspect ratio is ignored).
    `count` says what the target counts: "non_embedding" parameters or the "total".

    Raises ValueError when no shape comes within `tolerance` (too small for one layer of one head,
    for example), naming the target and the closest count.
    """
    if target <= 0:
        raise ValueError(f"target parameter count must be positive, got {target}")
    if model_cfg.get("mlp_dim") is not None:
        raise ValueError(f"the shape rule sizes the MLP as model.mlp_ratio x width, but the base config "
                         f"fixes model.mlp_dim={model_cfg.mlp_dim}; leave it unset")
    depth = (target / (12 * aspect_ratio ** 2)) ** (1 / 3)
    depths = {num_layers} if num_layers else {max(1, round(depth) + k) for k in (-1, 0, 1)}
    candidates = {}
    for layers in depths:
        heads = round(math.sqrt(target / (12 * layers)) / head_dim)  # 12 L d^2 = target, in heads
        # Counting embeddings too, the width is smaller than that by an amount the vocabulary decides: try all.
        for h in range(1, heads + 2) if count == "total" else (heads - 1, heads, heads + 1):
            width = max(1, h) * head_dim
            candidates[layers, width] = count_params(model_cfg, layers, width, head_dim, count)

    def score(shape: tuple[int, int]) -> float:
        """Miss in log count first; off-ratio shapes pay a little, so the nearest depth wins ties."""
        layers, width = shape
        off_ratio = 0.0 if num_layers else abs(math.log(width / layers / aspect_ratio))
        return abs(math.log(candidates[shape] / target)) + 0.05 * off_ratio

    layers, width = min(candidates, key=score)
    miss = candidates[layers, width] / target - 1
    if abs(miss) > tolerance:
        family = f"{num_layers} layers" if num_layers else f"aspect ratio ~{aspect_ratio:g}"
        raise ValueError(
            f"no shape with head_dim={head_dim} and {family} has ~{target:.3g} "
            f"{count.replace('_', '-')} parameters: the nearest ({layers} layers x {width} wide) has "
            f"{candidates[layers, width]:,} ({miss:+.0%}); the smallest shape has "
            f"{count_params(model_cfg, num_layers or 1, head_dim, head_dim, count):,}"
        )
    return Shape(layers, width, width // head_dim, count_non_embedding(model_cfg, layers, width, head_dim),
                 candidates[layers, width])


def closed_form_non_embedding(num_layers: int, embed_dim: int) -> float:
    """12 L d^2: the textbook count (no biases or norms), for cross-checking `param_count`."""
    return 12.0 * num_layers * embed_dim ** 2
