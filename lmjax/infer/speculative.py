"""Speculative decoding: a small draft model proposes `gamma` tokens, the target checks them in one pass.

Decoding is bound by reading the target's weights once per token; verifying gamma + 1 tokens in one
forward pass reads them once for several tokens. Rejection sampling (Leviathan et al. 2023, Chen et
al. 2023) keeps the output distributed exactly as the target alone samples it: the draft's token d
(drawn from q) is kept with probability min(1, p(d) / q(d)); at the first refusal the token is drawn
again from max(0, p - q), normalized; if all gamma are kept, one more comes from the target's next
distribution for free. Greedy decoding is the special case of one-hot p and q: exactly the target's
greedy tokens.

The whole loop is one jitted `lax.while_loop` over both models' KV caches (lmjax.model.decoding).
Every pass writes gamma + 1 slots of each cache; a row keeps the slots of its accepted tokens and the
cache index moves past the batch's longest accepted run, so for one row that is a plain rollback of
the index. In a batch, the slots another row rejected stay as holes in segment 0, which attention
never reads (the same mask as left padding): the cache must then hold the worst case of gamma + 1
slots per pass.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from lmjax.infer import sampling
from lmjax.model import decoding
from lmjax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
    """Counts over all rows of one `speculative_generate` call, and what they imply."""

    gamma: int
    rows: int
    new_tokens: int  # tokens returned per row (max_new_tokens)
    passes: int  # target verify passes, summed over the rows (each row's passes while it was running)
    tested: int  # draft tokens the target judged (after a refusal the rest of a proposal is not judged)
    accepted: int  # of those, kept
    emitted: int  # tokens the verify passes produced (kept drafts plus one target token per pass)

    @property
    def acceptance_rate(self) -> float:
        """alpha: the chance the target keeps a draft token (kept / judged)."""
        return self.accepted / max(self.tested, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / max(self.passes, 1)

    @property
    def expected_tokens_per_pass(self) -> float:
        """(1 - alpha^(gamma+1)) / (1 - alpha): Leviathan et al.'s expectation for i.i.d. acceptances."""
        alpha, gamma = self.acceptance_rate, self.gamma
        return gamma + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)

    @property
    def target_forwards_per_token(self) -> float:
        """Target forward passes (the prompt's prefill, then verify passes) per token returned; 1.0 without a draft."""
        return (self.rows + self.passes) / (self.rows * self.new_tokens)


