"""GPT-2 (`model_type: gpt2`) <-> lmjax: learned positions, pre-LayerNorm, biases everywhere, GELU.

Hugging Face keeps GPT-2's dense layers as `Conv1D`, whose weight is [in, out] (the transpose of
`nn.Linear`'s [out, in]), and fuses the query, key and value projections into one `c_attn` whose
output is [q | k | v], each D wide and split into heads as (H, E).
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from lmjax.interop.errors import UnsupportedConfigError
from lmjax.model.attention import head_dim
from lmjax.model.mlp import mlp_dim

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
# GPT2Config's defaults, for the keys a config.json leaves out.
DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
}
SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings")
# Hugging Face activation name -> config.model.mlp; the first name of each is what export writes.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# The causal mask, which older GPT-2 checkpoints store as a buffer of every attention layer.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


def setting(hf: dict, key: str) -> Any:
    return hf[key] if hf.get(key) is not None else DEFAULTS[key]


def model_config(hf: dict) -> dict:
    """The `config.model` keys of a GPT-2 config.json."""
    D, H = setting(hf, "n_embd"), setting(hf, "n_head")
    activation = setting(hf, "activation_function")
    unsupported = {
        "activation_function": (activation, activation not in ACTIVATIONS),
        "scale_attn_weights": (setting(hf, "scale_attn_weights"), not setting(hf, "scale_attn_weights")),
        "scale_attn_by_inverse_layer_idx": (setting(hf, "scale_attn_by_inverse_layer_idx"),
                                            setting(hf, "scale_attn_by_inverse_layer_idx")),
        "n_embd": (D, D % H != 0),
    }
    for key, (value, bad) in unsupported.items():
        if bad:
            raise UnsupportedConfigError(
                f"GPT-2 config.json has {key}={value!r}, which lmjax's model does not implement "
                f"(it runs activation_function in {sorted(ACTIVATIONS)}, attention scaled by 1/sqrt(head_dim) "
                "only, and n_embd a multiple of n_head)"
            )
    return {
        "num_layers": setting(hf, "n_layer"), "embed_dim": D, "num_heads": H, "num_kv_heads": H,
        "mlp_dim": setting(hf, "n_inner") or 4 * D, "vocab_size": setting(hf, "vocab_size"),
        "max_len": setting(hf, "n_positions"), "position": "learned", "mlp": ACTIVATIONS[activation],
        "norm": "layernorm", "norm_eps": float(setting(hf, "layer_norm_epsilon")), "qk_norm": False,
        "use_bias": True, "tie_embeddings": bool(setting(hf, "tie_word_embeddings")),
    }


def misfits(m: Any) -> list[str]:
    """Why the lmjax model `m` (config.model) is not a GPT-2; empty when it is one."""
    wanted = {"position": "learned", "norm": "layernorm", "use_bias": True, "qk_norm": False}
    problems = [f"model.{key}={m[key]!r} (GPT-2: {value!r})" for key, value in wanted.items() if m[key] != value]
    if m.mlp not in ACTIVATIONS.values():
        problems.append(f"model.mlp={m.mlp!r} (GPT-2: one of {sorted(set(ACTIVATIONS.values()))})")
    if m.num_kv_heads != m.num_heads:
        problems.append(f"model.num_kv_heads={m.num_kv_heads} (GPT-2: num_heads={m.num_heads})")
    if head_dim(m) * m.num_heads != m.embed_dim:
        problems.append(f"model.head_dim={m.head_dim} (GPT-2: embed_dim // num_heads)")
    return problems


def hf_config(m: Any) -> dict:
    """The config.json of the GPT-2 that `m` (config.model) is."""
    activation = next(hf for hf, ours in ACTIVATIONS.items() if ours == m.mlp)
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "vocab_size": m.vocab_size,
        "n_positions": m.max_len, "n_embd": m.embed_dim, "n_layer": m.num_layers, "n_head": m.num_heads,
        "n_inner": mlp_dim(m), "activation_function": activation, "layer_norm_epsilon": m.norm_eps,
        "tie_word_embeddings": bool(m.tie_embeddings),
    }


def hf_name(name: str) -> str | None:
    """The name `to_hf` uses for a tensor of a file (GPT2Model checkpoints lack the `transformer.`
    prefix), or None for a stored causal mask, which is not a parameter."""
    if _MASK_BUFFER.search(name):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def to_hf(params: dict, m: Any) -> dict:
    """lmjax params (unscanned) -> Hugging Face GPT-2 tensors by name. Only moves numbers
    (and drops any embedding rows past the vocabulary: padding for accelerator lanes)."""
    D, N = m.embed_dim, m.num_layers
    t = {"transformer.wte.weight": params["embedding"][: m.vocab_size],
         "transformer.wpe.weight": params["pos_embedding"]}
    for i in range(N):
        block, prefix = params[f"block_{i}"], f"transformer.h.{i}."
        attn, mlp = block["attn"], block["mlp"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            t[f"{prefix}{theirs}.weight"] = block[ours]["scale"]
            t[f"{prefix}{theirs}.bias"] = block[ours]["bias"]
        qkv = [attn[name] for name in ("query", "key", "value")]
        t[prefix + "attn.c_attn.weight"] = jnp.concatenate([p["kernel"].reshape(D, D) for p in qkv], axis=1)
        t[prefix + "attn.c_attn.bias"] = jnp.concatenate([p["bias"].reshape(D) for p in qkv])
        t[prefix + "attn.c_proj.weight"] = attn["out"]["kernel"].reshape(D, D)  # [H, E, D] -> [in, out]
        t[prefix + "attn.c_proj.bias"] = attn["out"]["bias"]
        for ours, theirs in (("up", "c_fc"), ("down", "c_proj")):
            t[f"{prefix}mlp.{theirs}.weight"] = mlp[ours]["kernel"]  # nn.Dense is [in, out] too
            t[f"{prefix}mlp.{theirs}.bias"] = mlp[ours]["bias"]
    t["transformer.ln_f.weight"] = params["final_norm"]["scale"]
    t["transformer.ln_f.bias"] = params["final_norm"]["bias"]
    if not m.tie_embeddings:
        t["lm_head.weight"] = params["head"].T[: m.vocab_size]
    return t
