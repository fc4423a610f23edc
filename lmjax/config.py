"""The config: every key with its default and meaning, the checks a config must pass, and loading it.

Preset files in `configs/` start from `default_config()` and change only what differs, so a key
exists (and can be overridden with `--config.section.key=value`) in every preset. `check` is run
before a job writes anything and names the first bad key with the values that would work; the
valid values of each enumerated key are declared once, by the module that implements them.
`load` is the one way a preset file becomes a config (entry points, sweeps, notebooks).
"""

from __future__ import annotations

import json
import os
import runpy
from collections.abc import Mapping
from typing import Any

from ml_collections import config_dict

placeholder = config_dict.placeholder

# Logical axis name -> mesh axes. Parameters and activations name their axes logically; this
# table alone decides data parallelism, FSDP (ZeRO-3), Megatron tensor parallelism and MoE expert parallelism.
# 'expert' comes first so that an array with an expert axis takes the expert mesh axis there and
# splits its rows over the second 'batch' entry; any other array's rows split over the first.
DEFAULT_RULES = (
    ("expert", "expert"),
    ("batch", ("data", "fsdp", "expert")),
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)
DTYPES = ("float32", "bfloat16", "float16")
# Model keys that change how the parameters are used, not what they are: free to differ from the
# checkpoint's (e.g. evaluate in bfloat16 a model trained in float32).
RUNTIME_MODEL_KEYS = ("dropout", "dtype", "attention", "remat")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.name = "default"  # run/preset name, recorded in summary.json

    m = c.model = config_dict.ConfigDict()
    m.num_layers = 4  # transformer blocks
    m.embed_dim = 256  # residual stream width d
    m.num_heads = 4  # query heads
    m.num_kv_heads = 4  # key/value heads: = num_heads MHA, 1 MQA, between GQA
    m.head_dim = placeholder(int)  # per-head width; None: embed_dim // num_heads
    m.mlp_dim = placeholder(int)  # FFN hidden width; None: mlp_ratio * embed_dim
    m.mlp_ratio = 4.0  # FFN hidden width / embed_dim when mlp_dim is None
    m.vocab_size = placeholder(int)  # None: filled from the tokenizer; set: must be >= it
    m.vocab_multiple = placeholder(int)  # embedding/head rows: vocab_size rounded up to this (128 for TPU meshes); the padding ids' logits are masked. None: 1
    m.max_len = 256  # longest sequence (learned positions table, KV-cache size)
    m.position = "learned"  # learned | sinusoidal | rope | alibi | none
    m.rope_theta = 10000.0  # RoPE base frequency
    m.rope_scaling = "none"  # none | linear (position interpolation) | ntk (base scaling)
    m.rope_scaling_factor = 1.0  # context extension factor for rope_scaling
    m.mlp = "gelu_tanh"  # gelu | gelu_tanh | relu | swiglu
    m.norm = "layernorm"  # layernorm | rmsnorm
    m.norm_eps = 1e-5  # epsilon inside the norms
    m.qk_norm = False  # normalize queries and keys per head before the dot product
    m.use_bias = True  # biases in dense layers and LayerNorm
    m.tie_embeddings = True  # LM head shares the token embedding matrix
    m.dropout = 0.0  # dropout on embeddings, residual branches and attention weights
    m.init_std = 0.02  # std of the normal initializer of weight matrices
    m.attention = "einsum"  # einsum (readable reference) | dot_product (jax.nn.dot_product_attention) | cudnn (its GPU flash kernel)
    m.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
    m.param_dtype = "float32"  # parameter (and optimizer state) dtype
    m.remat = "none"  # gradient checkpointing: none | full | dots
    m.scan_layers = False  # nn.scan over blocks: one compiled block, fast compiles of deep models
    moe = m.moe = config_dict.ConfigDict()  # Mixture-of-Experts FFNs (lmjax/model/moe.py)
    moe.num_experts = 0  # routed experts in every block's FFN; 0: the dense FFN
    moe.experts_per_token = 2  # k: experts each token is sent to
    moe.shared_experts = 0  # experts every token also goes through (DeepSeekMoE), as one FFN
    moe.expert_dim = placeholder(int)  # one expert's hidden width; None: the dense FFN's (mlp_dim)
    moe.router = "softmax"  # softmax | sigmoid: expert scores from the router logits
    moe.renormalize = True  # mix the top-k with weights rescaled to sum to 1 (Mixtral); False: raw scores (Switch)
    moe.dispatch = "dropless"  # dropless (grouped matmul, jax.lax.ragged_dot) | capacity (einsum, drops overflow)
    moe.capacity_factor = 1.25  # capacity: slots per expert and row = ceil(k * seq_len * factor / num_experts)
    moe.load_balance_loss = 0.01  # weight of the Switch load-balancing loss in the objective
    moe.router_z_loss = 0.001  # weight of the ST-MoE router z-loss in the objective

    d = c.data = config_dict.ConfigDict()
    d.source = "pystdlib"  # pystdlib | text:<glob> | tfds:<name>[/<config>] | prepared:<dir> (lmjax.data.prepare output) | store:<dir> (prepare --store: token shards)
    d.text_key = "text"  # field holding the text in .jsonl and tfds examples
    d.train_split = "train"  # split names (tfds: any split spec such as train[:90%])
    d.val_split = "validation"
    d.val_fraction = 0.05  # pystdlib/text: share of documents (or of a single file's tail) held out
    d.doc_split = "file"  # text: sources: file (one document per file) | blank_line (per paragraph block)
    d.text_split = "hash"  # text: split: hash (of each document's path#index) | tail (last val_fraction of the text, nanoGPT-style)
    d.tfds_data_dir = placeholder(str)  # tfds data_dir (a gs:// bucket on TPU VMs); None: tfds default
    d.tokenizer = "sentencepiece"  # sentencepiece | byte | char | gpt2 | <path>/tokenizer.json (Hugging Face) | <path>.model (SentencePiece)
    d.tokenizer_path = placeholder(str)  # an existing SentencePiece .model to load instead of training
    d.vocab_size = 4096  # SentencePiece vocabulary size to train
    d.spm_model_type = "bpe"  # bpe | unigram
    d.character_coverage = 0.9995  # SentencePiece character coverage
    d.byte_fallback = True  # unknown characters become bytes, so any text round-trips
    d.tokenizer_max_sentences = 200_000  # cap on lines read to train the tokenizer
    d.cache_dir = placeholder(str)  # tokenizer/token caches; None: ~/.cache/lmjax
    d.store_dir = placeholder(str)  # token stores the first use of a text:/tfds: source writes (local or gs://); None: <cache_dir>/stores; "": off (tokenize in memory)
    d.max_documents = placeholder(int)  # use only the first N documents of each split; None: all
    d.tfds_download = True  # tfds: download and prepare the dataset if data_dir lacks it
    d.seq_len = 128  # tokens per training row
    d.packing = "concat"  # concat (EOS-joined stream) | segments (whole documents, no cross-attention)
    d.shuffle = True  # shuffle rows each epoch
    d.seed = 0  # shuffling seed
    d.grain_workers = 0  # grain worker processes (0: load in the training process)
    d.prefetch_threads = 0  # batches read ahead by grain threads (a store in a bucket: overlaps request latency)
    d.clean = config_dict.ConfigDict()  # cleaning, applied by lmjax.data.prepare
    d.clean.exact_dedup = True  # drop exact duplicates (hash of normalized text)
    d.clean.near_dedup = True  # drop MinHash/LSH near-duplicates
    d.clean.shingle_size = 5  # word n-gram size of MinHash shingles
    d.clean.num_perm = 128  # MinHash permutations
    d.clean.bands = 16  # LSH bands (bands * rows == num_perm)
    d.clean.jaccard_threshold = 0.8  # near-duplicate Jaccard threshold
    d.clean.min_chars = 64  # drop documents shorter than this
    d.clean.max_chars = 1_000_000  # drop documents longer than this
    d.clean.max_repeated_line_ratio = 0.3  # drop if this share of lines are repeats
    d.clean.max_repeated_ngram_ratio = 0.3  # drop if this share of word 3-grams are repeats
    d.clean.max_non_alnum_ratio = 0.5  # drop if this share of characters is not alphanumeric/space

    t = c.train = config_dict.ConfigDict()
    t.steps = 1000  # optimizer steps
    t.batch_size = 32  # global batch, in sequences
    t.microbatches = 1  # gradient accumulation: the batch is split into this many scanned chunks
    t.seed = 0  # parameter init, dropout
    t.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss (PaLM); 0 disables
    # Scheduled sampling (lmjax/train/scheduled_sampling.py): gold inputs replaced by the model's own
    # guesses with a probability that follows this schedule: none | constant | linear | exponential | inverse_sigmoid
    t.scheduled_sampling = "none"
    t.scheduled_sampling_k = 1000.0  # the schedule's k: linear: steps to reach 1; exponential: k^i (< 1); inverse_sigmoid: k
    t.scheduled_sampling_max = 0.25  # cap on the replacement probability
    t.log_every = 10  # steps between metric lines
    # Early exits (lmjax/model/early_exit.py): layer counts after which the final norm and head also
    # predict, trained by a LayerSkip-style depth-weighted sum of their losses; () is off.
    t.early_exit_layers = ()
    t.early_exit_scale = 1.0  # weight of the exits against the last layer (0: the plain loss)

    o = c.optim = config_dict.ConfigDict()
    o.name = "adamw"  # adamw | adafactor | lion | sgd
    o.lr = 3e-4  # peak learning rate
    o.schedule = "cosine"  # cosine | linear | constant | wsd
    o.warmup_steps = 100  # linear warmup from 0
    o.min_lr_ratio = 0.1  # final lr / peak lr (cosine, linear, wsd)
    o.decay_fraction = 0.2  # wsd: share of steps in the final decay
    # wsd: extra token budgets one run reports, as steps < train.steps (empty: none). For each s the
    # trainer decays a branch off the stable phase (the last decay_fraction * s steps of a length-s
    # run), evaluates it, records {step, tokens, val_loss, val_ppl, val_bpb, train_loss, decay_start}
    # in DIR/wsd_points.jsonl and summary.json's "wsd_points", and continues the main run undecayed
    # (its losses are unchanged). launch.collect makes each point a row of its own.
    o.wsd_decay_points = ()
    o.weight_decay = 0.1  # decoupled, scaled by the lr: p -= lr_t * weight_decay * p (not biases, norm scales)
    o.decay_embeddings = True  # apply weight decay to embedding tables too
    o.b1 = 0.9  # Adam/Lion beta1; SGD and Adafactor momentum (0: none)
    o.b2 = 0.95  # Adam/Lion beta2 (Adafactor's second moment follows its own 1 - t^-0.8)
    o.eps = 1e-8  # Adam epsilon (Adafactor adds its own 1e-30 to squared gradients)
    o.clip = 1.0  # global-norm gradient clipping; 0 disables

    ds = c.distill = config_dict.ConfigDict()  # knowledge distillation (lmjax/train/distill.py)
    ds.teacher_workdir = placeholder(str)  # a trained run whose newest checkpoint teaches; None: off
    ds.temperature = 2.0  # softmax temperature of both distributions in the KL
    ds.alpha = 0.5  # weight of the soft (KL) loss; 1 - alpha weighs the token cross-entropy
    ds.reverse_kl = 0.0  # share of KL(student || teacher) in the KL; the rest is KL(teacher || student)

    pr = c.prune = config_dict.ConfigDict()  # pruning and its recovery fine-tune (lmjax/train/pruning.py)
    pr.from_workdir = placeholder(str)  # a trained run to prune and fine-tune with a fixed mask; None: off
    pr.method = "magnitude"  # magnitude | wanda | 2:4 | heads
    pr.sparsity = 0.5  # share of each matrix's weights (heads: of each layer's heads) set to zero
    pr.calibration_batches = 4  # wanda: training batches whose activations weigh |W|

    mesh = c.mesh = config_dict.ConfigDict()
    mesh.data = -1  # data-parallel axis size; -1 takes the remaining devices
    mesh.fsdp = 1  # fully-sharded data-parallel axis size (params sharded over it)
    mesh.tensor = 1  # tensor-parallel axis size (heads, mlp, vocab split over it)
    mesh.expert = 1  # expert-parallel axis size (MoE experts split over it; it splits the batch too)
    mesh.num_slices = 1  # multislice: the data axis spans slices (DCN)
    mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes table

    ck = c.checkpoint = config_dict.ConfigDict()
    ck.every_steps = 500  # steps between checkpoints (one is always written at the end)
    ck.max_to_keep = 3  # newest checkpoints kept
    ck.async_save = True  # write checkpoints in the background

    e = c.eval = config_dict.ConfigDict()
    e.every_steps = 500  # steps between validation passes (and one at the end)
    e.steps = 10  # validation batches: a fixed seeded sample over the whole split; -1: all of it; 0: none
    e.batch_size = placeholder(int)  # None: train.batch_size
    e.num_samples = 2  # sampled continuations logged at each eval
    e.sample_tokens = 64  # tokens per logged sample
    e.sample_prompt = "def "  # prompt of the logged samples
    e.sample_temperature = 0.8  # softmax temperature of the logged samples (0: greedy)
    return c


