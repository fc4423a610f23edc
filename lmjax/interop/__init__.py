"""Other ecosystems' checkpoints in and out of lmjax run directories.

  hf.py         `python -m lmjax.interop.hf import|export`: Hugging Face GPT-2 and Llama checkpoints
                <-> lmjax run directories (checked config + orbax checkpoint)
  hub_files.py  a Hugging Face model directory: local or downloaded, config.json and safetensors read
                with their names and shapes checked, and written in the Hub's layout
  gpt2.py       the GPT-2 mapping: config keys and parameter layout
  llama.py      the Llama mapping: config keys and parameter layout
  errors.py     one error class per kind of bad checkpoint

A mapping writes one direction only, lmjax params -> Hugging Face tensors; the other is its linear
transpose (see hf.from_hf), so the two can never disagree.
"""
