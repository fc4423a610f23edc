"""Decoding with early exits: a token leaves the model at the first exit confident enough.

At each exit (lmjax.model.early_exit) a row whose top probability exceeds `threshold` takes its
token from that exit, and its hidden state is frozen: every later layer receives that state as its
input. So the KV entries of the layers it skipped are those layers' key/value projections of the
exit's hidden state (CALM's state propagation, Schuster et al. 2022), and later tokens attend over
a complete cache. They are computed at once rather than lazily, because they cost only the k/v
projections: when every row of the batch has exited, the remaining blocks run inside a `lax.cond`
branch whose attention output and MLP are unused, which XLA removes, leaving the k/v writes.
When some rows are still running, the blocks run for all and exited rows keep their frozen state,
so a row's tokens do not depend on the batch around it; the saving then needs the whole batch to
exit (batch 1 decoding, or a confident batch).

The prompt runs through every layer (its cache is exact); the exit rule picks the first new token
from the prompt's last position. Threshold >= 1 never exits (the full model's tokens); threshold 0
always leaves at the first exit (the tokens of the model cut after that layer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict, config_dict

from lmjax.infer import sampling
from lmjax.model import decoding
from lmjax.model import positions as pos_lib
from lmjax.model import early_exit as early_exit_lib
from lmjax.model.early_exit import check_exits, head_logits
from lmjax.model.transformer import Block, attention_context
from lmjax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class ExitStats:
    """Where the generated tokens left the model."""

    num_layers: int
    layers_used: np.ndarray  # [B, T]: blocks each token ran through before its token was chosen

    @property
    def mean_layers(self) -> float:
        return float(self.layers_used.mean())

    @property
    def exit_rate(self) -> float:
        """The share of tokens chosen before the last layer."""
        return float((self.layers_used < self.num_layers).mean())


def _embed(cfg: Any, params: Any, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
    """The Transformer's input embedding (token plus learned or sinusoidal position; dropout off)."""
    x_BxLxD = jnp.take(params["embedding"], tokens_BxL, axis=0).astype(jnp.dtype(cfg.dtype))
    if cfg.position == "learned":
        x_BxLxD += jnp.take(params["pos_embedding"], positions_BxL, axis=0).astype(x_BxLxD.dtype)
    elif cfg.position == "sinusoidal":
        x_BxLxD += pos_lib.sinusoidal(positions_BxL, cfg.embed_dim).astype(x_BxLxD.dtype)
    return x_BxLxD


def _forward(cfg, params, cache, tokens_BxL, positions_BxL, segment_ids_BxL, exits, threshold):
    """One prefill or decode call through the layers with exits at the last position.

    Returns (float32 logits [B, V] of the exit each row took, layers used [B], cache)."""
    B, L = tokens_BxL.shape
    decode = L == 1  # a prompt runs all layers for all rows; a new token may leave early
    x_BxLxD = _embed(cfg, params, tokens_BxL, positions_BxL)
    ctx, header = attention_context(positions_BxL, segment_ids_BxL, cache)
    block = Block(cfg)
    exited_B = jnp.zeros((B,), bool)
    layers_B = jnp.full((B,), cfg.num_layers, jnp.int32)
    chosen_BxV = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    layer_caches = []
    for i in range(cfg.num_layers):
        variables, layer_cache = {"params": params[f"block_{i}"]}, cache["layers"][i]

        def run(x, layer_cache, variables=variables):
            return block.apply(variables, x, ctx, layer_cache)

        if decode and i >= exits[0]:
            # Every row has left: only the k/v writes of this layer's output are live.
            x_new, layer_cache = jax.lax.cond(jnp.all(exited_B), lambda x, c: (x, run(x, c)[1]), run,
                                              x_BxLxD, layer_cache)
            x_BxLxD = jnp.where(exited_B[:, None, None], x_BxLxD, x_new)
        else:
            x_BxLxD, layer_cache = run(x_BxLxD, layer_cache)
        layer_caches.append(layer_cache)
        if i + 1 in exits:
            logits_BxV = head_logits(cfg, params, x_BxLxD[:, -1:])[:, 0]
            confident_B = jnp.max(jax.nn.softmax(logits_BxV, axis=-1), axis=-1) > threshold
            leaves_B = confident_B & ~exited_B
            chosen_BxV = jnp.where(leaves_B[:, None], logits_BxV, chosen_BxV)
            layers_B = jnp.where(leaves_B, i + 1, layers_B)
            exited_B = exited_B | leaves_B
    final_BxV = head_logits(cfg, params, x_BxLxD[:, -1:])[:, 0]
    chosen_BxV = jnp.where(exited_B[:, None], chosen_BxV, final_BxV)
    return chosen_BxV, layers_B, {**header, "layers": tuple(layer_caches)}


@functools.partial(jax.jit, static_argnames=("cfg", "exits", "max_new_tokens", "top_k", "top_p", "greedy"))
def _generate(cfg, params, tokens_BxP, positions_BxP, segment_ids_BxP, rng, temperature, threshold,
              *, exits, max_new_tokens, top_k, top_p, greedy):
    B, P = tokens_BxP.shape
    cache = decoding.init_cache(cfg, B, P + max_new_tokens)
    logits_BxV, layers_B, cache = _forward(cfg, params, cache, tokens_BxP, positions_BxP, segment_ids_BxP,
                                           exits, threshold)
    rngs = jax.random.split(rng, max_new_tokens)
    first_B = decoding.sample(logits_BxV, rngs[0], temperature, top_k, top_p, greedy)

    def step(carry, rng_t):
        cache, token_B, position_B = carry
        logits_BxV, layers_B, cache = _forward(cfg, params, cache, token_B[:, None], position_B[:, None], None,
                                               exits, threshold)
        next_B = decoding.sample(logits_BxV, rng_t, temperature, top_k, top_p, greedy)
        return (cache, next_B, position_B + 1), (next_B, layers_B)

    carry = (cache, first_B, positions_BxP[:, -1] + 1)
    _, (rest_TxB, layers_TxB) = jax.lax.scan(step, carry, rngs[1:])
    tokens_BxT = jnp.concatenate([first_B[:, None], rest_TxB.T], axis=1)
    return tokens_BxT, jnp.concatenate([layers_B[:, None], layers_TxB.T], axis=1)


