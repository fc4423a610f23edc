"""lmjax: decoder-only language models in JAX/Flax, from a laptop CPU to a TPU pod slice."""

from setuptools import find_packages, setup

# Ranges admit the set verified to install together on Python 3.11 (jax 0.10.2, flax 0.12.8,
# optax 0.2.8, orbax-checkpoint 0.12.8, tfds 4.9.10, grain 0.2.18, sentencepiece 0.2.3,
# ml-collections 1.1.0), and newer releases on Python >= 3.12.
JAX_VERSION = "0.10.2"

setup(
    name="lmjax",
    version="0.1.0",
    description="GPT-style language models in JAX/Flax: training, sharding, scaling laws, inference.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["lmjax", "lmjax.*", "launch", "launch.*"]),
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "grain>=0.2.18",
        "sentencepiece>=0.2.3",
        "tiktoken>=0.7",  # data.tokenizer=gpt2
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "starlette>=0.40", "uvicorn>=0.30", "httptools>=0.6", "httpx>=0.27", "prometheus-client>=0.20",
                 "qwix>=0.1.8",
                 # tests/test_interop_hf.py: transformers 4.x's Flax GPT-2 and Llama are the reference (no torch).
                 "safetensors>=0.8", "transformers>=4.57,<5", "bm25s>=0.2", "tokenizers>=0.20",
                 # tests/test_auto_store.py: a token store behind a URL (fsspec's memory://).
                 "fsspec>=2024.2"],
        # Weight-only int8 / int4 quantization (--quantize): Google's qwix.
        "quant": ["qwix>=0.1.8"],
        # python -m lmjax.interop.hf (Hugging Face weights in and out; a Hub repo id downloads), and
        # data.tokenizer=<path>/tokenizer.json (Hugging Face tokenizers: a Llama tokenizer as is).
        "hf": ["safetensors>=0.8", "huggingface_hub>=0.34", "tokenizers>=0.20"],
        "notebooks": ["jupyter", "ipykernel>=6.29", "nbformat>=5.10"],
        # Compile-only TPU devices on any machine (lmjax.aot), and running on TPU VMs.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # gs:// workdirs (checkpoints, metrics, summaries through etils.epath; TensorBoard through google-cloud-storage)
        # and gs:// token stores (data.store_dir, store:gs://..., through fsspec, which gcsfs brings).
        "gcs": ["gcsfs>=2024.2"],
        "gpu": [f"jax[cuda12]>={JAX_VERSION}"],
        # benchmarks/vs_pytorch.py: nanoGPT (PyTorch, CPU) against lmjax. Never needed to use lmjax.
        "bench": ["torch==2.13.0"],
        # python -m lmjax.serve: the OpenAI-compatible server (httptools: uvicorn's C HTTP parser; httpx: its
        # tests; aiohttp: the load benchmark's clients, which share the server's CPU).
        "serve": ["starlette>=0.40", "uvicorn>=0.30", "httptools>=0.6", "prometheus-client>=0.20", "httpx>=0.27",
                  "aiohttp>=3.9"],
        # python -m lmjax.retrieval: BM25 retrieval for in-context retrieval augmentation.
        "rag": ["bm25s>=0.2"],
    },
)
