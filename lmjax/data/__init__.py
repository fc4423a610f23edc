"""Data: raw text -> tokenizer -> packed, shuffled, per-process batches for the train step.

  sources.py     pystdlib | text:<glob> | tfds:<name>[/<config>] | prepared:<dir> -> documents
  tokenizers.py  SentencePiece (trained + cached, or loaded), byte, char behind one interface
  packing.py     concat (EOS-joined stream) and segments (whole documents, per-document positions)
  pipeline.py    make_pipeline: deterministic, resumable, sharded per process
  dedup.py       exact and MinHash/LSH near-duplicate removal
  filters.py     heuristic quality filters
  prepare.py     `python -m lmjax.data.prepare`: cleaning + tokenizer -> a prepared:<dir> source
"""

from lmjax.data.pipeline import Pipeline, make_pipeline
from lmjax.data.tokenizers import Tokenizer, build_tokenizer

__all__ = ["Pipeline", "Tokenizer", "build_tokenizer", "make_pipeline"]
