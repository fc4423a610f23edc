"""Continuous batching: a fixed number of slots in one preallocated KV cache, served by one thread.

Between two decode steps the engine prefills waiting requests into free slots (one request at a
time, its prompt padded to a power-of-two bucket so that few prefill programs are compiled, and a
request's numbers never depend on what else is waiting), then runs ONE jitted decode step for all
slots. Nothing waits for the device in between: a prefill writes its first token into the device
array of next input tokens, and a step's sampled tokens stay there as the next step's input. Results
reach the host one step late: the engine dispatches step t+1 (and any prefills before it), then hands
out what was dispatched earlier while that step computes, so host work overlaps the model's. A
request leaves its slot when its last token is handed out (its token budget, EOS, or its client
cancelled), and the slot takes the next waiting request at once; a request that ended at EOS had one
more token computed that nobody sees.

The cache is `lmjax.model.decoding`'s, with one write index per row: every slot holds its own
request at positions 0.. of its own, so prompts need no left padding and requests of any lengths
share the batch. The decode step attends over only the first cache slots that the longest live
request needs, rounded up to a power of two (a few compiled programs), so that a step's cost follows
the live lengths, not the context; masked slots add exact zeros, so a request's numbers do not depend
on which of these programs served it (tested). Free slots still run through the decode step (a fixed
row count) with their index held at 0; their outputs are ignored. A prefill writes only the first
slots of its row (its prompt bucket); the slots after them still hold an earlier request's keys,
which the causal mask hides until the decode steps overwrite them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from lmjax.model import decoding
from lmjax.serve import sampler

log = logging.getLogger(__name__)
MIN_BUCKET = 32  # the fewest cache slots a decode step attends over
MIN_PROMPT_BUCKET = 8  # the shortest padded prompt: most chat and completion prompts are short


class QueueFull(RuntimeError):
    """The bounded queue of waiting requests cannot take these."""


@dataclasses.dataclass(frozen=True)
class Token:
    """A token the model produced (or scored): its id, its log-prob, its likeliest alternatives."""

    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Update:
    """What the engine reports for a request: prompt scores (once), new tokens, the end."""

    tokens: tuple[Token, ...] = ()
    prompt: tuple[Token, ...] | None = None  # the prompt's tokens scored, when asked for
    finish: str | None = None  # "length" (max_tokens), "stop" (EOS), "error"
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate. `emit` is called on the engine thread and must not block."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Update], None]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    choice: int = 0  # which of a request's `n` choices: its own random stream
    score_prompt: bool = False
    ignore_eos: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    generated: int = 0  # tokens handed to `emit`
    dispatched: int = 0  # tokens asked of the model: `generated`, plus one while a step is in flight

    def cancel(self) -> None:
        """Stop generating (a client went away, or a stop string was found): the slot is freed."""
        self.cancelled.set()


def bucket(length: int, limit: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= `length` (at least `minimum`), at most `limit`."""
    return min(limit, max(minimum, 1 << (length - 1).bit_length()))


def prompt_bucket(length: int, limit: int) -> int:
    """The padded length of a prompt of `length` tokens."""
    return bucket(length, limit, MIN_PROMPT_BUCKET)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill_into(cfg, params, cache, next_tokens_B, slot, tokens_1xP, length, settings):
    """Prefill one prompt into its own row, write the row into the first P slots of `cache` at `slot`
    (the other rows are untouched; the row's later slots are stale, and never attended before the
    decode steps overwrite them) and its first new token into `next_tokens_B`. Returns (cache,
    next_tokens, the first new token, the prompt's own token scores): the scores are computed always,
    so that one program serves scoring and generation."""
    P = tokens_1xP.shape[1]
    row = decoding.init_cache(cfg, 1, P, per_row_index=True)
    logits_1xPxV, row = decoding.prefill(cfg, params, row, tokens_1xP)
    row = {**row, "index": jnp.reshape(length, (1,))}

    def put(big, small, batch_axis=0):
        starts = [0] * big.ndim
        starts[batch_axis] = slot
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), starts)

    header = {key: put(cache[key], row[key]) for key in ("index", "positions", "segment_ids")}
    layer_batch_axis = 1 if cfg.scan_layers else 0
    layers = jax.tree.map(functools.partial(put, batch_axis=layer_batch_axis), cache["layers"], row["layers"])

    logprobs_PxV = jax.nn.log_softmax(logits_1xPxV[0], axis=-1)
    prompt = {
        "logprob": jnp.take_along_axis(logprobs_PxV[:-1], tokens_1xP[0, 1:, None], axis=-1)[:, 0],
        **dict(zip(("top_logprobs", "top_ids"), jax.lax.top_k(logprobs_PxV[:-1], sampler.TOP_LOGPROBS))),
    }
    last_1xV = jax.lax.dynamic_slice_in_dim(logits_1xPxV[0], length - 1, 1)
    keys_1 = sampler.row_keys(settings["seed"], settings["choice"], jnp.zeros((1,), jnp.int32))
    first = sampler.sample_rows(last_1xV, settings["temperature"], settings["top_k"], settings["top_p"], keys_1)
    next_tokens_B = jax.lax.dynamic_update_slice(next_tokens_B, first["token"], [slot])
    return {**header, "layers": layers}, next_tokens_B, first, prompt


