"""The one place every config key is declared, with its default and its meaning.

Preset files in `configs/` start from `default_config()` and change only what differs, so a key
exists (and can be overridden with `--config.section.key=value`) in every preset.
"""

from ml_collections import config_dict

placeholder = config_dict.placeholder

# Logical axis name -> mesh axes. Parameters and activations name their axes logically; this
# table alone decides data parallelism, FSDP (ZeRO-3) and Megatron tensor parallelism.
DEFAULT_RULES = (
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

    d = c.data = config_dict.ConfigDict()
    d.source = "pystdlib"  # pystdlib | text:<glob> | tfds:<name>[/<config>] | prepared:<dir> (lmjax.data.prepare output)
    d.text_key = "text"  # field holding the text in .jsonl and tfds examples
    d.train_split = "train"  # split names (tfds: any split spec such as train[:90%])
    d.val_split = "validation"
    d.val_fraction = 0.05  # pystdlib/text: share of documents (or of a single file's tail) held out
    d.doc_split = "file"  # text: sources: file (one document per file) | blank_line (per paragraph block)
    d.text_split = "hash"  # text: split: hash (of each document's path#index) | tail (last val_fraction of the text, nanoGPT-style)
    d.tfds_data_dir = placeholder(str)  # tfds data_dir (a gs:// bucket on TPU VMs); None: tfds default
    d.tokenizer = "sentencepiece"  # sentencepiece | byte | char
    d.tokenizer_path = placeholder(str)  # an existing SentencePiece .model to load instead of training
    d.vocab_size = 4096  # SentencePiece vocabulary size to train
    d.spm_model_type = "bpe"  # bpe | unigram
    d.character_coverage = 0.9995  # SentencePiece character coverage
    d.byte_fallback = True  # unknown characters become bytes, so any text round-trips
    d.tokenizer_max_sentences = 200_000  # cap on lines read to train the tokenizer
    d.cache_dir = placeholder(str)  # tokenizer/token caches; None: ~/.cache/lmjax
    d.max_documents = placeholder(int)  # use only the first N documents of each split; None: all
    d.tfds_download = True  # tfds: download and prepare the dataset if data_dir lacks it
    d.seq_len = 128  # tokens per training row
    d.packing = "concat"  # concat (EOS-joined stream) | segments (whole documents, no cross-attention)
    d.shuffle = True  # shuffle rows each epoch
    d.seed = 0  # shuffling seed
    d.grain_workers = 0  # grain worker processes (0: load in the training process)
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
    t.log_every = 10  # steps between metric lines
    t.stop_on_nan = True  # stop the run when the loss is NaN/inf

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
    o.weight_decay = 0.1  # decoupled weight decay (not on biases or norm scales)
    o.decay_embeddings = True  # apply weight decay to embedding tables too
    o.b1 = 0.9  # Adam/Lion beta1 (SGD momentum)
    o.b2 = 0.95  # Adam/Lion beta2
    o.eps = 1e-8  # Adam epsilon
    o.clip = 1.0  # global-norm gradient clipping; 0 disables

    mesh = c.mesh = config_dict.ConfigDict()
    mesh.data = -1  # data-parallel axis size; -1 takes the remaining devices
    mesh.fsdp = 1  # fully-sharded data-parallel axis size (params sharded over it)
    mesh.tensor = 1  # tensor-parallel axis size (heads, mlp, vocab split over it)
    mesh.num_slices = 1  # multislice: the data axis spans slices (DCN)
    mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes table

    ck = c.checkpoint = config_dict.ConfigDict()
    ck.every_steps = 500  # steps between checkpoints (one is always written at the end)
    ck.max_to_keep = 3  # newest checkpoints kept
    ck.async_save = True  # write checkpoints in the background

    e = c.eval = config_dict.ConfigDict()
    e.every_steps = 500  # steps between validation passes (and one at the end)
    e.steps = 10  # validation batches per pass (the same ones every time)
    e.batch_size = placeholder(int)  # None: train.batch_size
    e.num_samples = 2  # sampled continuations logged at each eval
    e.sample_tokens = 64  # tokens per logged sample
    e.sample_prompt = "def "  # prompt of the logged samples
    e.sample_temperature = 0.8  # softmax temperature of the logged samples (0: greedy)
    return c
