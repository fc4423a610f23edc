"""Hugging Face GPT-2 and Llama weights in and out (`lmjax.interop.hf`).

The reference is transformers' own Flax GPT-2 and Llama (transformers 4.x, no torch): tiny random
checkpoints are written in the Hub's layout (PyTorch names, `Conv1D` [in, out] for GPT-2, `Linear`
[out, in] for Llama), transformers converts them into its models with its own converter, and the
logits of the imported lmjax run must match. The tensor names and shapes below are written from
the Hugging Face model definitions, not from lmjax's mapping.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import safetensors.numpy

from lmjax import config as config_lib
from lmjax import model
from lmjax.data import tokenizers
from lmjax.interop import errors, gpt2, hf, hub_files, llama
from lmjax.model import Transformer
from lmjax.train import checkpointing
from lmjax.train import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 320  # above the byte tokenizer's 259 ids
GPT2_CONFIG = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": 64, "n_embd": 32,
    "n_layer": 2, "n_head": 4, "n_inner": 48, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
}
LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": 32,
    "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": False,
}


def gpt2_tensors(c: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random GPT2LMHeadModel state dict: Conv1D weights [in, out], c_attn = [q | k | v]."""
    D, F, P = c["n_embd"], c["n_inner"], c["n_positions"]
    w = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    t = {"transformer.wte.weight": w(c["vocab_size"], D), "transformer.wpe.weight": w(P, D)}
    for i in range(c["n_layer"]):
        h = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            t[h + norm + ".weight"], t[h + norm + ".bias"] = 1 + w(D), w(D)
        t[h + "attn.c_attn.weight"], t[h + "attn.c_attn.bias"] = w(D, 3 * D), w(3 * D)
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = w(D, D), w(D)
        t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = w(D, F), w(F)
        t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = w(F, D), w(D)
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = 1 + w(D), w(D)
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = w(c["vocab_size"], D)
    return t


def llama_tensors(c: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random LlamaForCausalLM state dict: Linear weights [out, in]."""
    D, F = c["hidden_size"], c["intermediate_size"]
    E = c.get("head_dim") or D // c["num_attention_heads"]
    H, K = c["num_attention_heads"] * E, c["num_key_value_heads"] * E
    bias = c.get("attention_bias", False)
    w = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    t = {"model.embed_tokens.weight": w(c["vocab_size"], D), "model.norm.weight": 1 + w(D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = 1 + w(D), 1 + w(D)
        for name, (out, inputs) in {"self_attn.q_proj": (H, D), "self_attn.k_proj": (K, D), "self_attn.v_proj": (K, D),
                                    "self_attn.o_proj": (D, H), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D),
                                    "mlp.down_proj": (D, F)}.items():
            t[p + name + ".weight"] = w(out, inputs)
            if bias:
                t[p + name + ".bias"] = w(out)
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = w(c["vocab_size"], D)
    return t


def write_hf_dir(directory: str, config: dict, tensors: dict, shards: int = 1) -> str:
    """config.json and model.safetensors, or `shards` files with model.safetensors.index.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[s::shards]}
        safetensors.numpy.save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def read_hf_dir(directory: str) -> dict[str, np.ndarray]:
    tensors = {}
    for path in hub_files.weight_files(directory):
        tensors.update(safetensors.numpy.load_file(path))
    return tensors


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@functools.cache
def restored_params(workdir: str):
    """(config, params) of the run's newest checkpoint, read as `--mode=generate` reads it."""
    config = workdir_lib.saved_config(workdir)
    return config, workdir_lib.Setup(config, workdir).restore(read_only=True).state.params


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """A GPT-2 (one file) and a Llama (two shards, with a SentencePiece tokenizer.model) checkpoint."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    llama_dir = write_hf_dir(str(root / "llama"), LLAMA_CONFIG, llama_tensors(LLAMA_CONFIG, rng), shards=2)
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=os.path.join(llama_dir, "tokenizer"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    return {"gpt2": write_hf_dir(str(root / "gpt2"), GPT2_CONFIG, gpt2_tensors(GPT2_CONFIG, rng)), "llama": llama_dir}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory) -> dict[str, str]:
    """The two checkpoints imported into new run directories: GPT-2 by the command, Llama in-process."""
    root = tmp_path_factory.mktemp("runs")
    runs = {"gpt2": str(root / "gpt2"), "llama": str(root / "llama")}
    result = run_module("lmjax.interop.hf", "import", f"--from={sources['gpt2']}", f"--workdir={runs['gpt2']}",
                        "--tokenizer=byte")
    assert result.returncode == 0, result.stderr
    assert f"{sum(t.size for t in read_hf_dir(sources['gpt2']).values()):,} parameters" in result.stdout
    config = hf.import_checkpoint(sources["llama"], runs["llama"])
    assert config.data.tokenizer == "sentencepiece"  # auto: the checkpoint's own tokenizer.model
    return runs


def rope_table(config: dict):
    """transformers' Flax Llama builds its rotary table with theta 10,000 and no scaling whatever the
    config says; this one follows its PyTorch Llama (inverse frequencies theta^(-2i/E), divided by
    the factor of `linear` scaling), in the Flax model's [positions, 1, sin | cos] layout."""

    def table(num_positions: int, dim: int):
        inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2) / dim) / config["rope_scaling"]["factor"]
        angles = np.concatenate([np.outer(np.arange(num_positions), inv_freq)] * 2, axis=-1).astype(np.float32)
        return jax.numpy.asarray(np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[:, None, :])

    return table