def key_bucket(needed: int, limit: int) -> int:
    """How many cache slots a decode step attends over: the next power of two >= `needed` (at least
    MIN_BUCKET), at most `limit`; a step then costs what the longest live request needs."""
    return bucket(needed, limit)


def key_buckets(limit: int) -> list[int]:
    """Every key length `key_bucket` can return for a cache of `limit` slots, smallest first."""
    sizes = [key_bucket(1, limit)]
    while sizes[-1] < limit:
        sizes.append(key_bucket(sizes[-1] + 1, limit))
    return sizes


@functools.partial(jax.jit, static_argnames=("cfg", "keys"), donate_argnames=("cache",))
def decode_slots(cfg, params, cache, tokens_B, active_B, settings, steps_B, keys):
    """One new token for every slot, each with its own sampling settings and random stream.

    The step attends over the first `keys` cache slots only (every active row's index is below it):
    the model gets the positions and segment ids of that prefix (the attention then slices the keys
    and values to match) and writes the new keys/values into the full, donated cache in place.
    """
    S = cache["positions"].shape[1]
    header = ("positions", "segment_ids")
    short = {**cache, **{name: jax.lax.slice_in_dim(cache[name], 0, keys, axis=1) for name in header}}
    logits_BxV, short = decoding.decode_step(cfg, params, short, tokens_B, cache["index"])
    if keys < S:
        # Inactive rows may hold an index past the prefix; their (clamped) writes are never read.
        short = {**short, **{name: jax.lax.dynamic_update_slice_in_dim(cache[name], short[name], 0, axis=1)
                             for name in header}}
    cache = {**short, "index": jnp.where(active_B, short["index"], 0)}
    keys_B = sampler.row_keys(settings["seed"], settings["choice"], steps_B)
    out = sampler.sample_rows(logits_BxV, settings["temperature"], settings["top_k"], settings["top_p"], keys_B)
    return cache, out


def _settings(requests: list[Request | None]) -> dict:
    """Per-row sampling settings as arrays (free rows: greedy)."""
    rows = [r if r is not None else Request([], 0, emit=lambda u: None, temperature=0.0) for r in requests]
    return {
        "temperature": np.array([r.temperature for r in rows], np.float32),
        "top_k": np.array([r.top_k for r in rows], np.int32),
        "top_p": np.array([r.top_p for r in rows], np.float32),
        "seed": np.array([r.seed & 0xFFFFFFFF for r in rows], np.uint32),
        "choice": np.array([r.choice for r in rows], np.int32),
    }


def _tokens(out: dict, rows: list[int]) -> list[Token]:
    """Host-side Tokens from a sampler's (or prompt scorer's) output arrays (whole arrays to Python
    at once: a step hands out a token for every row)."""
    rows = list(rows)
    ids = out["token"][rows].tolist() if "token" in out else [-1] * len(rows)
    columns = (out["logprob"][rows].tolist(), out["top_ids"][rows].tolist(), out["top_logprobs"][rows].tolist())
    return [Token(id=i, logprob=lp, top=tuple(zip(top_ids, top_lps)))
            for i, lp, top_ids, top_lps in zip(ids, *columns)]