def load(path: str, overrides: Mapping[str, Any] = ()) -> config_dict.ConfigDict:
    """A preset file's `get_config()` (`file.py` or `file.py:arg`, as `--config` takes it) with dotted
    overrides (`{"train.steps": 10}`) applied; an unknown key is a ValueError naming it. A relative
    path is looked up in the working directory, then in the repository."""
    file, _, arg = path.partition(":")
    if not os.path.isabs(file) and not os.path.isfile(file):
        file = os.path.join(REPO_ROOT, file)  # `configs/x.py` names a preset from any directory
    if not os.path.isfile(file):
        raise FileNotFoundError(f"config file {file} does not exist")
    namespace = runpy.run_path(file)
    if "get_config" not in namespace:
        raise ValueError(f"config file {file} defines no get_config()")
    config = namespace["get_config"](arg) if arg else namespace["get_config"]()
    for key, value in dict(overrides).items():
        node, leaf = _parent(config, key, file)
        node[leaf] = value
    return config


def unknown_key(config: config_dict.ConfigDict, key: str) -> str | None:
    """Why `key` ("section.name") is not a key of `config`, naming the keys that exist there, or None."""
    node, seen = config, []
    for part in key.split("."):
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            where = "config" + "".join(f".{s}" for s in seen)
            valid = ", ".join(sorted(node.keys())) if isinstance(node, config_dict.ConfigDict) else "(not a section)"
            return f"unknown config key {where}.{part}; the keys of {where} are: {valid}"
        node, seen = node[part], seen + [part]
    return None


