"""Llama (`model_type: llama`) <-> lmjax: RMSNorm, SwiGLU, rotary positions, grouped-query attention.

Hugging Face stores `nn.Linear` weights as [out, in], the transpose of lmjax's kernels. Its RoPE
rotates the two halves of each head (`rotate_half`: feature i pairs with i + E/2), which is the
layout of lmjax's `apply_rope`; checkpoints on the Hub are already permuted into that layout. Query
head h reads key/value head h // (H / K) in both (`repeat_kv` there, the [K, G] grouping here).
"""

from __future__ import annotations

from typing import Any

from lmjax.interop.errors import UnsupportedConfigError
from lmjax.model.attention import head_dim
from lmjax.model.mlp import mlp_dim

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
# LlamaConfig's defaults, for the keys a config.json leaves out (None: derived, see model_config).
DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings")


def setting(hf: dict, key: str) -> Any:
    return hf[key] if hf.get(key) is not None else DEFAULTS[key]


def _rope_scaling(hf: dict) -> tuple[str, float]:
    """(config.model.rope_scaling, rope_scaling_factor) of config.json's `rope_scaling`."""
    scaling = setting(hf, "rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return "none", 1.0
    if kind == "linear":
        return "linear", float(scaling["factor"])
    raise UnsupportedConfigError(
        f"Llama config.json has rope_scaling={scaling!r}: lmjax implements only the default and 'linear' "
        f"rope scaling, not {kind!r}"
    )


def model_config(hf: dict) -> dict:
    """The `config.model` keys of a Llama config.json."""
    D, H = setting(hf, "hidden_size"), setting(hf, "num_attention_heads")
    if setting(hf, "hidden_act") != "silu":
        raise UnsupportedConfigError(f"Llama config.json has hidden_act={hf['hidden_act']!r}: lmjax's swiglu "
                                     "gates with silu only")
    if setting(hf, "attention_bias") != setting(hf, "mlp_bias"):
        raise UnsupportedConfigError(
            f"Llama config.json has attention_bias={hf.get('attention_bias')!r} and mlp_bias="
            f"{hf.get('mlp_bias')!r}: lmjax's model.use_bias puts biases in both or neither"
        )
    E = setting(hf, "head_dim") or D // H
    if hf.get("head_dim") is None and D % H:
        raise UnsupportedConfigError(f"Llama config.json has hidden_size={D} not a multiple of "
                                     f"num_attention_heads={H} and no head_dim")
    rope_scaling, factor = _rope_scaling(hf)
    return {
        "num_layers": setting(hf, "num_hidden_layers"), "embed_dim": D, "num_heads": H,
        "num_kv_heads": setting(hf, "num_key_value_heads") or H, "head_dim": E,
        "mlp_dim": setting(hf, "intermediate_size"), "vocab_size": setting(hf, "vocab_size"),
        "max_len": setting(hf, "max_position_embeddings"), "position": "rope",
        "rope_theta": float(setting(hf, "rope_theta")), "rope_scaling": rope_scaling,
        "rope_scaling_factor": factor, "mlp": "swiglu", "norm": "rmsnorm",
        "norm_eps": float(setting(hf, "rms_norm_eps")), "qk_norm": False,
        "use_bias": bool(setting(hf, "attention_bias")), "tie_embeddings": bool(setting(hf, "tie_word_embeddings")),
    }


def misfits(m: Any) -> list[str]:
    """Why the lmjax model `m` (config.model) is not a Llama; empty when it is one."""
    wanted = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False}
    problems = [f"model.{key}={m[key]!r} (Llama: {value!r})" for key, value in wanted.items() if m[key] != value]
    if m.rope_scaling not in ("none", "linear"):
        problems.append(f"model.rope_scaling={m.rope_scaling!r} (Llama: 'none' or 'linear')")
    return problems


def hf_config(m: Any) -> dict:
    """The config.json of the Llama that `m` (config.model) is."""
    scaling = None if m.rope_scaling == "none" else {"rope_type": "linear", "factor": m.rope_scaling_factor}
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "vocab_size": m.vocab_size,
        "hidden_size": m.embed_dim, "intermediate_size": mlp_dim(m), "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": head_dim(m),
        "hidden_act": "silu", "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_scaling": scaling, "attention_bias": bool(m.use_bias),
        "mlp_bias": bool(m.use_bias), "tie_word_embeddings": bool(m.tie_embeddings),
    }


def hf_name(name: str) -> str | None:
    """The name `to_hf` uses for a tensor of a file (LlamaModel checkpoints lack the `model.`
    prefix), or None for the rotary frequencies older checkpoints store, which are not parameters."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


def to_hf(params: dict, m: Any) -> dict:
    """lmjax params (unscanned) -> Hugging Face Llama tensors by name. Only moves numbers
    (and drops any embedding rows past the vocabulary: padding for accelerator lanes)."""
    D = m.embed_dim
    t = {"model.embed_tokens.weight": params["embedding"][: m.vocab_size],
         "model.norm.weight": params["final_norm"]["scale"]}

    def linear(name: str, kernel_Ix: Any, bias: Any, inputs: int) -> None:
        t[name + ".weight"] = kernel_Ix.reshape(inputs, -1).T  # [in..., out...] -> [out, in]
        if m.use_bias:
            t[name + ".bias"] = bias.reshape(-1)

    for i in range(m.num_layers):
        block, prefix = params[f"block_{i}"], f"model.layers.{i}."
        attn, mlp = block["attn"], block["mlp"]
        t[prefix + "input_layernorm.weight"] = block["attn_norm"]["scale"]
        t[prefix + "post_attention_layernorm.weight"] = block["mlp_norm"]["scale"]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
            inputs = D if ours != "out" else m.num_heads * head_dim(m)
            linear(f"{prefix}self_attn.{theirs}", attn[ours]["kernel"], attn[ours].get("bias"), inputs)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            inputs = D if ours != "down" else mlp_dim(m)
            linear(f"{prefix}mlp.{theirs}", mlp[ours]["kernel"], mlp[ours].get("bias"), inputs)
    if not m.tie_embeddings:
        t["lm_head.weight"] = params["head"].T[: m.vocab_size]
    return t
