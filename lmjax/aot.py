"""Will it fit? Compile a config's real train step for a TPU slice ahead of time, on any machine.

    python -m lmjax.aot --config=configs/gpt2_124m.py --topology=v5e-16 [--num_slices=2] \\
        [--config.mesh.fsdp=-1 --config.mesh.data=1 ...]

With the `jax[tpu]` extra (libtpu), `get_topology_desc` gives the compile-only devices of a slice on
a CPU-only machine and the real TPU compiler runs here. We build the mesh from `config.mesh` over
those devices, lower the same jitted `train_step` the trainer uses (same shardings, donated state)
on `jax.ShapeDtypeStruct` inputs, compile it, and read per-chip memory from the compiler. A step
that would not fit fails here with the same RESOURCE_EXHAUSTED as on the hardware, minutes and
dollars earlier. FLOPs come from `flops_per_token`, not `cost_analysis()`, which counts a scanned
loop body once.

`check_fits(config, topology)` is the library entry point (the sweep launcher's preflight).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from lmjax import cli, hardware, sharding, train
from lmjax.model import Transformer, flops_per_token

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
# What the data pipeline yields: concat packing needs no positions or segment ids (plain causal).
BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
SEGMENT_FIELDS = {"positions": jnp.int32, "segment_ids": jnp.int32}
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


@dataclasses.dataclass
class Report:
    """The verdict for one (config, slice). Byte figures are per chip; None where not compiled."""

    fits: bool
    message: str
    topology: str
    num_slices: int = 1
    num_devices: int = 0
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    hbm_bytes: int = 0
    state_bytes: int | None = None  # the sharded train state, counted from shapes (no padding)
    argument_bytes: int | None = None  # state + batch as the compiler lays them out
    output_bytes: int | None = None
    alias_bytes: int | None = None  # outputs written in place of donated arguments
    temp_bytes: int | None = None  # activations, gradients, optimizer temporaries
    code_bytes: int | None = None
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)
    compile_seconds: float | None = None
    flops_per_step: float = 0.0
    step_seconds_at_50pct_mfu: float = 0.0

    @property
    def total_bytes(self) -> int | None:
        """Peak HBM the program needs: arguments + outputs not aliased to them + temporaries + code."""
        if self.argument_bytes is None:
            return None
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def table(self) -> str:
        gib = lambda b: "-" if b is None else f"{b / hardware.GiB:8.3f} GiB"
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [f"slice        {self.topology} x {self.num_slices} slice(s), {self.num_devices} devices, mesh {mesh}"]
        if self.argument_bytes is None:
            rows.append(f"train state  {gib(self.state_bytes)} per chip   (not compiled)")
        else:
            rows += [
                f"arguments    {gib(self.argument_bytes)}   (train state {gib(self.state_bytes)} + batch)",
                f"outputs      {gib(self.output_bytes)}   ({gib(self.alias_bytes)} of them in donated buffers)",
                f"temporaries  {gib(self.temp_bytes)}",
                f"code         {gib(self.code_bytes)}",
                f"total        {gib(self.total_bytes)}   of {gib(self.hbm_bytes)} HBM per chip",
                "collectives  " + ", ".join(f"{k} {v}" for k, v in self.collectives.items())
                + "   (static count in the HLO; a loop body counts once)",
            ]
        if self.compile_seconds is not None:
            rows.append(f"compile      {self.compile_seconds:.1f} s")
        rows += [
            f"FLOPs/step   {self.flops_per_step:.3e}   -> {self.step_seconds_at_50pct_mfu * 1e3:.1f} ms/step at 50% MFU",
            f"verdict      {'FITS' if self.fits else 'DOES NOT FIT'}: {self.message}",
        ]
        return "\n".join(rows)


def topology_devices(topology: str, num_slices: int = 1) -> tuple[hardware.TpuSlice, list[Any]]:
    """The named slice and its compile-only devices (all slices' devices when num_slices > 1)."""
    tpu_slice = hardware.get_slice(topology)
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; compile-only
    # devices drive none, and without this a second compiling process (pytest workers, a preflight
    # next to a test run, a lockfile left by a killed run) fails with "ABORTED ... lockfile".
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(**tpu_slice.topology_kwargs(), num_slices=num_slices)
    except Exception as e:  # libtpu missing or refusing: say how to get it, not a bare traceback
        raise cli.UserError(
            f"Cannot describe TPU topology {tpu_slice.topology} ({e}). Compiling for TPU needs "
            f"libtpu: pip install -e '.[tpu]'."
        ) from e
    return tpu_slice, list(desc.devices)


def abstract_batch(config: Any, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as the trainer feeds it: [batch_size, seq_len] per field, split by 'batch'."""
    shape = (int(config.train.batch_size), int(config.data.seq_len))
    batch_sharding = sharding.batch_sharding(mesh, sharding.rules(config.mesh))
    fields = {**BATCH_FIELDS, **(SEGMENT_FIELDS if config.data.packing == "segments" else {})}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, dtype in fields.items()}


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops in compiled HLO text (an async start/done pair counts once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE_RE.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def _with_vocab(config: Any) -> Any:
    """A copy of `config` whose model.vocab_size is set (the trainer fills it from the tokenizer;
    here, before any tokenizer exists, the configured SentencePiece size stands in)."""
    config = copy.deepcopy(config)
    if config.model.vocab_size is None:
        config.model.vocab_size = int(config.data.vocab_size)
    return config


def step_estimate(config: Any, chip: hardware.Chip, num_devices: int) -> tuple[float, float]:
    """(FLOPs of one train step of `config`, its seconds at 50% MFU on `num_devices` chips)."""
    config = _with_vocab(config)
    tokens = int(config.train.batch_size) * int(config.data.seq_len)
    flops = flops_per_token(config.model, int(config.data.seq_len)) * tokens
    return flops, flops / (0.5 * chip.peak_bf16_flops * num_devices)


def check_fits(config: Any, topology: str, num_slices: int = 1) -> Report:
    """Compiles the train step of `config` for `num_slices` slices of `topology` (e.g. "v5e-16").

    Never raises for a config problem: a mesh that does not divide a dimension, or a step that
    does not fit in HBM, comes back as `Report(fits=False, message=...)`. Raises ValueError for an
    unknown slice name and RuntimeError when TPU topologies are unavailable (no libtpu).
    """
    config = _with_vocab(config)
    config.mesh.num_slices = int(num_slices)
    tpu_slice, devices = topology_devices(topology, num_slices)
    chip = tpu_slice.chip
    flops, seconds = step_estimate(config, chip, len(devices))
    report = Report(
        fits=False, message="", topology=tpu_slice.name, num_slices=int(num_slices),
        num_devices=len(devices), hbm_bytes=chip.hbm_bytes, flops_per_step=flops,
        step_seconds_at_50pct_mfu=seconds,
    )
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
        report.mesh = dict(mesh.shape)
        model = Transformer(config.model)
        state, state_shardings = train.abstract_train_state(config, model, mesh)
        report.state_bytes = _shard_bytes(state)
        step = train.make_train_step(config, model, mesh, state_shardings)
        batch = abstract_batch(config, mesh)
    except ValueError as e:  # a dimension that does not divide the mesh, a bad mesh size
        report.message = str(e)
        return report
    if report.state_bytes > chip.hbm_bytes:
        report.message = (
            f"the sharded train state alone needs {report.state_bytes / hardware.GiB:.2f} GiB per chip, "
            f"more than the {chip.hbm_bytes / hardware.GiB:.0f} GiB of HBM of a {chip.name} chip "
            f"(not compiled). Shard it further: raise config.mesh.fsdp, or use more chips."
        )
        return report
    start = time.perf_counter()
    try:
        compiled = step.lower(state, batch).compile()
    except Exception as e:  # XLA reports an over-budget program as RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.compile_seconds = time.perf_counter() - start
        first_lines = "\n".join(str(e).strip().splitlines()[:3])
        report.message = f"the compiler ran out of HBM on a {chip.name} chip: {first_lines}"
        return report
    report.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report.argument_bytes = int(memory.argument_size_in_bytes)
    report.output_bytes = int(memory.output_size_in_bytes)
    report.alias_bytes = int(memory.alias_size_in_bytes)
    report.temp_bytes = int(memory.temp_size_in_bytes)
    report.code_bytes = int(memory.generated_code_size_in_bytes)
    report.collectives = count_collectives(compiled.as_text())
    report.fits = report.total_bytes <= chip.hbm_bytes
    used = f"{report.total_bytes / hardware.GiB:.2f} GiB of {chip.hbm_bytes / hardware.GiB:.0f} GiB HBM per chip"
    report.message = used if report.fits else f"needs {used}"
    return report


def _report() -> None:
    config = _FLAGS.config
    num_slices = _FLAGS.num_slices or int(config.mesh.num_slices)
    report = check_fits(config, _FLAGS.topology, num_slices)
    if report.state_bytes is None:  # stopped before any memory figure: the message says why
        raise ValueError(report.message)
    print(f"{config.name} on {report.topology}" + (f" x {num_slices}" if num_slices > 1 else ""))
    print(report.table())
    if not report.fits:
        sys.exit(1)


def main(argv: list[str]) -> None:
    del argv
    cli.run(_report)


if __name__ == "__main__":
    # Compile-only TPU devices need libtpu but no TPU; keep JAX itself off any local accelerator.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Preset file, e.g. configs/gpt2_124m.py.")
    flags.DEFINE_string("topology", None, "Named TPU slice, e.g. v5e-16, v5litepod-16, v4-8, v5p-128.")
    flags.DEFINE_integer("num_slices", None, "Slices joined over DCN (default: config.mesh.num_slices).")
    flags.mark_flags_as_required(["config", "topology"])
    _FLAGS = flags.FLAGS
    app.run(main, flags_parser=cli.parse_flags)
