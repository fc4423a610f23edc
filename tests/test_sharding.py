"""Mesh construction, the rules table, divisibility errors and batch placement (one device here;
8-device meshes are in test_multidevice.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from lmjax import sharding, train
from lmjax.config import default_config
from lmjax.model import Transformer


def mesh_cfg(**sizes):
    m = default_config().mesh
    m.update(sizes)
    return m


@pytest.mark.parametrize(
    "sizes,expected",
    [
        (dict(data=-1, fsdp=1, tensor=1), (8, 1, 1, 1)),
        (dict(data=2, fsdp=-1, tensor=2), (2, 2, 1, 2)),
        (dict(data=1, fsdp=4, tensor=-1), (1, 4, 1, 2)),
        (dict(data=2, fsdp=4, tensor=1), (2, 4, 1, 1)),
        (dict(data=2, fsdp=1, expert=-1, tensor=1), (2, 1, 4, 1)),
    ],
)
def test_mesh_shape_infers_minus_one(sizes, expected):
    assert sharding.mesh_shape(mesh_cfg(**sizes), 8) == expected


@pytest.mark.parametrize(
    "sizes,match",
    [
        (dict(data=-1, fsdp=-1, tensor=1), "Only one"),
        (dict(data=-1, fsdp=3, tensor=1), "do not divide"),
        (dict(data=2, fsdp=2, tensor=1), "spans 4 devices but there are 8"),
        (dict(data=0, fsdp=1, tensor=1), "positive"),
    ],
)
def test_mesh_shape_errors_are_readable(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape(mesh_cfg(**sizes), 8)


def test_make_mesh_has_auto_axes_over_all_devices():
    mesh = sharding.make_mesh(mesh_cfg())
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "expert": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_rules_come_from_config_and_reject_unknown_axes():
    rules = sharding.rules(mesh_cfg())
    assert rules[1] == ("batch", ("data", "fsdp", "expert")) and dict(rules)["heads"] == "tensor"
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.rules(mesh_cfg(rules=(("heads", "model"),)))


def tiny_model_config():
    c = default_config()
    c.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, max_len=16)
    c.data.seq_len = 16
    return c


def abstract_mesh(data, fsdp, tensor, expert=1):
    return AbstractMesh((data, fsdp, expert, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def test_divisibility_error_names_parameter_shape_and_axes():
    c = tiny_model_config()
    boxed = train.abstract_params(c, Transformer(c.model))
    rules = sharding.rules(c.mesh)
    sharding.check_divisible(boxed, abstract_mesh(2, 4, 2), rules)  # everything divides
    with pytest.raises(ValueError) as e:
        sharding.check_divisible(boxed, abstract_mesh(1, 1, 4), rules)  # 2 kv heads over 4
    message = str(e.value)
    assert "block_0/attn/key/bias" in message and "(2, 16)" in message
    assert "dimension 0" in message and "'kv_heads'" in message and "tensor=4" in message
    with pytest.raises(ValueError, match=r"Parameter .* \(logical 'embed', size 64\)"):
        sharding.check_divisible(boxed, abstract_mesh(1, 128, 1), rules)


def test_shard_batch_places_rows_by_the_batch_rule():
    mesh = sharding.make_mesh(mesh_cfg())
    rules = sharding.rules(mesh_cfg())
    inputs = np.arange(32, dtype=np.int32).reshape(4, 8)
    batch = sharding.shard_batch({"inputs": inputs}, mesh, rules)
    assert batch["inputs"].sharding.spec == PartitionSpec(("data", "fsdp", "expert"), None)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), inputs)
    assert sharding.process_rows(mesh, rules, 4) == (0, 4)  # one process feeds every row
