"""Other ecosystems' checkpoints in and out of lmjax run directories.

  hf.py       `python -m lmjax.interop.hf import|export`: Hugging Face `config.json` + safetensors
              <-> an lmjax workdir (checked config + orbax checkpoint), local or from the Hub
  gpt2.py     the GPT-2 mapping: config keys and parameter layout
  llama.py    the Llama mapping: config keys and parameter layout
  errors.py   one error class per kind of bad checkpoint

A mapping writes one direction only, lmjax params -> Hugging Face tensors; the other is its linear
transpose (see hf.py), so the two can never disagree.
"""
