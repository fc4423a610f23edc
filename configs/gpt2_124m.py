"""GPT-2 small exactly (Radford et al. 2019): GPT-2's own tokenizer and 124,439,808 parameters with
the tied head, plus 47 padding rows (36,096 parameters) that round the vocabulary to 50,304 rows,
a multiple of 128 that TPU lanes and a tensor axis divide; their logits are masked, so no loss or
sample sees them. `--config.model.vocab_multiple=1` gives the published count exactly."""

from lmjax.config import default_config


def get_config():
    c = default_config()
    c.name = "gpt2_124m"
    m = c.model
    m.num_layers = 12  # 12 blocks
    m.embed_dim = 768  # d = 768
    m.num_heads = 12  # head_dim 64
    m.num_kv_heads = 12  # MHA
    m.vocab_size = 50257  # GPT-2's BPE vocabulary size (must be >= the tokenizer's)
    m.vocab_multiple = 128  # 50,304 embedding rows; ids 50,257.. are padding, masked out of every softmax
    m.max_len = 1024  # GPT-2 context
    c.data.seq_len = 1024  # train on the full context
    c.data.tokenizer = "gpt2"  # GPT-2's byte-level BPE (tiktoken r50k_base): "Hello world" -> [15496, 995]
    # Defaults already match GPT-2: learned positions, gelu_tanh, LayerNorm with biases, tied head,
    # mlp_ratio 4, init_std 0.02.
    return c