class Engine:
    """Slots, a bounded queue of waiting requests, and the thread that serves them."""

    def __init__(self, model_cfg: Any, params: Any, *, max_slots: int, max_queue: int, eos_id: int | None,
                 metrics: Any = None):
        self.cfg = FrozenConfigDict(model_cfg)
        self.params = nn.unbox(params)
        self.max_slots, self.max_queue = int(max_slots), int(max_queue)
        self.context = int(self.cfg.max_len)
        self.eos_id = eos_id
        self.metrics = metrics
        self.slots: list[Request | None] = [None] * self.max_slots
        self.next_tokens = jnp.zeros(self.max_slots, jnp.int32)  # on the device: a step's sampled tokens
        self._settings_key, self._settings_rows = None, None  # the decode step's settings, by row identity
        self._outbox: list[Callable[[], None]] = []  # results dispatched and not yet handed out, in order
        self._scoring: list[Request] = []  # prompts only scored (no slot), dispatched, not handed out
        self.cache = decoding.init_cache(self.cfg, self.max_slots, self.context, per_row_index=True)
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._drain = True
        self._thread = threading.Thread(target=self._serve, name="lmjax-engine", daemon=True)

    # --- the server's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """End the thread; with `drain`, after the waiting and running requests finish."""
        with self._wake:
            self._stopping, self._drain = True, drain
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, requests: list[Request]) -> None:
        """Queue `requests` (all or none); QueueFull when the queue would exceed `max_queue`."""
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the queue holds {self.max_queue})")
            self._pending.extend(requests)
            self._update_gauges()
            self._wake.notify()

    def queue_length(self) -> int:
        return len(self._pending)

    def active_slots(self) -> int:
        return sum(r is not None for r in self.slots)

    def warm_up(self, every_bucket: bool = True) -> None:
        """Compile the decode step and the prefill of every prompt bucket (or only the smallest) before
        clients arrive: a compile on the engine thread would stall every request in the batch."""
        # A prompt one short of a bucket is prefilled in the prompt bucket of that size, and its one
        # decode step attends over that many keys (or the fewest): each request compiles one of each.
        prompt_buckets = {prompt_bucket(n, self.context) for n in range(1, self.context + 1)}
        sizes = sorted(prompt_buckets | set(key_buckets(self.context)))
        for size in sizes if every_bucket else sizes[:1]:
            done = threading.Event()
            prompt = [0] * max(1, size - 1)
            self.submit([Request(prompt, 2, emit=lambda u, done=done: u.finish and done.set(), temperature=0.0,
                                 ignore_eos=True)])
            done.wait()

    # --- the engine thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self.active_slots() and not self._outbox:
                    self._wake.wait()
                if self._stopping and not self._drain:
                    self._fail_all("the server is shutting down")
                    return
                if self._stopping and not self._pending and not self.active_slots() and not self._outbox:
                    return
            self._free_cancelled()
            self._admit()
            if self.active_slots() or self._outbox:
                self._decode()
            self._update_gauges()

    def _free_cancelled(self) -> None:
        for slot, request in enumerate(self.slots):
            if request is not None and request.cancelled.is_set():
                self._finish(slot, None)

    def _next_waiting(self) -> Request | None:
        with self._wake:
            while self._pending:
                request = self._pending[0]
                if request.cancelled.is_set():
                    self._pending.popleft()
                    continue
                if None not in self.slots:
                    return None
                return self._pending.popleft()
        return None

    def _admit(self) -> None:
        """Prefill waiting requests into free slots until none is left."""
        while (request := self._next_waiting()) is not None:
            try:
                self._prefill(request)
            except Exception as e:  # one bad request must not stop the server
                log.exception("prefill failed")
                self._send(request, Update(finish="error", error=f"prefill failed: {type(e).__name__}: {e}"))
                self._reset()
                self._fail_all("the engine was reset after an error", pending=False)

    def _reset(self) -> None:
        """Start the batch over (the donated cache and tokens may be gone)."""
        self._outbox = []
        self.next_tokens = jnp.zeros(self.max_slots, jnp.int32)
        self.cache = decoding.init_cache(self.cfg, self.max_slots, self.context, per_row_index=True)

    def _prefill(self, request: Request) -> None:
        """Dispatch the prompt's prefill into a free slot; its first token is handed out later."""
        length = len(request.prompt)
        tokens = np.zeros((1, prompt_bucket(length, self.context)), np.int32)
        tokens[0, :length] = request.prompt
        slot = self.slots.index(None)  # a prompt only scored (max_tokens 0) leaves it free again
        self.cache, self.next_tokens, first, prompt = prefill_into(
            self.cfg, self.params, self.cache, self.next_tokens, np.int32(slot), tokens, np.int32(length),
            _settings([request]),
        )
        if self.metrics is not None:
            self.metrics.prompt_tokens(length)
        if request.max_tokens > 0:
            self.slots[slot] = request
            request.dispatched = 1
        else:
            self._scoring.append(request)
        self._outbox.append(functools.partial(self._hand_out_first, slot, request, first,
                                              prompt if request.score_prompt else None))

    def _hand_out_first(self, slot: int, request: Request, first: dict, prompt: dict | None) -> None:
        """A prefill's results: the prompt's scores when asked for, the first new token."""
        first, prompt = jax.device_get((first, prompt))
        if request.max_tokens == 0:
            self._scoring.remove(request)
        scored = None
        if prompt is not None:
            rest = _tokens(prompt, range(len(request.prompt) - 1))
            scored = (Token(request.prompt[0], None),
                      *(dataclasses.replace(t, id=request.prompt[i + 1]) for i, t in enumerate(rest)))
        if request.max_tokens == 0:
            self._send(request, Update(prompt=scored, finish="length"))
            self._observe_end(request)
        elif self.slots[slot] is request:  # not cancelled since
            self._accept(slot, request, _tokens(first, [0])[0], prompt=scored)
            if self.metrics is not None:
                self.metrics.generated_tokens(1)

    def _decode(self) -> None:
        """Dispatch one step for every slot that still needs a token, then hand out what was dispatched
        before it (prefills, the previous step) while this one computes: the next step's input tokens
        stay on the device, so the host's work (tokens to clients, finished requests) overlaps the
        model's."""
        stepping = [r if r is not None and r.dispatched < r.max_tokens else None for r in self.slots]
        earlier, self._outbox = self._outbox, []
        try:
            if any(r is not None for r in stepping):
                active = np.array([r is not None for r in stepping])
                steps = np.array([r.dispatched if r is not None else 0 for r in stepping], np.int32)
                # A request's next token goes to cache slot len(prompt) + dispatched - 1.
                needed = max(len(r.prompt) + r.dispatched for r in stepping if r is not None)
                self.cache, out = decode_slots(
                    self.cfg, self.params, self.cache, self.next_tokens, active, self._step_settings(stepping), steps,
                    keys=key_bucket(needed, self.context),
                )
                self.next_tokens = out["token"]
                for request in stepping:
                    if request is not None:
                        request.dispatched += 1
                rows = [(slot, r) for slot, r in enumerate(stepping) if r is not None]
                self._outbox.append(functools.partial(self._hand_out, out, rows))
            for hand_out in earlier:
                hand_out()
        except Exception as e:  # fail the batch, keep serving
            log.exception("decode step failed")
            self._reset()
            self._fail_all(f"decode step failed: {type(e).__name__}: {e}", pending=False)

    def _step_settings(self, stepping: list[Request | None]) -> dict:
        """The decode step's per-row sampling settings, on the device; rebuilt only when rows change."""
        key = tuple(stepping)  # Requests compare by identity
        if key != self._settings_key:
            self._settings_key, self._settings_rows = key, jax.device_put(_settings(stepping))
        return self._settings_rows

    def _hand_out(self, out: dict, rows: list[tuple[int, Request]]) -> None:
        """A finished step's tokens to the requests that still hold their slots (one that ended at the
        step before, by EOS or cancellation, got a token it never sees)."""
        out = jax.device_get(out)
        accepted = 0
        for (slot, request), token in zip(rows, _tokens(out, [slot for slot, _ in rows])):
            if self.slots[slot] is request:
                self._accept(slot, request, token)
                accepted += 1
        if self.metrics is not None:
            self.metrics.generated_tokens(accepted)

    def _accept(self, slot: int, request: Request, token: Token, prompt: tuple[Token, ...] | None = None) -> None:
        """Hand a new token to its request; free the slot if the request is done."""
        if request.generated == 0 and self.metrics is not None:
            self.metrics.first_token(time.perf_counter() - request.submitted)
        request.generated += 1
        if self.eos_id is not None and token.id == self.eos_id and not request.ignore_eos:
            self._send(request, Update(prompt=prompt, finish="stop"))
            self._finish(slot, None)
            return
        done = request.generated >= request.max_tokens
        self._send(request, Update(tokens=(token,), prompt=prompt, finish="length" if done else None))
        if done:
            self._finish(slot, None)

    def _finish(self, slot: int, update: Update | None) -> None:
        request = self.slots[slot]
        self.slots[slot] = None
        if update is not None:
            self._send(request, update)
        self._observe_end(request)

    def _send(self, request: Request, update: Update) -> None:
        """Hand `update` to the request's owner; a failing receiver cancels its request, nothing more."""
        try:
            request.emit(update)
        except Exception:  # the engine thread must survive its clients
            log.exception("a request's receiver failed; cancelling it")
            request.cancel()

    def _observe_end(self, request: Request) -> None:
        if self.metrics is not None:
            self.metrics.request_done(time.perf_counter() - request.submitted)

    def _fail_all(self, message: str, pending: bool = True) -> None:
        for slot, request in enumerate(self.slots):
            if request is not None:
                self._finish(slot, Update(finish="error", error=message))
        scoring, self._scoring = self._scoring, []
        for request in scoring:
            self._send(request, Update(finish="error", error=message))
            self._observe_end(request)
        if pending:
            while self._pending:
                self._send(self._pending.popleft(), Update(finish="error", error=message))

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(len(self._pending), self.active_slots())
