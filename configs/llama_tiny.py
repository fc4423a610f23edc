"""A tiny Llama-family model: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied head."""

from lmjax.config import default_config


def get_config():
    c = default_config()
    c.name = "llama_tiny"
    m = c.model
    m.num_layers = 4  # 4 blocks
    m.embed_dim = 256  # d = 256
    m.num_heads = 8  # head_dim 32
    m.num_kv_heads = 2  # GQA: 4 query heads per kv head
    m.mlp = "swiglu"  # gated SiLU FFN
    m.mlp_dim = 688  # ~8/3 d rounded to a multiple of 16 (Llama's sizing for 3 matrices)
    m.position = "rope"  # rotary positions
    m.rope_theta = 10000.0  # RoPE base
    m.norm = "rmsnorm"  # RMSNorm, no centering
    m.use_bias = False  # no biases anywhere
    m.tie_embeddings = False  # separate LM head
    c.data.seq_len = 256  # context
    m.max_len = c.data.seq_len  # KV-cache size default
    return c