def _parent(config: config_dict.ConfigDict, key: str, file: str) -> tuple[config_dict.ConfigDict, str]:
    problem = unknown_key(config, key)
    if problem:
        raise ValueError(f"{problem} (overriding {file})")
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    return node, leaf


def choices() -> dict[str, tuple[str, ...]]:
    """The valid values of every enumerated key, read from the modules that implement them (imported
    here, not at the top, so that loading a preset stays free of JAX)."""
    from lmjax.data import packing, sources, tokenizers
    from lmjax.model import attention, mlp, moe, norms, positions, transformer
    from lmjax.train import optimizer, scheduled_sampling, schedules

    return {
        "model.position": positions.POSITION_TYPES,
        "model.rope_scaling": positions.ROPE_SCALINGS,
        "model.mlp": mlp.MLP_TYPES,
        "model.norm": norms.NORMS,
        "model.attention": attention.IMPLEMENTATIONS,
        "model.dtype": DTYPES,
        "model.param_dtype": DTYPES,
        "model.remat": transformer.REMAT_CHOICES,
        "model.moe.router": moe.ROUTERS,
        "model.moe.dispatch": moe.DISPATCHES,
        "data.spm_model_type": tokenizers.SPM_MODEL_TYPES,
        "data.packing": packing.PACKINGS,
        "data.doc_split": sources.DOC_SPLITS,
        "data.text_split": sources.TEXT_SPLITS,
        "optim.name": optimizer.OPTIMIZERS,
        "optim.schedule": schedules.SCHEDULES,
        "train.scheduled_sampling": scheduled_sampling.SCHEDULES,
    }


