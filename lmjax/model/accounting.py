"""Parameter and FLOP counts in closed form, for MFU and scaling laws (no model is built)."""

from lmjax.model.attention import check_heads, head_dim
from lmjax.model.mlp import mlp_dim
from lmjax.model.transformer import padded_vocab_size


def _norm_params(cfg, dim: int) -> int:
    return dim * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)


def param_count(cfg, non_embedding: bool = False) -> int:
    """Parameters of `Transformer(cfg)`; equals the size of its initialized tree.

    non_embedding=True drops the token embedding, the learned position table and an untied LM head
    (the "N" of Kaplan et al. 2020 scaling laws).
    """
    if cfg.vocab_size is None:
        raise ValueError("config.model.vocab_size is None: set it before counting parameters")
    check_heads(cfg)
    V = padded_vocab_size(cfg)
    D, H, K, E, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg), mlp_dim(cfg)
    bias = int(cfg.use_bias)
    attn = D * H * E + 2 * D * K * E + H * E * D + bias * (H * E + 2 * K * E + D)
    if cfg.qk_norm:
        attn += 2 * E
    if cfg.mlp == "swiglu":
        mlp = 3 * D * F + bias * (2 * F + D)
    else:
        mlp = 2 * D * F + bias * (F + D)
    block = attn + mlp + 2 * _norm_params(cfg, D)
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

    N_matmul = non-embedding parameters + the LM head's D * V (the head matmul costs compute even
    when tied; embedding lookups do not). 2 FLOPs per multiply-add, backward = 2x forward. Attention
    counts QK^T and AV over the full seq_len (PaLM appendix B convention; causal masking is not
    subtracted, as in the published MFU figures).
    """
    n_matmul = param_count(cfg, non_embedding=True) + cfg.embed_dim * padded_vocab_size(cfg)
    attention = 12 * cfg.num_layers * cfg.num_heads * head_dim(cfg) * seq_len
    return float(6 * n_matmul + attention)
