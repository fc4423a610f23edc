"""The device mesh, the logical-axis rules, and placing parameters and batches on the mesh.

Parallelism in lmjax is data, not code: the model names every array axis logically (`embed`,
`heads`, `batch`, ...), `config.mesh.rules` maps those names to the mesh axes `data`, `fsdp`,
`expert` and `tensor`, and the mesh sizes in `config.mesh` decide how many devices each axis spans.
Data parallelism, FSDP (ZeRO-3), Megatron tensor parallelism, MoE expert parallelism, and their
mixes, are choices of sizes.
"""

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES; one size may be -1 to take the devices the others leave."""
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    inferred = [axis for axis, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"Only one of config.mesh.{{{','.join(MESH_AXES)}}} may be -1, got {sizes}.")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {sizes}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if num_devices % known:
            raise ValueError(
                f"config.mesh.{inferred[0]}=-1 cannot take the remaining devices: {num_devices} "
                f"devices do not divide by the other axes' product {known} ({sizes})."
            )
        sizes[inferred[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh {sizes} spans {math.prod(sizes.values())} devices but there are "
            f"{num_devices}; set one axis to -1 to take the remaining devices."
        )
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (default: every device of every host).

    With `config.mesh.num_slices > 1` the data axis spans the slices (slow DCN links carry only
    the gradient all-reduce) and fsdp/expert/tensor stay inside a slice on the fast ICI links. Axis types
    are Auto: the step is a classic GSPMD program steered by sharding constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    num_slices = int(mesh_cfg.get("num_slices", 1))
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(
                f"config.mesh.data={shape[0]} must be a multiple of "
                f"config.mesh.num_slices={num_slices}: the data axis spans the slices."
            )
        per_slice = (shape[0] // num_slices, *shape[1:])
        device_array = mesh_utils.create_hybrid_device_mesh(
            per_slice, (num_slices,) + (1,) * (len(shape) - 1), devices, allow_split_physical_axes=True
        )
    else:
        device_array = mesh_utils.create_device_mesh(
            shape, devices, allow_split_physical_axes=True
        )
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules(mesh_cfg: Any) -> Rules:
    """The logical->mesh table of `config.mesh.rules` as a tuple, checked against the mesh axes."""
    table = []
    for entry in mesh_cfg.rules:
        logical, axes = entry
        axes = tuple(axes) if isinstance(axes, list) else axes
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            if axis not in MESH_AXES:
                raise ValueError(
                    f"config.mesh.rules maps {logical!r} to unknown mesh axis {axis!r}; "
                    f"mesh axes are {MESH_AXES}."
                )
        table.append((logical, axes))
    return tuple(table)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `nn.with_logical_constraint` bind while a function is traced.

    Flax's constraints are silently no-ops unless logical rules and a mesh are both in context.
    `jax.set_mesh` may not be entered inside `jax.jit`, but the abstract mesh can, so a jitted
    step opens this itself and is correct whatever context its caller (or an AOT compile) has.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def logical_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of one array whose axes have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def param_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` leaves (abstract or concrete); plain leaves
    (no logical names) are replicated. The result matches the tree after `nn.unbox`.

    Checks divisibility first, so a bad mesh fails naming the parameter, not deep inside jit.
    """
    check_divisible(boxed_tree, mesh, rules)
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def check_divisible(boxed_tree: Any, mesh: Mesh, rules: Rules) -> None:
    """Raises ValueError naming the parameter, its shape, the dimension and the mesh axes when a
    dimension is not a multiple of the mesh axes the rules shard it over."""
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue
        shape = leaf.value.shape
        spec = nn.logical_to_mesh_axes(leaf.names, rules)
        for dim, (name, axes) in enumerate(zip(leaf.names, spec)):
            ways = axes_size(mesh, axes)
            if shape[dim] % ways:
                axes = (axes,) if isinstance(axes, str) else tuple(axes)
                sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise ValueError(
                    f"Parameter {jax.tree_util.keystr(path, simple=True, separator='/')} of "
                    f"shape {tuple(shape)}: dimension {dim} (logical {name!r}, size {shape[dim]}) "
                    f"does not divide mesh axes {axes} ({sizes}, {ways} ways). Change "
                    f"config.mesh sizes or the {name!r} entry of config.mesh.rules."
                )


def axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    """How many ways one PartitionSpec entry splits an array dimension."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Rows split by the 'batch' rule (data x fsdp by default), every other axis replicated."""
    return logical_sharding(mesh, rules, ("batch",) + (None,) * (ndim - 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, rules: Rules, global_rows: int) -> tuple[int, int]:
    """The rows [start, stop) of a global batch that this process's devices hold.

    Processes own distinct rows when the batch axes span the hosts; when a non-batch axis spans
    them (e.g. tensor=8 on a v5e-16, four chips per host), several processes hold the same rows
    and must be fed the same data. A mesh on which one process would hold rows that are not
    contiguous is refused, naming its axes: no pipeline could feed it.
    """
    indices = batch_sharding(mesh, rules).addressable_devices_indices_map((global_rows, 1))
    spans = sorted({(s.start or 0, global_rows if s.stop is None else s.stop) for s, _ in indices.values()})
    start, stop = spans[0]
    for lo, hi in spans[1:]:
        if lo > stop:
            raise ValueError(
                f"process {jax.process_index()} would hold rows {spans} of each batch, which are not "
                f"contiguous, on mesh {dict(mesh.shape)}: order the mesh so each host's devices hold "
                f"neighbouring rows, or change config.mesh"
            )
        stop = max(stop, hi)
    return start, stop


def shard_batch(batch_np: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows (`process_rows` of the global batch, as the data
    pipeline yields them): no host ever holds rows its devices do not need."""
    batch_ways = axes_size(mesh, batch_sharding(mesh, rules).spec[0])
    # How many of the batch's `batch_ways` row blocks this process holds, hence the global row count.
    held = len(set(map(str, batch_sharding(mesh, rules).addressable_devices_indices_map((batch_ways, 1)).values())))
    out = {}
    for key, local in batch_np.items():
        local = np.asarray(local)
        rows, remainder = divmod(local.shape[0] * batch_ways, held)
        if remainder or rows % batch_ways:
            raise ValueError(
                f"Batch field {key!r}: {local.shape[0]} rows on this process do not split over its "
                f"{held} of the {batch_ways} row blocks of the 'batch' mesh axes; make "
                f"config.train.batch_size a multiple of {batch_ways}."
            )
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, rules, local.ndim), local, (rows, *local.shape[1:])
        )
    return out