def _probs(logits_NxV, temperature, top_k: int, top_p: float, greedy: bool):
    """The distribution `decoding.sample` draws from, as probabilities (one-hot when greedy)."""
    if greedy:
        return jax.nn.one_hot(jnp.argmax(logits_NxV, axis=-1), logits_NxV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(decoding.warp_logits(logits_NxV, temperature, top_k, top_p), axis=-1)


def _draw(rng, probs_BxV, greedy: bool):
    if greedy:
        return jnp.argmax(probs_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, jnp.log(probs_BxV), axis=-1).astype(jnp.int32)


def cache_length(batch_size: int, prompt_len: int, max_new_tokens: int, gamma: int) -> int:
    """Slots each cache needs: one row rolls back exactly; a batch may leave gamma + 1 slots a pass."""
    per_pass = 1 if batch_size == 1 else gamma + 1
    return prompt_len + (max_new_tokens - 1) * per_pass + (gamma if batch_size == 1 else 0)


@functools.partial(
    jax.jit, static_argnames=("target_cfg", "draft_cfg", "max_new_tokens", "gamma", "top_k", "top_p", "greedy")
)
def _speculate(
    target_cfg, draft_cfg, target_params, draft_params, tokens_BxP, positions_BxP, segment_ids_BxP, rng,
    temperature, *, max_new_tokens, gamma, top_k, top_p, greedy,
):
    """Prefill both caches, sample the first token from the target, then verify passes until every
    row has max_new_tokens. Returns (tokens [B, T], per-row counts)."""
    B, P = tokens_BxP.shape
    T, G = max_new_tokens, gamma
    S = cache_length(B, P, T, G)
    probs = functools.partial(_probs, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    # Positions past a row's last useful token only feed tokens that are thrown away: clamp them so
    # they stay inside a learned position table.
    last_position_B = positions_BxP[:, -1] + T

    target_cache = decoding.init_cache(target_cfg, B, S)
    draft_cache = decoding.init_cache(draft_cfg, B, S)
    logits_BxPxV, target_cache = decoding.prefill(
        target_cfg, target_params, target_cache, tokens_BxP, positions_BxP, segment_ids_BxP
    )
    _, draft_cache = decoding.prefill(draft_cfg, draft_params, draft_cache, tokens_BxP, positions_BxP, segment_ids_BxP)
    rng, first_rng = jax.random.split(rng)
    first_B = _draw(first_rng, probs(logits_BxPxV[:, -1]), greedy)
    zeros_B = jnp.zeros((B,), jnp.int32)
    state = {
        "target_cache": target_cache,
        "draft_cache": draft_cache,
        "last_B": first_B,  # the newest emitted token, not yet in either cache
        "position_B": positions_BxP[:, -1] + 1,
        "out_BxW": jnp.zeros((B, T + G + 1), jnp.int32).at[:, 0].set(first_B),
        "count_B": jnp.ones((B,), jnp.int32),
        "rng": rng,
        "passes_B": zeros_B, "tested_B": zeros_B, "accepted_B": zeros_B, "emitted_B": zeros_B,
    }

    def propose(draft_cache, last_B, position_B, rng):
        """gamma + 1 draft steps: gamma proposals and their q; the last step only writes d_gamma's
        keys/values, so that both caches hold the same slots whatever the target keeps."""

        def step(carry, rng_j):
            cache, token_B, pos_B = carry
            logits_BxV, cache = decoding.decode_step(
                draft_cfg, draft_params, cache, token_B, jnp.minimum(pos_B, last_position_B)
            )
            q_BxV = probs(logits_BxV)
            next_B = _draw(rng_j, q_BxV, greedy)
            return (cache, next_B, pos_B + 1), (next_B, q_BxV)

        (draft_cache, _, _), (drafts_G1xB, q_G1xBxV) = jax.lax.scan(
            step, (draft_cache, last_B, position_B), jax.random.split(rng, G + 1)
        )
        return draft_cache, drafts_G1xB[:G].T, q_G1xBxV[:G].transpose(1, 0, 2)

    def one_pass(s):
        rng, draft_rng, accept_rng, fix_rng = jax.random.split(s["rng"], 4)
        index = s["target_cache"]["index"]
        active_B = s["count_B"] < T
        draft_cache, drafts_BxG, q_BxGxV = propose(s["draft_cache"], s["last_B"], s["position_B"], draft_rng)

        verify_BxG1 = jnp.concatenate([s["last_B"][:, None], drafts_BxG], axis=1)
        verify_positions_BxG1 = jnp.minimum(s["position_B"][:, None] + jnp.arange(G + 1), last_position_B[:, None])
        logits_BxG1xV, target_cache = decoding.prefill(
            target_cfg, target_params, s["target_cache"], verify_BxG1, verify_positions_BxG1
        )
        V = logits_BxG1xV.shape[-1]
        p_BxG1xV = probs(logits_BxG1xV.reshape(B * (G + 1), V)).reshape(B, G + 1, V)

        # Keep d with probability min(1, p(d)/q(d)); n = the length of the kept run.
        p_drafted_BxG = jnp.take_along_axis(p_BxG1xV[:, :G], drafts_BxG[..., None], axis=-1)[..., 0]
        q_drafted_BxG = jnp.take_along_axis(q_BxGxV, drafts_BxG[..., None], axis=-1)[..., 0]
        kept_BxG = jax.random.uniform(accept_rng, (B, G)) * q_drafted_BxG < p_drafted_BxG
        n_B = jnp.sum(jnp.cumprod(kept_BxG.astype(jnp.int32), axis=1), axis=1)

        # The token after the kept run: from max(0, p - q) after a refusal, from p after none.
        p_n_BxV = jnp.take_along_axis(p_BxG1xV, n_B[:, None, None], axis=1)[:, 0]
        q_padded_BxG1xV = jnp.concatenate([q_BxGxV, jnp.zeros((B, 1, V), q_BxGxV.dtype)], axis=1)
        q_n_BxV = jnp.take_along_axis(q_padded_BxG1xV, n_B[:, None, None], axis=1)[:, 0]
        residual_BxV = jnp.maximum(p_n_BxV - q_n_BxV, 0.0)
        residual_BxV = jnp.where(residual_BxV.sum(-1, keepdims=True) > 0, residual_BxV, p_n_BxV)
        next_B = _draw(fix_rng, residual_BxV, greedy)

        new_BxG1 = jnp.concatenate([drafts_BxG, jnp.zeros((B, 1), jnp.int32)], axis=1)
        new_BxG1 = jnp.where(jnp.arange(G + 1) == n_B[:, None], next_B[:, None], new_BxG1)
        written_BxW = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at,)))(
            s["out_BxW"], new_BxG1, s["count_B"]
        )
        n_B = jnp.where(active_B, n_B, 0)

        # Both caches keep the slots of [last, d_1 .. d_n] and move their index past the longest run.
        keep_BxG1 = (jnp.arange(G + 1)[None, :] <= n_B[:, None]).astype(jnp.int32)
        new_index = index + jnp.max(n_B) + 1

        def roll_back(cache):
            segment_ids_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], keep_BxG1, (0, index))
            return {**cache, "index": new_index, "segment_ids": segment_ids_BxS}

        emitted_B = jnp.where(active_B, n_B + 1, 0)
        return {
            "target_cache": roll_back(target_cache),
            "draft_cache": roll_back(draft_cache),
            "last_B": jnp.where(active_B, next_B, s["last_B"]),
            "position_B": s["position_B"] + emitted_B,
            "out_BxW": jnp.where(active_B[:, None], written_BxW, s["out_BxW"]),
            "count_B": s["count_B"] + emitted_B,
            "rng": rng,
            "passes_B": s["passes_B"] + active_B,
            "tested_B": s["tested_B"] + jnp.where(active_B, jnp.minimum(n_B + 1, G), 0),
            "accepted_B": s["accepted_B"] + n_B,
            "emitted_B": s["emitted_B"] + emitted_B,
        }

    state = jax.lax.while_loop(lambda s: jnp.any(s["count_B"] < T), one_pass, state)
    counts = {k: state[f"{k}_B"] for k in ("passes", "tested", "accepted", "emitted")}
    return state["out_BxW"][:, :T], counts


