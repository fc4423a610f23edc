"""Inference: text in, text out, from a trained run.

  sampling.py   prompts -> continuations through the model's KV-cache decoder (`lmjax.model.decoding`),
                and the `--mode=generate` job on a workdir
"""

from lmjax.infer.sampling import generate_text, sample_texts

__all__ = ["generate_text", "sample_texts"]
