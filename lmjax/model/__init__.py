"""The decoder-only transformer, GPT-2 to Llama, chosen entirely by `config.model`.

Shape letters used in tensor names throughout this package (`x_BxLxD`, `logits_BxLxV`):

  B  batch                    L  length (query positions in this call)
  D  embed_dim (residual)     S  key/cache length (S == L without a KV cache)
  H  query heads              K  key/value heads (H: MHA, 1: MQA, between: GQA)
  G  H // K, query heads per kv head
  E  head_dim                 F  mlp hidden width
  V  vocab                    N  layers

Files: positions.py (learned, sinusoidal, RoPE, ALiBi), attention.py, mlp.py, norms.py,
transformer.py (blocks, remat, scan, LM head), decoding.py (KV cache, sampling),
quantization.py (int8 / int4 weights through qwix), early_exit.py (exits through the shared head),
accounting.py (parameter and FLOP counts).
"""

from lmjax.model import decoding
from lmjax.model.accounting import flops_per_token, param_count
from lmjax.model.decoding import generate
from lmjax.model.transformer import Block, Transformer, padded_vocab_size

__all__ = ["Block", "Transformer", "decoding", "flops_per_token", "generate", "padded_vocab_size", "param_count"]