def generate(cfg, params, prompts: list[list[int]], max_new_tokens: int, exits: Sequence[int], threshold: float,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
             eos_id: int | None = None, min_prompt_len: int = 0) -> tuple[list[list[int]], ExitStats]:
    """`decoding.generate` with early exits after `exits` layers at confidence `threshold`:
    (new tokens of each prompt, where they exited). Quantized or scanned params are refused."""
    exits = check_exits(cfg, exits)
    if not exits:
        raise ValueError("early-exit decoding needs at least one exit layer (config.train.early_exit_layers)")
    if cfg.get("quantize", "none") != "none":
        raise ValueError("early-exit decoding runs float weights: drop --quantize")
    decoding.check_prompts(cfg, prompts, max_new_tokens)
    tokens, positions, segment_ids = decoding.left_pad(prompts, min_prompt_len)
    greedy = temperature == 0
    tokens_BxT, layers_BxT = _generate(
        FrozenConfigDict(cfg), nn.unbox(params), jnp.asarray(tokens), jnp.asarray(positions),
        jnp.asarray(segment_ids), jax.random.key(0) if rng is None else rng,
        jnp.float32(1.0 if greedy else temperature), jnp.float32(threshold),
        exits=exits, max_new_tokens=max_new_tokens, top_k=top_k, top_p=float(top_p), greedy=greedy,
    )
    return decoding.cut_at_eos(tokens_BxT, eos_id), ExitStats(int(cfg.num_layers), np.asarray(layers_BxT))


def generate_text(config: config_dict.ConfigDict, workdir: str, prompts: Sequence[str], max_new_tokens: int,
                  threshold: float, exits: Sequence[int] | None = None, seed: int = 0, **sampling_args: Any
                  ) -> tuple[list[str], ExitStats]:
    """The `--mode=generate --exit_threshold=X` job: continuations from the newest checkpoint, leaving at
    `exits` (default: the run's `train.early_exit_layers`)."""
    workdir_lib.require_checkpoint(workdir)
    setup = workdir_lib.Setup(config, workdir)
    params = setup.restore(read_only=True).state.params
    tokenizer = setup.tokenizer
    exits = setup.config.train.early_exit_layers if exits is None else exits
    new, stats = generate(setup.config.model, params, [sampling.prompt_ids(tokenizer, p) for p in prompts],
                          max_new_tokens, exits, threshold, rng=jax.random.key(seed),
                          eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None, **sampling_args)
    return [tokenizer.decode(tokens) for tokens in new], stats


def evaluate_exits(setup: workdir_lib.Setup, params: Any, exits: Sequence[int], thresholds: Sequence[float]
                   ) -> dict:
    """On the run's validation sample, teacher-forced: each exit's loss (key "exit_loss": {layers: nats}),
    and for each threshold the loss and mean layers of the exit rule (key "threshold": {t: (nats, layers)}).

    The rule picks, per position, the first exit whose top probability exceeds t; here every position's
    context is the full model's, where decoding gives skipped layers the exit state's keys/values."""
    from lmjax.train import validation  # validation imports the train step

    cfg, exits = setup.config.model, check_exits(setup.config.model, exits)
    model = setup.model

    @jax.jit
    def sums(params, batch):
        logits = early_exit_lib.exit_logits(model, params, batch["inputs"], exits)
        weights_BxL = batch["weights"].astype(jnp.float32)
        nll, confident = {}, {}
        for layers, logits_BxLxV in logits.items():
            log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
            nll[layers] = -jnp.take_along_axis(log_p_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
            confident[layers] = jnp.exp(jnp.max(log_p_BxLxV, axis=-1))
        out = {f"exit{l}": jnp.sum(nll[l] * weights_BxL) for l in nll}
        for i, t in enumerate(thresholds):
            chosen_BxL = nll[int(cfg.num_layers)]
            used_BxL = jnp.full_like(chosen_BxL, cfg.num_layers)
            for layers in reversed(exits):  # the shallowest confident exit wins
                leave_BxL = confident[layers] > t
                chosen_BxL = jnp.where(leave_BxL, nll[layers], chosen_BxL)
                used_BxL = jnp.where(leave_BxL, layers, used_BxL)
            out[f"rule{i}"] = jnp.sum(chosen_BxL * weights_BxL)
            out[f"layers{i}"] = jnp.sum(used_BxL * weights_BxL)
        out["weight"] = jnp.sum(weights_BxL)
        return out

    totals: dict[str, float] = {}
    for batch in validation.ValidationSet(setup.config, setup.tokenizer):
        for key, value in sums(params, {k: jnp.asarray(v) for k, v in batch.items()}).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    weight = totals["weight"]
    return {
        "exit_loss": {l: totals[f"exit{l}"] / weight for l in (*exits, int(cfg.num_layers))},
        "threshold": {t: (totals[f"rule{i}"] / weight, totals[f"layers{i}"] / weight)
                      for i, t in enumerate(thresholds)},
    }