AT_LEAST_ONE = (
    "model.num_layers", "model.embed_dim", "model.num_heads", "model.num_kv_heads", "model.max_len",
    "data.seq_len", "train.steps", "train.batch_size", "train.microbatches", "train.log_every",
    "checkpoint.every_steps", "checkpoint.max_to_keep", "eval.every_steps",
)
AT_LEAST_ZERO = (
    "optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip", "train.z_loss",
    "eval.num_samples", "eval.sample_tokens", "eval.sample_temperature", "data.grain_workers",
    "data.prefetch_threads",
    "train.early_exit_scale",
)


def _get(config: config_dict.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check(config: config_dict.ConfigDict) -> None:
    """Raise ValueError naming the first key whose value cannot work (the valid values included)."""
    for key, valid in choices().items():
        if _get(config, key) not in valid:
            raise ValueError(f"config.{key}={_get(config, key)!r} is not valid; choose one of: {', '.join(valid)}")
    for key in AT_LEAST_ONE:
        if _get(config, key) < 1:
            raise ValueError(f"config.{key}={_get(config, key)} must be >= 1")
    for key in AT_LEAST_ZERO:
        if _get(config, key) < 0:
            raise ValueError(f"config.{key}={_get(config, key)} must be >= 0")
    if config.eval.steps < -1:
        raise ValueError(f"config.eval.steps={config.eval.steps} must be a batch count, -1 (the whole split) "
                         "or 0 (no validation)")
    if config.optim.warmup_steps > config.train.steps:
        raise ValueError(
            f"config.optim.warmup_steps={config.optim.warmup_steps} exceeds config.train.steps={config.train.steps}"
        )
    if not 0.0 <= config.train.scheduled_sampling_max <= 1.0:
        raise ValueError(f"config.train.scheduled_sampling_max={config.train.scheduled_sampling_max} must be in [0, 1]")
    k, schedule = config.train.scheduled_sampling_k, config.train.scheduled_sampling
    k_valid = {"linear": ("> 0", k > 0), "exponential": ("in (0, 1)", 0 < k < 1), "inverse_sigmoid": (">= 1", k >= 1)}
    if not k_valid.get(schedule, ("", True))[1]:
        raise ValueError(f"config.train.scheduled_sampling_k={k} must be {k_valid[schedule][0]} for "
                         f"config.train.scheduled_sampling={schedule!r}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ValueError(f"config.model.dropout={config.model.dropout} must be in [0, 1)")
    if config.model.vocab_size is not None and config.model.vocab_size < 1:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} must be >= 1 (or unset)")
    if config.model.get("vocab_multiple", None) is not None and config.model.vocab_multiple < 1:
        raise ValueError(f"config.model.vocab_multiple={config.model.vocab_multiple} must be >= 1 (or unset)")
    if config.model.position == "learned" and config.data.seq_len > config.model.max_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len={config.model.max_len}, "
            "the size of the learned position table"
        )
    from lmjax.data import sources, tokenizers
    from lmjax.model import moe

    tokenizers.check_name(config.data.tokenizer)
    moe.check(config.model)
    if not config.data.source.startswith(sources.SOURCE_KINDS):
        raise ValueError(
            f"config.data.source={config.data.source!r}: expected pystdlib, text:<glob>, tfds:<name>, prepared:<dir>, "
            f"store:<dir> or arithmetic:<seed>"
        )
    check_decay_points(config)


