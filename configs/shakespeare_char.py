"""nanoGPT's README CPU run of shakespeare_char, as an lmjax preset: a 4-layer, d=128 character model
trained for 2000 steps of 12 x 64 characters on the tiny Shakespeare text.

  python -m lmjax.main --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char \\
      --config.data.source=text:/path/to/input.txt

The text is char-rnn's tinyshakespeare/input.txt (1,115,394 characters):
  curl -O https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
The default `data.source` is `text:input.txt`, that file in the working directory; without it the run
stops at once with `error: data.source text file not found: 'input.txt'`. The TFDS copy
(`tfds:tiny_shakespeare`) is not the default: its builder reads the download through TensorFlow
(`tf.io.gfile`), which lmjax does not install, and it splits 90/5/5 into train/validation/test, so
its validation split is half of nanoGPT's.

What matches nanoGPT (`config/train_shakespeare_char.py` with the README's CPU flags: block_size 64,
batch_size 12, n_layer 4, n_head 4, n_embd 128, max_iters 2000, lr_decay_iters 2000, dropout 0):
the same characters as ids (sorted unique characters), the first 90% of the text for training and
the last 10% for validation, the model (no biases, tied embeddings, learned positions, LayerNorm,
exact GELU, 4x MLP, N(0, 0.02) init with 1/sqrt(2 * layers) on the output projections), AdamW
(lr 1e-3, betas 0.9/0.99, eps 1e-8, weight decay 0.1 on every 2-D parameter embeddings included,
global-norm clip 1.0), 100 warmup steps and cosine decay to 1e-4 at step 2000, float32.

What differs, by lmjax's design: the char vocabulary has one more id (EOS, 66 instead of 65: it
ends each split's token stream, so it is one training target per epoch); training rows are the text cut into
consecutive windows of 65 characters, shuffled each epoch, where nanoGPT samples random offsets;
warmup starts at lr 0 (nanoGPT's at lr / 101); the validation loss at the end is over the whole
validation split (`eval.steps=-1`, 1,743 windows of 64) where nanoGPT averages 20 random batches.
benchmarks/vs_pytorch.py trains both and evaluates both final models on the same windows.
"""

from lmjax.config import default_config


def get_config():
    c = default_config()
    c.name = "shakespeare_char"
    m = c.model
    m.num_layers = 4  # n_layer
    m.embed_dim = 128  # n_embd
    m.num_heads = 4  # n_head: head_dim 32
    m.num_kv_heads = 4  # MHA
    m.mlp = "gelu"  # nanoGPT's nn.GELU(): the exact (erf) GELU
    m.mlp_ratio = 4.0  # 4 * n_embd hidden units
    m.position = "learned"  # wpe
    m.norm = "layernorm"  # LayerNorm, eps 1e-5
    m.norm_eps = 1e-5
    m.use_bias = False  # bias=False: no biases in Linear layers or LayerNorm
    m.tie_embeddings = True  # lm_head shares wte
    m.dropout = 0.0  # the README's --dropout=0.0
    m.init_std = 0.02
    m.dtype = "float32"  # nanoGPT runs float32 on CPU
    c.data.seq_len = 64  # block_size
    m.max_len = c.data.seq_len  # the position table is block_size long
    # vocab_size stays None: filled from the char tokenizer (65 characters + EOS)

    d = c.data
    d.source = "text:input.txt"  # set it: --config.data.source=text:/path/to/input.txt
    d.doc_split = "file"  # the whole file is one document
    d.text_split = "tail"  # nanoGPT's split: the last val_fraction of the characters
    d.val_fraction = 0.1  # 90% train, 10% validation
    d.tokenizer = "char"  # sorted unique characters, as nanoGPT's prepare.py numbers them
    d.packing = "concat"  # one stream, no masks between documents

    t = c.train
    t.steps = 2000  # max_iters
    t.batch_size = 12  # 12 x 64 = 768 tokens per step
    t.log_every = 50  # steps between progress lines

    o = c.optim
    o.name = "adamw"
    o.lr = 1e-3  # learning_rate
    o.schedule = "cosine"  # decay to min_lr at lr_decay_iters = max_iters
    o.warmup_steps = 100  # warmup_iters
    o.min_lr_ratio = 0.1  # min_lr 1e-4
    o.b1 = 0.9  # beta1
    o.b2 = 0.99  # beta2: small batches
    o.eps = 1e-8  # torch.optim.AdamW's default
    o.weight_decay = 0.1  # on 2-D parameters only
    o.decay_embeddings = True  # nanoGPT decays wte and wpe too
    o.clip = 1.0  # grad_clip

    c.checkpoint.every_steps = 500  # with each evaluation
    c.checkpoint.max_to_keep = 2

    e = c.eval
    e.every_steps = 500  # four evaluations: steps 500, 1000, 1500, 2000
    e.steps = -1  # the whole validation split (111,541 tokens) each time: ~1 s on a CPU core
    e.batch_size = 64  # 28 batches per evaluation
    e.num_samples = 1
    e.sample_prompt = "ROMEO:"  # characters of the vocabulary
    e.sample_tokens = 57  # the 7-token prompt (EOS + "ROMEO:") + 57 fill the 64-position table
    return c