def speculative_generate(
    target_cfg,
    target_params,
    draft_cfg,
    draft_params,
    prompts: list[list[int]],
    max_new_tokens: int,
    gamma: int = 4,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """`lmjax.model.generate` with a draft model: the same distribution (the same tokens when greedy,
    temperature 0), fewer target passes. Returns the new tokens of each row and the acceptance counts."""
    if gamma < 1:
        raise ValueError(f"speculative decoding: gamma={gamma} must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"speculative decoding: max_new_tokens={max_new_tokens} must be at least 1")
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"speculative decoding: the draft's config.model.vocab_size={draft_cfg.vocab_size} differs from "
            f"the target's {target_cfg.vocab_size}; both must share one tokenizer"
        )
    decoding.check_prompts(target_cfg, prompts, max_new_tokens)
    decoding.check_prompts(draft_cfg, prompts, max_new_tokens)
    tokens, positions, segment_ids = decoding.left_pad(prompts)
    greedy = temperature == 0
    out_BxT, counts = _speculate(
        FrozenConfigDict(target_cfg), FrozenConfigDict(draft_cfg), nn.unbox(target_params), nn.unbox(draft_params),
        jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids),
        jax.random.key(0) if rng is None else rng, jnp.float32(1.0 if greedy else temperature),
        max_new_tokens=max_new_tokens, gamma=gamma, top_k=top_k, top_p=float(top_p), greedy=greedy,
    )
    totals = {k: int(np.asarray(v).sum()) for k, v in counts.items()}
    stats = SpeculativeStats(gamma=gamma, rows=len(prompts), new_tokens=max_new_tokens, **totals)
    return decoding.cut_at_eos(out_BxT, eos_id), stats


def generate_text(
    config, workdir: str, draft_config, draft_workdir: str, prompts: list[str], max_new_tokens: int, *,
    gamma: int = 4, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
) -> tuple[list[str], SpeculativeStats]:
    """The `--mode=generate --draft_workdir=...` job: continuations of `prompts` from the newest
    checkpoint in `workdir`, drafted by the one in `draft_workdir` (trained with the same tokenizer)."""
    runs = []
    for run_config, run_dir in ((config, workdir), (draft_config, draft_workdir)):
        workdir_lib.require_checkpoint(run_dir)
        setup = workdir_lib.Setup(run_config, run_dir)
        runs.append((setup, setup.restore(read_only=True).state.params))
    (target, target_params), (draft, draft_params) = runs
    tokenizer = target.tokenizer
    probe = "def f(x):\n    return x"
    if draft.tokenizer.vocab_size != tokenizer.vocab_size or draft.tokenizer.encode(probe) != tokenizer.encode(probe):
        raise ValueError(f"the draft run {draft_workdir} uses another tokenizer than {workdir}: "
                         "train the draft with the target's data.tokenizer settings")
    new, stats = speculative_generate(
        target.config.model, target_params, draft.config.model, draft_params,
        [sampling.prompt_ids(tokenizer, p) for p in prompts], max_new_tokens, gamma=gamma,
        temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(seed),
        eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
    )
    return [tokenizer.decode(tokens) for tokens in new], stats