def transformers_logits(kind: str, directory: str, tokens_BxL: np.ndarray, monkeypatch) -> np.ndarray:
    """transformers' Flax model on the checkpoint, its weights converted by transformers itself."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    from transformers.models.llama import modeling_flax_llama

    model_class, config_class = {
        "gpt2": (transformers.FlaxGPT2LMHeadModel, transformers.GPT2Config),
        "llama": (transformers.FlaxLlamaForCausalLM, transformers.LlamaConfig),
    }[kind]
    if kind == "llama":
        monkeypatch.setattr(modeling_flax_llama, "create_sinusoidal_positions", rope_table(LLAMA_CONFIG))
    model = model_class(config_class.from_pretrained(directory), _do_init=False)
    # The converter reads only the model's prefix and parameter shapes: the abstract tree spares an
    # eager random initialization that costs seconds.
    layout = SimpleNamespace(base_model_prefix=model.base_model_prefix, params=model.params_shape_tree)
    params = convert_pytorch_state_dict_to_flax(read_hf_dir(directory), layout)
    return np.asarray(jax.jit(lambda p, t: model(t, params=p).logits)(params, tokens_BxL))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_imported_logits_match_transformers(kind, sources, imported, monkeypatch):
    tokens_BxL = np.random.default_rng(1).integers(0, V, (2, 24), dtype=np.int32)
    expected = transformers_logits(kind, sources[kind], tokens_BxL, monkeypatch)
    config, params = restored_params(imported[kind])
    logits = np.asarray(jax.jit(Transformer(config.model).apply)({"params": params}, tokens_BxL))
    assert np.abs(logits).max() > 1.0  # not a degenerate comparison
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_export_gives_back_the_checkpoint_and_reimports_bitwise(kind, sources, imported, tmp_path):
    out = str(tmp_path / "exported")
    hf.export_checkpoint(imported[kind], out)
    original, exported = read_hf_dir(sources[kind]), read_hf_dir(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == np.float32 and np.array_equal(exported[name], tensor), name
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    source_config = {"gpt2": GPT2_CONFIG, "llama": LLAMA_CONFIG}[kind]
    assert {key: written[key] for key in source_config} == source_config
    if kind == "llama":  # the tokenizer travels back with the weights
        assert os.path.isfile(os.path.join(out, "tokenizer.model"))

    again = str(tmp_path / "reimported")
    hf.import_checkpoint(out, again, tokenizer="byte")
    _, first = restored_params(imported[kind])
    _, second = restored_params(again)
    assert jax.tree.structure(first) == jax.tree.structure(second)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_imported_run_carries_its_config_as_a_preset(kind, imported):
    preset = config_lib.load(os.path.join(imported[kind], hf.PRESET_FILE))
    assert config_lib.to_json(preset) == config_lib.to_json(workdir_lib.saved_config(imported[kind]))


def test_generate_runs_on_an_imported_run_without_a_preset(imported):
    result = run_module("lmjax.main", "--mode=generate", f"--workdir={imported['gpt2']}", "--prompt=def f",
                        "--max_new_tokens=5", "--temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f") and "=" * 40 in result.stdout


VARIANTS = {
    "gpt2_untied_relu": (gpt2, {**GPT2_CONFIG, "tie_word_embeddings": False, "activation_function": "relu",
                                "n_inner": None}),
    "llama_tied_biased_wide_heads": (llama, {**LLAMA_CONFIG, "tie_word_embeddings": True, "attention_bias": True,
                                             "mlp_bias": True, "head_dim": 16,
                                             "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mapping_round_trips_every_variant_and_scanned_runs(variant):
    """Tied and untied heads, biases, head_dim != D/H: the Hub's names and shapes, and
    from_hf(to_hf(p)) == p exactly; padded vocabulary rows and a scanned run's stacked blocks export
    like the plain params."""
    mapping, hf_config = VARIANTS[variant]
    make = gpt2_tensors if mapping is gpt2 else llama_tensors
    hub = make({**hf_config, "n_inner": hf_config.get("n_inner") or 4 * 32}, np.random.default_rng(2))
    config = hf.lmjax_config(hf_config, mapping, variant, "byte")
    shapes = hf.hf_shapes(mapping, config)
    assert {name: s.shape for name, s in shapes.items()} == {name: t.shape for name, t in hub.items()}
    params = hf.from_hf(hub, mapping, config)
    back = mapping.to_hf(params, config.model)
    assert all(np.array_equal(np.asarray(back[name]), hub[name]) for name in hub)
    if mapping is llama:
        m = config.model
        assert (m.rope_scaling, m.rope_scaling_factor, m.head_dim, m.use_bias) == ("linear", 4.0, 16, True)
    padded = dict(params, embedding=np.pad(params["embedding"], ((0, 8), (0, 0)), constant_values=7.0))
    if "head" in params:
        padded["head"] = np.pad(params["head"], ((0, 0), (0, 8)), constant_values=7.0)
    back = mapping.to_hf(padded, config.model)  # rows past the vocabulary (lane padding) are dropped
    assert all(np.array_equal(np.asarray(back[name]), hub[name]) for name in hub)
    blocks = [params.pop(f"block_{i}") for i in range(config.model.num_layers)]
    scanned = {**params, "blocks": jax.tree.map(lambda *x: np.stack(x), *blocks)}
    config.model.scan_layers = True
    exported = mapping.to_hf(hf.unscanned(scanned, config.model), config.model)
    assert all(np.array_equal(np.asarray(exported[name]), hub[name]) for name in hub)


def test_base_model_names_and_stored_masks_are_understood(sources, tmp_path):
    """GPT2Model checkpoints name tensors without `transformer.` and store causal masks as buffers."""
    tensors = read_hf_dir(sources["gpt2"])
    renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    directory = write_hf_dir(str(tmp_path / "base"), GPT2_CONFIG, renamed)
    config = hf.lmjax_config(GPT2_CONFIG, gpt2, "test", "byte")
    read = hub_files.read_tensors(directory, gpt2, GPT2_CONFIG, hf.hf_shapes(gpt2, config))
    assert sorted(read) == sorted(tensors) and all(np.array_equal(read[n], tensors[n]) for n in tensors)


def _broken(name: str):
    """(config.json, tensors) of a GPT-2 checkpoint with one thing wrong, the error, words it names."""
    config, tensors = dict(GPT2_CONFIG), gpt2_tensors(GPT2_CONFIG, np.random.default_rng(3))
    if name == "unknown_model_type":
        config["model_type"] = "bert"
        return config, tensors, errors.UnknownModelTypeError, ["model_type='bert'", "gpt2, llama"]
    if name == "missing_tensor":
        del tensors["transformer.h.1.mlp.c_fc.bias"]
        return config, tensors, errors.MissingTensorError, ["transformer.h.1.mlp.c_fc.bias", "n_inner=48"]
    if name == "unexpected_tensor":
        tensors["transformer.h.0.attn.q_norm.weight"] = np.ones(8, np.float32)
        return config, tensors, errors.UnexpectedTensorError, ["transformer.h.0.attn.q_norm.weight"]
    if name == "shape_contradicts_config":
        config["n_inner"] = 64  # the file's MLP is 48 wide
        return config, tensors, errors.TensorShapeError, ["transformer.h.0.mlp.c_fc.bias", "(48,)", "(64,)", "n_inner=64"]
    if name == "unsupported_setting":
        config["scale_attn_by_inverse_layer_idx"] = True
        return config, tensors, errors.UnsupportedConfigError, ["scale_attn_by_inverse_layer_idx=True"]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["unknown_model_type", "missing_tensor", "unexpected_tensor",
                                  "shape_contradicts_config", "unsupported_setting"])
def test_bad_checkpoint_is_a_named_error_and_writes_nothing(name, tmp_path):
    config, tensors, error, words = _broken(name)
    directory = write_hf_dir(str(tmp_path / "broken"), config, tensors)
    target = tmp_path / "runs" / "new"
    with pytest.raises(error) as raised:
        hf.import_checkpoint(directory, str(target), tokenizer="byte")
    for word in words:
        assert word in str(raised.value)
    assert not (tmp_path / "runs").exists()


def test_failure_while_writing_leaves_nothing(sources, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        hf.import_checkpoint(sources["gpt2"], str(tmp_path / "runs" / "new"), tokenizer="byte")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        hf.import_checkpoint(sources["gpt2"], str(tmp_path / "taken"), tokenizer="byte")
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]


def test_tokenizer_choice_and_hub_download(sources, monkeypatch):
    if "gpt2" in tokenizers.TOKENIZERS:
        assert hf.choose_tokenizer("auto", gpt2, sources["gpt2"]) == "gpt2"
    else:
        with pytest.raises(ValueError, match="--tokenizer=byte"):
            hf.choose_tokenizer("auto", gpt2, sources["gpt2"])
    with pytest.raises(ValueError, match="no tokenizer.model"):
        hf.choose_tokenizer("sentencepiece", gpt2, sources["gpt2"])

    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append((repo_id, kw)) or sources["gpt2"])
    assert hub_files.resolve_source("someone/tiny-gpt2") == sources["gpt2"]
    assert calls[0][0] == "someone/tiny-gpt2" and "*.safetensors" in calls[0][1]["allow_patterns"]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hub_files.resolve_source("./not/a/dir")


def test_gpt2_small_config_is_gpt2_124m():
    """config.json's defaults are GPT-2 small: the import gives its published shape and size."""
    m = hf.lmjax_config({"model_type": "gpt2"}, gpt2, "openai-community/gpt2", "byte").model
    preset = config_lib.load("configs/gpt2_124m.py").model
    for key in ("num_layers", "embed_dim", "num_heads", "vocab_size", "max_len", "position", "mlp", "norm",
                "tie_embeddings", "use_bias"):
        assert m[key] == preset[key], key
    assert m.mlp_dim == 4 * m.embed_dim and model.param_count(m) == 124_439_808


