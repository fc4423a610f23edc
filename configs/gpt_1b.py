"""GPT-3 XL's shape (Brown et al. 2020, table 2.1): 24 layers, d=2048, 16 heads of 128, 2048 context,
~1.3B parameters. A TPU-slice preset: bf16 compute, FSDP over the slice, remat and scanned layers.

Check a slice before paying for it: python -m lmjax.aot --config=configs/gpt_1b.py --topology=v5e-16
"""

from lmjax.config import default_config


def get_config():
    c = default_config()
    c.name = "gpt_1b"
    m = c.model
    m.num_layers = 24  # 24 blocks
    m.embed_dim = 2048  # d = 2048
    m.num_heads = 16  # head_dim 128: fills the TPU's 128-lane vregs
    m.num_kv_heads = 16  # MHA
    m.max_len = 2048  # GPT-3 context
    m.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 128: splits over tensor, aligns lanes
    m.dtype = "bfloat16"  # compute in bf16; params and optimizer state stay float32
    m.remat = "full"  # recompute each block in the backward pass: activations are the limit here
    m.scan_layers = True  # one compiled block: compile time does not grow with depth

    c.data.seq_len = 2048  # train on the full context
    c.data.vocab_size = 50257  # tokenizer size (GPT-2's); the model's table is padded above it

    t = c.train
    t.batch_size = 256  # 0.5M tokens per step (GPT-3 XL used 1M)
    t.microbatches = 4  # 64 sequences per scanned chunk: 4 rows per chip on a 16-chip slice
    t.steps = 50_000  # ~26B tokens: the Chinchilla budget (20 tokens per parameter)

    o = c.optim
    o.lr = 2e-4  # GPT-3 XL
    o.warmup_steps = 700  # ~375M tokens, as GPT-3
    o.min_lr_ratio = 0.1  # cosine to 10% of peak, as GPT-3

    mesh = c.mesh
    mesh.data = 1
    mesh.fsdp = -1  # ZeRO-3 over every chip: 1.3B params x 12 bytes (f32 + Adam) do not replicate on v5e
    return c