def check_decay_points(config: config_dict.ConfigDict) -> None:
    """`optim.wsd_decay_points` must be whole step counts below `train.steps` whose decay phase has
    at least one step and starts after warmup; only a WSD run has a stable phase to branch from, and
    a point is only worth its decay steps if it is evaluated."""
    from lmjax.train.schedules import decay_start

    points = tuple(config.optim.wsd_decay_points or ())
    if not points:
        return
    key = f"config.optim.wsd_decay_points={points}"
    if config.optim.schedule != "wsd":
        raise ValueError(f"{key} needs config.optim.schedule='wsd' (it is {config.optim.schedule!r}): "
                         "only a warmup-stable-decay run can be decayed early")
    if config.eval.steps == 0:
        raise ValueError(f"{key} needs a validation set to evaluate each point: config.eval.steps is 0")
    total, warmup = int(config.train.steps), int(config.optim.warmup_steps)
    for point in points:
        if isinstance(point, bool) or not float(point).is_integer():
            raise ValueError(f"{key}: {point!r} is not a whole number of steps")
        point = int(point)
        if point >= total:
            raise ValueError(f"{key}: {point} must be < config.train.steps={total} (the final budget is the run itself)")
        start = decay_start(config.optim, point)
        if start == point or start < warmup:
            raise ValueError(
                f"{key}: {point} is too small: its decay (config.optim.decay_fraction={config.optim.decay_fraction}"
                f" of {point} steps) would start at step {start}, but it needs >= 1 decay step starting at or "
                f"after config.optim.warmup_steps={warmup}"
            )


def fill_vocab_size(config: config_dict.ConfigDict, tokenizer_vocab_size: int) -> None:
    """model.vocab_size defaults to the tokenizer's; a smaller explicit value would drop token ids."""
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer_vocab_size
    elif config.model.vocab_size < tokenizer_vocab_size:
        raise ValueError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab_size} ids (data.tokenizer={config.data.tokenizer!r}); leave it unset "
            f"to use the tokenizer's size or set it >= {tokenizer_vocab_size}"
        )


def to_json(config: config_dict.ConfigDict) -> dict:
    """The config as plain JSON (stored with each checkpoint and in summary.json)."""
    return json.loads(config.to_json_best_effort())
