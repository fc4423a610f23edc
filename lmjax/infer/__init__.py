"""Inference: text in, text out, from a trained run.

  sampling.py   prompts -> continuations through the model's KV-cache decoder (`lmjax.model.decoding`),
                and the `--mode=generate` job on a workdir
  speculative.py  a draft model proposes, the target verifies several tokens per pass (same distribution)
  quantization.py a run's weights in int8 / int4 (lmjax.model.quantization), saved with it, for
                  generate and eval (`--quantize`)
  early_exit.py   decoding that leaves at the first confident early exit (`--exit_threshold`)
"""

from lmjax.infer.sampling import generate_text, sample_texts

__all__ = ["generate_text", "sample_texts"]
