"""Serving: an OpenAI-compatible HTTP server over a trained run, with continuous batching.

  engine.py     slots in one KV cache, a bounded queue, the thread that prefills and decodes
  sampler.py    per-request temperature / top-k / top-p and random streams in one batched step
  protocol.py   request bodies checked field by field; OpenAI-shaped responses
  text.py       incremental detokenization, stop strings, the chat template
  metrics.py    Prometheus metrics
  app.py        the Starlette application (routes, streaming, errors)
  __main__.py   `python -m lmjax.serve --workdir=DIR`
"""
