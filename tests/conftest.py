"""Shared pytest setup: markers, and one CPU device per test process (multi-device tests use subprocesses)."""

import os

# Keep the in-process suite on the plain CPU backend (no accelerator probing, no fake devices).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("XLA_FLAGS", None)
# libtpu (the [tpu] extra) holds a lockfile per process; compile-only topologies use no chip, so allow several.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# GPT-2's BPE file, so tiktoken needs no network (users' tiktoken downloads it once).
_TIKTOKEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tiktoken")
if os.path.isdir(_TIKTOKEN):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(_TIKTOKEN))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that take tens of seconds (CI runs them)")
