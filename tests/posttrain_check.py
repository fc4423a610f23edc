"""Post-training end to end on 8 fake CPU devices, for tests/test_posttrain.py (run in a subprocess
because the device count must be fixed before JAX is imported); prints JSON.

  trainer   DPO through `lmjax.posttrain.trainer` from a checkpoint on a data=8 mesh: 4 steps
            (checkpoints at 2 and 4), then step 4 deleted and the run resumed from step 2.
  ppo       four PPO steps from the same checkpoint, with a reward model of random weights
            (checkpoints at 2 and 4), then step 4 deleted and the run resumed from step 2.
  bad_sources  the errors of runs pointed at the wrong reward model or init model, or too long prompts.
  steps     two DPO train steps on one device and on a data=2 x fsdp=4 mesh.

A persistent compilation cache lets the resumed run reuse the first run's compiled programs.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmjax import config as config_lib  # noqa: E402
from lmjax import sharding  # noqa: E402
from lmjax.config import default_config  # noqa: E402
from lmjax.data.tokenizers import ByteTokenizer  # noqa: E402
from lmjax.model import Transformer  # noqa: E402
from lmjax.posttrain import batches, chat, losses, ppo_trainer, synthetic, trainer  # noqa: E402
from lmjax.posttrain import config as pt_config  # noqa: E402
from lmjax.posttrain.reward_model import RewardModel  # noqa: E402
from lmjax.train import checkpointing, metrics  # noqa: E402
from lmjax.train import step as step_lib  # noqa: E402
from lmjax.train.workdir import Setup  # noqa: E402

SEQ_LEN = 24


def tiny_lm_config():
    c = default_config()
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, max_len=32)
    c.data.update(tokenizer="byte", seq_len=SEQ_LEN)
    c.train.update(batch_size=8, steps=4)
    c.optim.update(warmup_steps=0, schedule="constant", lr=1e-3)
    return c


def host_init(abstract_state, seed):
    """A train state made with numpy: weights N(0, 0.02), norm scales 1, biases and optimizer state 0."""
    rng = np.random.default_rng(seed)

    def init(path, s):
        name = str(getattr(path[-1], "key", ""))
        value = 1.0 if name == "scale" else 0.0 if name == "bias" else rng.normal(0, 0.02, s.shape)
        return np.broadcast_to(value, s.shape).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(init, abstract_state.params)
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)  # noqa: E731
    return abstract_state.replace(params=params, opt_state=zeros(abstract_state.opt_state),
                                  step=zeros(abstract_state.step), rng=zeros(abstract_state.rng))


def random_checkpoint(directory, config, model=None, seed=0):
    """A checkpoint of `config`'s model (or `model`) with N(0, 0.02) weights, written without compiling
    (a byte-level language model has 259 vocabulary rows, which post-training grows to 263)."""
    setup = Setup(config, directory)
    if model is not None:
        setup.abstract_state, _ = step_lib.abstract_train_state(setup.config, model, setup.mesh)
    state = host_init(setup.abstract_state, seed)
    manager = checkpointing.make_manager(directory, setup.config.checkpoint)
    checkpointing.save(manager, 1, state, data_state={}, config=config_lib.to_json(setup.config))
    manager.wait_until_finished()
    manager.close()


def ppo_config(run, reward_dir, overrides=None):
    return config_lib.load("configs/posttrain/ppo.py", {
        "ppo.reward_from": reward_dir, "posttrain.train_file": run["files"]["pairs_train"], "data.seq_len": SEQ_LEN,
        "ppo.max_new_tokens": 6, "ppo.kl_target": 1.0, "ppo.kl_horizon": 100, "train.steps": 4,
        "train.batch_size": 16, "train.log_every": 1, "optim.lr": 1e-3, "checkpoint.every_steps": 2,
        **(overrides or {})})


def ppo_run(run):
    """Four PPO steps from the (grown) init model against a random reward model of the same shape
    (an adaptive KL coefficient, so the checkpoint must carry it), then step 4's checkpoint deleted
    and the run resumed from step 2."""
    root = os.path.dirname(run["init"])
    reward_dir, workdir = os.path.join(root, "reward"), os.path.join(root, "ppo")
    c = tiny_lm_config()
    c.model.vocab_size = 263
    random_checkpoint(reward_dir, c, RewardModel(c.model))
    first_run = ppo_trainer.PPORun(ppo_config(run, reward_dir), run["init"], workdir)
    first_run.run()
    first = metrics.read_metrics(workdir)
    saved = checkpointing.committed_steps(workdir)
    delete_step(workdir, 4)
    resumed_run = ppo_trainer.PPORun(ppo_config(run, reward_dir), run["init"], workdir)
    resumed_run.run()
    return {"first": first, "resumed": metrics.read_metrics(workdir), "saved_steps": saved,
            "max_param_diff": max_diff(first_run.state.params, resumed_run.state.params),
            "summary": metrics.read_summary(workdir)}


def delete_step(workdir, step):
    """As if the run had been killed after the checkpoint before `step`."""
    manager = checkpointing.make_manager(workdir, default_config().checkpoint)
    manager.delete(step)
    manager.close()


def max_diff(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def dpo_config(files):
    c = pt_config.default_config("dpo")
    c.posttrain.update(train_file=files["pairs_train"], eval_file=files["pairs_eval"])
    c.data.seq_len = SEQ_LEN
    c.train.update(steps=4, batch_size=8, log_every=1)
    c.optim.update(warmup_steps=0, schedule="constant", lr=1e-3)
    c.checkpoint.every_steps = 2
    c.eval.update(every_steps=100, num_samples=0)
    return c


def trainer_run(root):
    init, workdir = os.path.join(root, "init"), os.path.join(root, "dpo")
    random_checkpoint(init, tiny_lm_config())  # a "pretrained" model: the mechanics need no trained one
    files = synthetic.write_all(os.path.join(root, "data"), train=32, evaluation=12)
    first_run = trainer.PosttrainRun("dpo", dpo_config(files), init, workdir)
    first_run.run()
    first = metrics.read_metrics(workdir)
    saved = checkpointing.committed_steps(workdir)
    delete_step(workdir, 4)
    resumed_run = trainer.PosttrainRun("dpo", dpo_config(files), init, workdir)
    resumed_run.run()
    return {"first": first, "resumed": metrics.read_metrics(workdir), "saved_steps": saved,
            "max_param_diff": max_diff(first_run.state.params, resumed_run.state.params),
            "devices": len(jax.devices()), "init": init, "files": files, "workdir": workdir}


def other_model_error(run):
    """The DPO workdir resumed with --init_from pointing at a model of another width."""
    other = tiny_lm_config()
    other.model.embed_dim = 64
    directory = os.path.join(os.path.dirname(run["init"]), "other")
    random_checkpoint(directory, other)
    try:
        trainer.train("dpo", dpo_config(run["files"]), directory, run["workdir"])
    except ValueError as e:
        return str(e)
    return None


def bad_source_errors(run):
    """The errors of runs pointed at the wrong checkpoints or too long prompts (raised while the run
    is being built, before anything compiles or is written)."""
    root = os.path.dirname(run["init"])
    wide = tiny_lm_config()
    wide.model.update(vocab_size=263, embed_dim=64)
    random_checkpoint(os.path.join(root, "reward_wide"), wide, RewardModel(wide.model))
    attempts = {
        "reward_of_another_shape": lambda: ppo_trainer.PPORun(
            ppo_config(run, os.path.join(root, "reward_wide")), run["init"], os.path.join(root, "bad1")),
        "reward_is_a_language_model": lambda: ppo_trainer.PPORun(
            ppo_config(run, run["init"]), run["init"], os.path.join(root, "bad2")),
        "reward_missing": lambda: ppo_trainer.PPORun(
            ppo_config(run, os.path.join(root, "nothing")), run["init"], os.path.join(root, "bad3")),
        "init_is_a_reward_model": lambda: trainer.PosttrainRun(
            "dpo", dpo_config(run["files"]), os.path.join(root, "reward"), os.path.join(root, "bad4")),
        "prompt_too_long": lambda: ppo_trainer.PPORun(
            ppo_config(run, os.path.join(root, "reward"), {"ppo.max_new_tokens": 20}), run["init"],
            os.path.join(root, "bad5")),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = None
        except (ValueError, FileNotFoundError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    errors["workdirs_written"] = sorted(d for d in os.listdir(root) if d.startswith("bad"))
    return errors


def step_runs():
    """Two DPO train steps on 1 device and on data=2 x fsdp=4 from the same random weights (the
    reward model's step is the same step_lib.make_train_step with another loss)."""
    template = chat.ChatTemplate(ByteTokenizer())
    pairs = [{**p, "prompt": chat.conversation(p["prompt"])} for p in synthetic.preference_pairs(16, seed=5)]
    rows = batches.pair_rows(template, pairs, SEQ_LEN, pad_id=256)
    rows["ref_logps"] = np.random.default_rng(0).normal(-20.0, 2.0, (16, 2)).astype(np.float32)
    c = pt_config.default_config("dpo")
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, max_len=32, vocab_size=263)
    c.data.seq_len = SEQ_LEN
    c.train.update(steps=2, batch_size=8)
    c.optim.update(warmup_steps=0, schedule="constant", lr=1e-3)
    model = Transformer(c.model)
    loss_fn = losses.dpo_loss_sums_fn(c, model)
    start, results = None, {}
    for name, sizes in (("single", dict(data=1, fsdp=1, tensor=1)), ("data2_fsdp4", dict(data=2, fsdp=4, tensor=1))):
        c.mesh.update(sizes)
        mesh = sharding.make_mesh(c.mesh, jax.devices()[: sizes["data"] * sizes["fsdp"]])
        abstract, shardings = step_lib.abstract_train_state(c, model, mesh)
        if start is None:
            start = host_init(abstract, seed=1)
        state = jax.device_put(start, shardings)
        step = step_lib.make_train_step(c, model, mesh, shardings, loss_fn)
        record = []
        for i in range(2):
            part = {k: v[i * 8:(i + 1) * 8] for k, v in rows.items()}
            state, m = step(state, sharding.shard_batch(part, mesh, sharding.rules(c.mesh)))
            record.append({k: float(m[k]) for k in ("loss", "accuracy", "reward_margin", "grad_norm")})
        results[name] = {"metrics": record, "params": jax.device_get(state.params),
                         "embedding_shard": list(state.params["embedding"].addressable_shards[0].data.shape)}
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(results["single"].pop("params")), jax.tree.leaves(results["data2_fsdp4"].pop("params"))))
    return {"dpo": {**results, "max_param_diff": diff}}


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.path.join(sys.argv[1], "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cpu_s, start = {}, time.process_time()

    def timed(name, fn, *args):
        global start
        out = fn(*args)
        cpu_s[name], start = time.process_time() - start, time.process_time()
        return out

    run = timed("trainer", trainer_run, sys.argv[1])
    ppo = timed("ppo", ppo_run, run)
    result = {"trainer": {k: run[k] for k in ("first", "resumed", "saved_steps", "devices", "max_param_diff")},
              "other_model_error": timed("other", other_model_error, run), "ppo": ppo["first"][:2], "ppo_resume": ppo,
              "bad_sources": timed("bad_sources", bad_source_errors, run),
              "steps": timed("steps", step_runs), "cpu_s": cpu_s}
    print("JSON:" + json.dumps(result))
