"""Position information: learned tables, sinusoids, rotary (RoPE) and ALiBi.

Positions are always passed in explicitly (never derived from the array index) so that packed
documents can restart at 0, and so that left-padded prompts in a batch start at 0 too.
"""

import math

import jax.numpy as jnp

POSITION_TYPES = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_SCALINGS = ("none", "linear", "ntk")


def sinusoidal(positions_BxL: jnp.ndarray, dim: int, max_timescale: float = 10000.0) -> jnp.ndarray:
    """The fixed sin/cos embedding of "Attention is all you need": [B, L, D], float32."""
    half = dim // 2
    inv_freq_D2 = 1.0 / max_timescale ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_D2
    return jnp.concatenate([jnp.sin(angle_BxLxD2), jnp.cos(angle_BxLxD2)], axis=-1)


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0) -> jnp.ndarray:
    """Rotary frequencies [E/2], with context extension by `scaling`.

    linear (position interpolation): positions are divided by `factor`, i.e. all frequencies shrink.
    ntk (NTK-aware): the base grows to theta * factor^(E/(E-2)), so high frequencies (local order)
    are kept and low ones are interpolated.
    """
    exponent_E2 = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if scaling == "none":
        return 1.0 / theta**exponent_E2
    if scaling == "linear":
        return 1.0 / theta**exponent_E2 / factor
    if scaling == "ntk":
        base = theta * factor ** (head_dim / (head_dim - 2))
        return 1.0 / base**exponent_E2
    raise ValueError(f"config.model.rope_scaling={scaling!r}: expected one of {ROPE_SCALINGS}")


def apply_rope(x_BxLxHxE: jnp.ndarray, positions_BxL: jnp.ndarray, inv_freq_E2: jnp.ndarray) -> jnp.ndarray:
    """Rotates each (i, i + E/2) pair of features by angle position * freq_i (split-half layout).

    Computed in float32: angles of positions in the thousands lose all precision in bfloat16.
    """
    angle_BxLx1xE2 = (positions_BxL.astype(jnp.float32)[..., None] * inv_freq_E2)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xE2), jnp.cos(angle_BxLx1xE2)
    x1, x2 = jnp.split(x_BxLxHxE.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxE.dtype)


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """Per-head ALiBi slopes [H]: the geometric sequence 2^(-8i/n) of Press et al., 2022.

    For a head count that is not a power of two, the paper's recipe: the slopes of the closest
    lower power of two, then every other slope of the next power of two.
    """

    def pow2_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = pow2_slopes(closest)
    if closest < num_heads:
        slopes += pow2_slopes(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, dtype=jnp.float32)


def alibi_bias(q_positions_BxL: jnp.ndarray, k_positions_BxS: jnp.ndarray, num_heads: int) -> jnp.ndarray:
    """Additive attention bias -slope_h * (q_pos - k_pos): [B, H, L, S], float32."""
    distance_BxLxS = (q_positions_BxL[:, :, None] - k_positions_BxS[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(num_heads)[None, :, None, None] * distance_BxLxS[:, None]
