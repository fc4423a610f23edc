"""Post-training configs: the pretraining config's keys, plus `posttrain`, `sft`, `dpo` and `reward`
sections; and `from_init`, which takes the model and tokenizer from the run being post-trained.

A post-training preset does not describe a model: the architecture (`model.*` except the runtime
keys dropout, dtype, attention and remat) and the tokenizer (`data.*` except seq_len) come from the
newest checkpoint of `--init_from`, and `model.vocab_size` grows to make room for the chat
template's special ids when the pretrained vocabulary has none to spare.
"""

from __future__ import annotations

import copy
import os

from ml_collections import config_dict

from lmjax import config as config_lib
from lmjax import data
from lmjax.posttrain import chat
from lmjax.posttrain.losses import DPO_LOSSES
from lmjax.train import checkpointing
from lmjax.train.workdir import TOKENIZER_FILE

MODES = ("sft", "dpo", "reward", "ppo")


def default_config(mode: str) -> config_dict.ConfigDict:
    """Defaults of a post-training run of `mode` (sft | dpo | reward); presets change what differs."""
    if mode not in MODES:
        raise ValueError(f"post-training mode {mode!r}: expected one of {MODES}")
    c = config_lib.default_config()
    c.name = f"posttrain_{mode}"
    p = c.posttrain = config_dict.ConfigDict()
    p.train_file = config_lib.placeholder(str)  # .jsonl of examples (schemas: lmjax/posttrain/dataset.py)
    p.eval_file = config_lib.placeholder(str)  # optional held-out .jsonl, evaluated every eval.every_steps
    p.shuffle = True  # shuffle the examples each epoch
    s = c.sft = config_dict.ConfigDict()
    s.prompt_loss_weight = 0.0  # loss weight of prompt tokens (responses weigh 1)
    s.packing = True  # several conversations per row (segments that do not attend to each other)
    d = c.dpo = config_dict.ConfigDict()
    d.beta = 0.1  # strength of the implicit KL leash to the reference model
    d.loss = "sigmoid"  # sigmoid (DPO) | ipo
    r = c.reward = config_dict.ConfigDict()
    r.center = 0.0  # weight of (r_chosen + r_rejected)^2: keeps rewards centred at 0
    o = c.ppo = config_dict.ConfigDict()
    o.reward_from = config_lib.placeholder(str)  # workdir of a --mode=reward run: scores rollouts, inits the value net
    o.max_new_tokens = 16  # tokens sampled per response
    o.temperature = 1.0  # rollout sampling temperature
    o.epochs = 2  # passes over each rollout batch
    o.minibatches = 2  # optimizer updates per epoch (train.batch_size rollouts split this many ways)
    o.clip = 0.2  # policy ratio clip
    o.value_clip = 0.2  # value clip around the rollout's values
    o.value_coef = 0.5  # weight of the value loss
    o.gamma = 1.0  # discount
    o.lam = 0.95  # GAE lambda
    o.kl_coef = 0.05  # penalty on k1 = log pi - log pi_ref, per token (initial value if adaptive)
    o.kl_target = 0.0  # > 0: adapt kl_coef towards this KL per response (Ziegler et al.); 0: fixed
    o.kl_horizon = 10000  # adaptive KL: rollouts over which the coefficient may change by ~e^0.2
    o.whiten_advantages = True  # standardise advantages per rollout batch
    c.data.seq_len = 128
    c.train.update(steps=200, batch_size=16, log_every=10)
    c.optim.update(lr=1e-4, warmup_steps=10, weight_decay=0.0, schedule="cosine")
    c.checkpoint.every_steps = 100
    c.eval.update(every_steps=50, num_samples=2, sample_tokens=32, sample_temperature=0.0)
    return c


def check(config: config_dict.ConfigDict, mode: str) -> None:
    """Post-training keys the pretraining check does not know."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
    missing = [section for section in ("posttrain", *MODES) if section not in config]
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)} section: --mode={mode} needs a post-training "
                         f"preset, e.g. configs/posttrain/{mode}.py")
    if config.dpo.loss not in DPO_LOSSES:
        raise ValueError(f"config.dpo.loss={config.dpo.loss!r} is not valid; choose one of: {', '.join(DPO_LOSSES)}")
    if config.dpo.beta <= 0:
        raise ValueError(f"config.dpo.beta={config.dpo.beta} must be > 0")
    if mode == "ppo":
        if not config.ppo.reward_from:
            raise ValueError("--mode=ppo needs config.ppo.reward_from: the workdir of a --mode=reward run")
        if config.train.batch_size % config.ppo.minibatches:
            raise ValueError(f"config.train.batch_size={config.train.batch_size} (rollouts per step) must split into "
                             f"config.ppo.minibatches={config.ppo.minibatches}")
    for key in ("sft.prompt_loss_weight", "reward.center", "ppo.kl_coef", "ppo.kl_target", "ppo.clip",
                "ppo.value_clip", "ppo.value_coef"):
        section, name = key.split(".")
        if config[section][name] < 0:
            raise ValueError(f"config.{key}={config[section][name]} must be >= 0")


def init_config(init_from: str, mesh: config_dict.ConfigDict, flag: str = "--init_from") -> config_dict.ConfigDict:
    """The config stored with the newest checkpoint of `init_from` (given as `flag`), on this run's mesh."""
    steps = checkpointing.committed_steps(init_from)
    if not steps:
        raise FileNotFoundError(f"{flag}={init_from}: no checkpoint in {checkpointing.checkpoint_dir(init_from)}")
    manager = checkpointing.make_manager(init_from, None, read_only=True)
    try:
        saved = checkpointing.saved_config(manager, steps[-1])
    finally:
        manager.close()
    if saved is None:
        raise ValueError(f"{flag}={init_from}: the config of checkpoint step {steps[-1]} cannot be read")
    config = config_dict.ConfigDict(saved)
    config.mesh = copy.deepcopy(mesh)
    if config.data.tokenizer == "sentencepiece" and not config.data.get("tokenizer_path"):
        path = os.path.join(init_from, TOKENIZER_FILE)
        config.data.tokenizer_path = path if os.path.isfile(path) else None
    return config


def from_init(config: config_dict.ConfigDict, init_from: str) -> tuple[config_dict.ConfigDict, config_dict.ConfigDict]:
    """(this run's config with the model and tokenizer of `init_from`, the config of `init_from`)."""
    init_from = os.path.abspath(init_from) if "://" not in init_from else init_from
    source = init_config(init_from, config.mesh)
    config = copy.deepcopy(config)
    runtime = {key: config.model[key] for key in config_lib.RUNTIME_MODEL_KEYS}
    seq_len = config.data.seq_len
    with config.unlocked():
        config.model = copy.deepcopy(source.model)
        config.data = copy.deepcopy(source.data)
    config.model.update(runtime)
    config.data.seq_len = seq_len
    tokenizer = data.build_tokenizer(config.data)
    needed = tokenizer.vocab_size + chat.NUM_SPECIAL
    if config.model.vocab_size < needed:
        config.model.vocab_size = needed
    return config, source
