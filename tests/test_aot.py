"""Ahead-of-time compilation for TPU slices (lmjax.aot), and the golden sharding of gpt2_124m.

The golden test and the HLO/report helpers run in the plain CPU suite. The rest compile for TPU
topologies and need libtpu (`pip install -e '.[tpu]'`); without it they are skipped, saying so.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from jax.sharding import AbstractMesh

from lmjax import aot, hardware, sharding, train
from lmjax import config as config_lib
from lmjax.model import Transformer, param_count

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "gpt2_124m_sharding.json"
GOLDEN_MESH = {"data": 2, "fsdp": 4, "tensor": 2}
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="needs libtpu to compile for TPU topologies: pip install -e '.[tpu]'",
)


def load_config(name: str, **overrides):
    return config_lib.load(f"configs/{name}.py", {k.replace("__", "."): v for k, v in overrides.items()})


def abstract_boxed_params(config):
    return train.abstract_params(config, Transformer(config.model))


def partition_table(config, mesh_shape: dict[str, int]) -> dict[str, dict]:
    """{param path: {shape, spec}} under config.mesh.rules; the mesh's sizes do not enter the spec."""
    mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    boxed = abstract_boxed_params(config)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.rules(config.mesh))
    table = {}
    for (path, leaf), named in zip(
        jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)), jax.tree_util.tree_leaves(shardings)
    ):
        spec = [list(a) if isinstance(a, tuple) else a for a in named.spec]
        spec += [None] * (len(leaf.shape) - len(spec))
        table[jax.tree_util.keystr(path, simple=True, separator="/")] = {"shape": list(leaf.shape), "spec": spec}
    return table


def golden_text(table: dict) -> str:
    """JSON with one line per parameter, so a review diff shows exactly which ones changed."""
    lines = [f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in sorted(table["params"].items())]
    return '{"mesh": %s, "params": {\n%s\n}}\n' % (json.dumps(table["mesh"]), ",\n".join(lines))


def test_gpt2_124m_partition_specs_match_the_golden_file():
    """Any change to the rules, parameter names or logical axes shows up as a diff of this file.
    Regenerate deliberately with LMJAX_UPDATE_GOLDEN=1."""
    table = {"mesh": GOLDEN_MESH, "params": partition_table(load_config("gpt2_124m"), GOLDEN_MESH)}
    if os.environ.get("LMJAX_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(golden_text(table))
    assert table == json.loads(GOLDEN.read_text())


def test_gpt2_124m_odd_vocab_on_the_golden_mesh_is_a_named_error():
    """GPT-2's vocab (50257) is odd: on tensor=2 the embedding cannot split, and the error says which
    parameter, dimension and mesh axis (the preset pads it to 50304 with model.vocab_multiple=128)."""
    config = load_config("gpt2_124m", model__vocab_multiple=1)
    mesh = AbstractMesh(tuple(GOLDEN_MESH.values()), tuple(GOLDEN_MESH))
    with pytest.raises(ValueError) as err:
        sharding.check_divisible(abstract_boxed_params(config), mesh, sharding.rules(config.mesh))
    message = str(err.value)
    assert "embedding" in message and "50257" in message and "vocab" in message and "tensor" in message


def test_collectives_are_counted_once_per_async_pair():
    hlo = """
      %ag = f32[8] all-gather(f32[2] %p), dimensions={0}
      %ars = f32[8] all-reduce-start(f32[8] %ag), to_apply=%add
      %ard = f32[8] all-reduce-done(f32[8] %ars)
      %cp = (f32[8], f32[8]) collective-permute-start(f32[8] %ard)
      %rs = f32[2] reduce-scatter(f32[8] %ard), dimensions={0}
    """
    assert aot.count_collectives(hlo) == {
        "all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "collective-permute": 1, "all-to-all": 0,
    }


def test_total_bytes_counts_donated_outputs_once():
    report = aot.Report(
        fits=True, message="", topology="v5e-16", argument_bytes=100, output_bytes=90,
        alias_bytes=80, temp_bytes=50, code_bytes=5,
    )
    assert report.total_bytes == 100 + 10 + 50 + 5


@needs_libtpu
def test_gpt2_124m_fits_on_v5e_16_and_its_arguments_are_the_hand_count():
    """data=8 x fsdp=2: each chip holds half of the float32 params and of Adam's mu and nu.

    fsdp=2 keeps every sharded dimension a multiple of the TPU's 128 lanes (768 / 2 = 384). With
    fsdp=16 the 48-wide shards are padded to 128 in HBM and the arguments come out ~25% above the
    count (measured: 0.109 vs 0.087 GiB), which is real memory, not an error of the report.
    Layers are scanned only to keep the compile short; the state is the same.
    """
    config = load_config("gpt2_124m", model__scan_layers=True, mesh__data=8, mesh__fsdp=2)
    report = aot.check_fits(config, "v5e-16")
    assert report.fits, report.message
    assert report.mesh == {"data": 8, "fsdp": 2, "expert": 1, "tensor": 1}
    hand_count = param_count(config.model) * 4 * 3 / 2
    assert report.state_bytes == pytest.approx(hand_count, rel=0.01)
    assert report.argument_bytes == pytest.approx(hand_count, rel=0.01)
    assert report.total_bytes < report.hbm_bytes
    assert report.collectives["all-gather"] > 0


@needs_libtpu
def test_oversized_replicated_config_is_refused_with_a_nonzero_exit():
    """~5.3B float32 parameters replicated on every chip (21 GB of params alone) on 16 GiB v5e."""
    overrides = dict(embed_dim=8192, num_heads=64, num_kv_heads=64, num_layers=6, scan_layers=True)
    argv = [f"--config.model.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "lmjax.aot", "--config=configs/gpt2_124m.py", "--topology=v5e-16",
         "--config.mesh.data=-1", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode != 0
    assert "DOES NOT FIT" in proc.stdout and "GiB" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@needs_libtpu
def test_mesh_that_does_not_divide_the_heads_names_the_parameter():
    config = load_config("gpt2_124m", model__vocab_size=50304, mesh__data=2, mesh__tensor=8)
    report = aot.check_fits(config, "v5e-16")
    assert not report.fits
    assert "attn" in report.message and "heads" in report.message and "tensor" in report.message


@needs_libtpu
def test_unknown_slice_names_the_known_ones():
    with pytest.raises(ValueError, match="v5e-16"):
        aot.check_fits(load_config("gpt2_124m"), "v5e-12")


def test_named_slices_cover_the_issue_list():
    for name in ("v4-8", "v4-128", "v5e-8", "v5e-256", "v5litepod-16", "v5p-8", "v5p-128", "v6e-8", "v6e-256"):
        assert hardware.get_slice(name).num_devices >= 4


def test_unknown_config_key_is_one_line_naming_the_key():
    """The same override check as lmjax.main (lmjax.cli): no traceback, the whole key, the valid ones."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmjax.aot", "--config=configs/gpt2_124m.py", "--topology=v5e-16",
         "--config.model.num_layer=6"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert "unknown config key config.model.num_layer" in proc.stderr and "num_layers" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
