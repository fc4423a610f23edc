"""A MoE model on 8 fake CPU devices (expert=4 x data=2) against 1 device, then `lmjax.main`
training it on that mesh; writes JSON to the file named by the last argument.

    moe_multidevice_check.py PRESET WORKDIR OVERRIDES_JSON OUT_JSON

Run by tests/test_moe.py in one subprocess, because the fake device count must be set before JAX is
imported. The comparison reuses tests/multidevice_check.py's `train_on` (random batches, a shared
start state); the command line run then goes through absl and the trainer as a user's would.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from multidevice_check import flatten, train_on  # noqa: E402

from lmjax import cli  # noqa: E402
from lmjax import config as config_lib  # noqa: E402

ONE = dict(data=1, fsdp=1, expert=1, tensor=1)
EXPERT4_DATA2 = dict(data=2, fsdp=1, expert=4, tensor=1)
BYTE_VOCAB = 259  # the byte tokenizer's ids: what the trainer fills model.vocab_size with


def compare(preset: str, overrides: dict) -> dict:
    c = config_lib.load(preset, overrides)
    c.model.vocab_size = BYTE_VOCAB
    eight = train_on(c, EXPERT4_DATA2, steps=3)
    one = train_on(c, ONE, steps=3, start=eight["start"])
    params_1, params_8 = (flatten(jax.device_get(r["state"].params)) for r in (one, eight))
    expert_kernel = flatten(eight["state"].params)["block_0/moe/up/kernel"]
    return {
        "losses_1": one["losses"], "losses_8": eight["losses"],
        "grad_norms_1": one["grad_norms"], "grad_norms_8": eight["grad_norms"],
        "max_param_diff": max(float(np.max(np.abs(params_8[k] - params_1[k]))) for k in params_1),
        "expert_kernel_shape": list(expert_kernel.shape),
        "expert_kernel_shard_shape": list(expert_kernel.addressable_shards[0].data.shape),
        "batch_spec": eight["batch"]["spec"],
    }


def train_with_main(preset: str, workdir: str, overrides: dict) -> int:
    """`python -m lmjax.main` in this process (its JAX has the 8 devices); its exit code."""
    argv = ["lmjax.main", f"--config={preset}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()),
            *(f"--config.mesh.{k}={v}" for k, v in EXPERT4_DATA2.items())]
    sys.argv = argv  # ml_collections registers the --config.* override flags from sys.argv on import
    from lmjax import main as main_module

    try:
        app.run(main_module.main, argv=argv, flags_parser=cli.parse_flags)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def main() -> None:
    preset, workdir, overrides, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    assert len(jax.devices()) == 8, jax.devices()
    results = compare(preset, overrides)
    results["main_exit_code"] = train_with_main(preset, workdir, overrides)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
