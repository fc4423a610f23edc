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

    d = c.data
    d.source = "pystdlib"  # this interpreter's standard library (~12 MB of Python): no download
    d.tokenizer = "sentencepiece"  # BPE trained on the train split once, then cached (~/.cache/lmjax)
    d.vocab_size = 4096  # small vocabulary: small embedding table and softmax, ~3 bytes per token

    t = c.train
    t.steps = 300  # 300 x 4096 = 1.2M tokens (a third of an epoch): the 10-minute CPU budget
    t.batch_size = 32  # sequences per step: 32 x 128 = 4096 tokens
    t.log_every = 25  # steps between progress lines / metrics.jsonl records

    o = c.optim
    o.lr = 2e-3  # a model this small trains stably at a high peak rate, and must learn fast
    o.warmup_steps = 30  # 10% of the steps
    o.schedule = "cosine"  # decay to min_lr_ratio * lr at the last step
    o.min_lr_ratio = 0.1  # final lr 2e-4
    o.weight_decay = 0.1  # AdamW decoupled decay

    c.checkpoint.every_steps = 100  # three checkpoints per run (the last at the end)
    c.checkpoint.max_to_keep = 2  # the newest two

    e = c.eval
    e.every_steps = 100  # validation loss, perplexity, bits/byte and a sample 3 times per run
    e.steps = 8  # 8 x 32 x 128 = 32k held-out tokens: a fixed sample over the whole split
    e.num_samples = 1  # one sampled continuation per evaluation
    e.sample_tokens = 96  # fits the 128-position table with a short prompt
    e.sample_prompt = "def "  # the start of a function
    return c
