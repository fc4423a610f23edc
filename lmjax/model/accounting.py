"""Parameter and FLOP counts in closed form, for MFU and scaling laws (no model is built)."""

from lmjax.model import moe
from lmjax.model.attention import check_heads, head_dim
from lmjax.model.mlp import mlp_dim
from lmjax.model.transformer import padded_vocab_size


def _norm_params(cfg, dim: int) -> int:
    return dim * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)


def _ffn_params(cfg, hidden: int) -> int:
    """One FFN of hidden width `hidden` (a dense MLP, or one expert)."""
    D, bias = cfg.embed_dim, int(cfg.use_bias)
    if cfg.mlp == "swiglu":
        return 3 * D * hidden + bias * (2 * hidden + D)
    return 2 * D * hidden + bias * (hidden + D)


def _mlp_params(cfg, active: bool) -> int:
    """A block's FFN: the dense MLP, or the router + experts (+ shared experts) of a MoE block, of
    which a token uses the router, its k experts and the shared ones (`active`)."""
    if not moe.enabled(cfg):
        return _ffn_params(cfg, mlp_dim(cfg))
    m, F = cfg.moe, moe.expert_dim(cfg)
    experts = m.experts_per_token if active else m.num_experts
    shared = _ffn_params(cfg, m.shared_experts * F) if m.shared_experts else 0
    return cfg.embed_dim * m.num_experts + experts * _ffn_params(cfg, F) + shared


def param_count(cfg, non_embedding: bool = False, active: bool = False) -> int:
    """Parameters of `Transformer(cfg)`; equals the size of its initialized tree.

    non_embedding=True drops the token embedding, the learned position table and an untied LM head
    (the "N" of Kaplan et al. 2020 scaling laws). active=True counts, in MoE blocks, only the
    parameters one token uses (router, k experts, shared experts); for a dense model it changes nothing.
    """
    if cfg.vocab_size is None:
        raise ValueError("config.model.vocab_size is None: set it before counting parameters")
    check_heads(cfg)
    V = padded_vocab_size(cfg)
    D, H, K, E = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    bias = int(cfg.use_bias)
    attn = D * H * E + 2 * D * K * E + H * E * D + bias * (H * E + 2 * K * E + D)
    if cfg.qk_norm:
        attn += 2 * E
    block = attn + _mlp_params(cfg, active) + 2 * _norm_params(cfg, D)
    total = cfg.num_layers * block + _norm_params(cfg, D)
    if not non_embedding:
        total += V * D
        if cfg.position == "learned":
            total += cfg.max_len * D
        if not cfg.tie_embeddings:
            total += D * V
    return total


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * N_layers * H * E * seq_len.

    N_matmul = active non-embedding parameters (a MoE token runs its k experts, not all of them;
    dispatch and capacity padding are not counted) + the LM head's D * V (the head matmul costs compute even
    when tied; embedding lookups do not). 2 FLOPs per multiply-add, backward = 2x forward. Attention
    counts QK^T and AV over the full seq_len (PaLM appendix B convention; causal masking is not
    subtracted, as in the published MFU figures).
    """
    n_matmul = param_count(cfg, non_embedding=True, active=True) + cfg.embed_dim * padded_vocab_size(cfg)
    attention = 12 * cfg.num_layers * cfg.num_heads * head_dim(cfg) * seq_len
    return float(6 * n_matmul + attention)