def test_half_precision_weights_are_read_exactly_as_float32(sources, tmp_path):
    """Hub checkpoints are often bfloat16 or float16: read into float32 params with no rounding."""
    config = hf.lmjax_config(GPT2_CONFIG, gpt2, "test", "byte")
    expected = hf.hf_shapes(gpt2, config)
    for dtype in (jax.numpy.bfloat16, np.float16):
        half = {name: t.astype(dtype) for name, t in read_hf_dir(sources["gpt2"]).items()}
        directory = str(tmp_path / np.dtype(dtype).name)
        os.makedirs(directory)
        hub_files.write(directory, GPT2_CONFIG, half)
        read = hub_files.read_tensors(directory, gpt2, GPT2_CONFIG, expected)
        for name, t in half.items():
            assert read[name].dtype == np.float32 and np.array_equal(read[name], t.astype(np.float32)), name


def test_gpt2_imports_with_gpt2s_own_tokenizer(tmp_path, monkeypatch):
    """A GPT-2 of the real vocabulary gets data.tokenizer=gpt2 on `auto`: "Hello world" is [15496, 995]
    and the imported logits over those ids equal transformers' (the padding rows are never a token)."""
    from lmjax import data

    config = dict(GPT2_CONFIG, vocab_size=50257, n_layer=1)
    source = write_hf_dir(str(tmp_path / "gpt2"), config, gpt2_tensors(config, np.random.default_rng(2)))
    run_config = hf.import_checkpoint(source, str(tmp_path / "run"))
    assert run_config.data.tokenizer == "gpt2"
    tokens = data.build_tokenizer(run_config.data).encode("Hello world")
    assert tokens == [15496, 995]
    tokens_BxL = np.array([tokens + [50256]], np.int32)
    expected = transformers_logits("gpt2", source, tokens_BxL, monkeypatch)
    saved, params = restored_params(str(tmp_path / "run"))
    logits = np.asarray(jax.jit(Transformer(saved.model).apply)({"params": params}, tokens_BxL))
    np.testing.assert_allclose(logits[..., :50257], expected, atol=1e-4, rtol=0)
    assert (logits[..., 50257:] < -1e8).all()  # padding up to a multiple of the vocabulary's rows
