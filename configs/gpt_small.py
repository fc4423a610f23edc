"""A GPT-2-style model small enough (~2.6M parameters with the 4096-token tokenizer) to train on a
2-core CPU in minutes."""

from lmjax.config import default_config


def get_config():
    c = default_config()
    c.name = "gpt_small"
    m = c.model
    m.num_layers = 4  # 4 blocks
    m.embed_dim = 192  # d = 192
    m.num_heads = 6  # head_dim 32
    m.num_kv_heads = 6  # MHA
    c.data.seq_len = 128  # short context: cheap attention on CPU
    m.max_len = c.data.seq_len  # learned position table covers the training context
    # vocab_size stays None: filled from the tokenizer (data.vocab_size = 4096)
    return c
