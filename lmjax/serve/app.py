"""The HTTP side: a Starlette application speaking the OpenAI completions and chat API over an Engine.

Every request is checked before it reaches the engine (protocol.py): a bad one gets a 4xx JSON
error and nothing else happens. A full queue is 429 with Retry-After. A client that disconnects
(streaming or not) cancels its requests, which frees their slots at the next decode step. On
shutdown (SIGTERM to uvicorn) the server stops accepting connections, lets the requests in flight
finish, then stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jax
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmjax.data import Tokenizer
from lmjax.infer.sampling import prompt_ids
from lmjax.serve import engine as engine_lib
from lmjax.serve import protocol, text
from lmjax.serve.metrics import Metrics

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 1


class Choice:
    """One generated sequence as the client sees it: text so far, token scores, how it ended."""

    def __init__(self, index: int, request: engine_lib.Request, tokenizer: Tokenizer, stop: list[str],
                 prompt_text: str, hidden_start: bool):
        self.index, self.request = index, request
        self.stream = text.TextStream(tokenizer, stop)
        self.prompt_text, self.hidden_start = prompt_text, hidden_start
        self.tokens: list[engine_lib.Token] = []
        self.prompt_tokens: list[engine_lib.Token] = []
        self.finish: str | None = None
        self.error: str | None = None

    def take(self, update: engine_lib.Update) -> tuple[str, list[engine_lib.Token]]:
        """Apply an engine update; returns (new final text, its new tokens)."""
        if self.finish is not None:
            return "", []
        if update.prompt is not None:
            self.prompt_tokens = list(update.prompt[1:] if self.hidden_start else update.prompt)
        self.tokens.extend(update.tokens)
        new_text = self.stream.add([t.id for t in update.tokens])
        if self.stream.stopped:
            self.finish = "stop"
            self.request.cancel()
        elif update.finish is not None:
            new_text += self.stream.finish()
            self.finish, self.error = update.finish, update.error
        return new_text, list(update.tokens)


class Mailbox:
    """Updates from the engine thread to the event loop, delivered in batches: a decode step's tokens
    for every request wake the loop once, not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Called on the engine thread; the first item of a batch schedules its delivery."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class Server:
    """The routes, bound to one engine and tokenizer."""

    def __init__(self, engine: engine_lib.Engine, tokenizer: Tokenizer, model_name: str, metrics: Metrics):
        self.engine, self.tokenizer, self.model_name, self.metrics = engine, tokenizer, model_name, metrics
        self.created = int(time.time())
        self.shutting_down = False
        self._mailbox: Mailbox | None = None

    def mailbox(self) -> Mailbox:
        """The running event loop's mailbox (one per loop: tests run the app on more than one)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    # --- plumbing --------------------------------------------------------------------------------

    def route(self, path: str, handler, methods: list[str]) -> Route:
        """`handler` with BadRequest turned into its JSON error, anything else into a 500, all counted."""
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except protocol.BadRequest as e:
                headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
                response = JSONResponse(e.body(), status_code=e.status, headers=headers)
            except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server stays up
                body = {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                  "param": None, "code": None}}
                response = JSONResponse(body, status_code=500)
            self.metrics.response(path, response.status_code)
            return response

        return Route(path, endpoint, methods=methods)

    async def body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise protocol.BadRequest(f"the request body is not valid JSON: {e}") from None

    def encode(self, prompt: str | list[int], name: str) -> tuple[list[int], str, bool]:
        """(ids fed to the model, the prompt's text, whether ids[0] is a start token the client did not send)."""
        if isinstance(prompt, str):
            try:
                ids = prompt_ids(self.tokenizer, prompt)
            except ValueError as e:  # e.g. a character outside a char tokenizer's vocabulary
                raise protocol.BadRequest(f"'{name}' cannot be tokenized: {e}", name) from None
            return ids, prompt, len(ids) > len(self.tokenizer.encode(prompt))
        ids = protocol.token_ids(name, prompt, self.engine.cfg.vocab_size)
        return ids, self.tokenizer.decode(ids), False

    def check_length(self, ids: list[int], max_tokens: int, name: str) -> None:
        context = self.engine.context
        if len(ids) + max_tokens > context:
            raise protocol.BadRequest(
                f"'{name}' has {len(ids)} tokens and max_tokens is {max_tokens}: together {len(ids) + max_tokens}, "
                f"more than the model's context of {context} tokens (config.model.max_len={context})",
                "max_tokens", code="context_length_exceeded")

    def start(self, sampling: protocol.Sampling, encoded: list[tuple[list[int], str, bool]],
              score_prompt: bool) -> tuple[list[Choice], asyncio.Queue]:
        """Submit n requests per prompt; (the choices, the queue their updates arrive on)."""
        updates, mailbox = asyncio.Queue(), self.mailbox()
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        choices = []
        for p, (ids, prompt_text, hidden_start) in enumerate(encoded):
            for j in range(sampling.n):
                index = p * sampling.n + j

                def emit(update, index=index):
                    mailbox.post(updates, (index, update))

                request = engine_lib.Request(
                    prompt=ids, max_tokens=sampling.max_tokens, emit=emit, temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, choice=j, score_prompt=score_prompt,
                    ignore_eos=sampling.ignore_eos,
                )
                choices.append(Choice(index, request, self.tokenizer, sampling.stop, prompt_text, hidden_start))
        if self.shutting_down:
            raise protocol.BadRequest("the server is shutting down", status=503)
        if len(choices) > self.engine.max_queue:
            raise protocol.BadRequest(f"{len(choices)} sequences (prompts x n) are more than the server's queue "
                                      f"holds ({self.engine.max_queue})", "n")
        try:
            self.engine.submit([c.request for c in choices])
        except engine_lib.QueueFull as e:
            raise protocol.BadRequest(f"the server is busy: {e}; retry later", status=429,
                                      code="rate_limit_exceeded") from None
        return choices, updates

    async def updates(self, request: Request, choices: list[Choice], queue: asyncio.Queue,
                      poll_disconnect: bool) -> AsyncIterator[tuple[Choice, str, list]]:
        """(choice, new text, new tokens) until every choice has finished; cancels them all on exit
        (a disconnect, a server-side cancellation, or the normal end, where it changes nothing).

        Updates that are already waiting come out together, one item per choice: a client that falls
        behind the engine then gets several tokens per event instead of falling further behind."""
        try:
            while any(c.finish is None for c in choices):
                if not poll_disconnect:  # a streaming response notices the disconnect itself
                    first = await queue.get()
                else:
                    try:
                        first = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                merged: dict[int, tuple[str, list]] = {}
                for index, update in [first, *(queue.get_nowait() for _ in range(queue.qsize()))]:
                    new_text, tokens = choices[index].take(update)
                    text_so_far, tokens_so_far = merged.get(index, ("", []))
                    merged[index] = (text_so_far + new_text, tokens_so_far + tokens)
                for index, (new_text, tokens) in merged.items():
                    yield choices[index], new_text, tokens
        finally:
            for c in choices:
                c.request.cancel()

    def usage(self, choices: list[Choice], encoded: list) -> dict:
        prompt_tokens = sum(len(ids) for ids, _, _ in encoded)
        completion_tokens = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def piece(self, token_id: int, as_id: bool = False) -> str:
        return f"token_id:{token_id}" if as_id else self.tokenizer.decode([token_id])

    def completion_logprobs(self, tokens: list[engine_lib.Token], top: int, offset: int, as_ids: bool) -> dict:
        """The completions API's log-probs: tokens, their log-probs, the likeliest alternatives, offsets."""
        pieces = [self.piece(t.id, as_ids) for t in tokens]
        offsets = []
        for piece in pieces:
            offsets.append(offset)
            offset += len(piece)
        return {
            "tokens": pieces,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {self.piece(i, as_ids): lp for i, lp in t.top[:top]}
                             for t in tokens],
            "text_offset": offsets,
        }

    def chat_logprobs(self, tokens: list[engine_lib.Token], top: int, as_ids: bool) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            piece = self.piece(token_id, as_ids)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top[:top]]}
                            for t in tokens]}

    def error_of(self, choices: list[Choice]) -> str | None:
        return next((c.error or "generation failed" for c in choices if c.finish == "error"), None)

    # --- endpoints -------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        params = protocol.parse_completion(await self.body(request))
        s = params.sampling
        encoded = [self.encode(p, "prompt") for p in params.prompts]
        for ids, _, _ in encoded:
            self.check_length(ids, s.max_tokens, "prompt")
        choices, queue = self.start(s, encoded, score_prompt=params.echo and s.logprobs is not None)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def prompt_part(c: Choice) -> tuple[str, list]:
            return (c.prompt_text, c.prompt_tokens) if params.echo else ("", [])

        if s.stream:
            async def events() -> AsyncIterator[str]:
                echoed = set()
                async for c, new_text, tokens in self.updates(request, choices, queue, poll_disconnect=False):
                    if params.echo and c.index not in echoed and (c.prompt_tokens or s.logprobs is None):
                        echoed.add(c.index)
                        new_text, tokens = c.prompt_text + new_text, c.prompt_tokens + tokens
                    if c.finish == "error":
                        yield sse({"error": {"message": c.error, "type": "server_error"}})
                        continue
                    if not new_text and c.finish is None and s.logprobs is None:
                        continue
                    logprobs = None
                    if s.logprobs is not None:
                        offset = len(c.stream.text) - len(new_text)
                        logprobs = self.completion_logprobs(tokens, s.logprobs, offset, s.tokens_as_ids)
                    yield sse({**meta, "choices": [{"index": c.index, "text": new_text, "logprobs": logprobs,
                                                    "finish_reason": c.finish}]})
                if s.include_usage:
                    yield sse({**meta, "choices": [], "usage": self.usage(choices, encoded)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async for _ in self.updates(request, choices, queue, poll_disconnect=True):
            pass
        if any(c.finish is None for c in choices):  # the client went away
            return Response(status_code=499)
        error = self.error_of(choices)
        if error:
            raise RuntimeError(error)
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            echo_text, echo_tokens = prompt_part(c)
            logprobs = None
            if s.logprobs is not None:
                logprobs = self.completion_logprobs(echo_tokens + c.tokens, s.logprobs, 0, s.tokens_as_ids)
            out.append({"index": c.index, "text": echo_text + c.stream.text, "logprobs": logprobs,
                        "finish_reason": c.finish})
        return JSONResponse({**meta, "choices": out, "usage": self.usage(choices, encoded)})

    async def chat(self, request: Request) -> Response:
        params = protocol.parse_chat(await self.body(request))
        s = params.sampling
        encoded = [self.encode(text.chat_prompt(params.messages), "messages")]
        if s.max_tokens is None:
            s.max_tokens = max(self.engine.context - len(encoded[0][0]), 0)
        self.check_length(encoded[0][0], s.max_tokens, "messages")
        s.stop = list(s.stop) + [stop for stop in text.CHAT_STOP if stop not in s.stop]
        choices, queue = self.start(s, encoded, score_prompt=False)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

        if s.stream:
            async def events() -> AsyncIterator[str]:
                chunk = {**meta, "object": "chat.completion.chunk"}
                for c in choices:
                    yield sse({**chunk, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                started = set()
                async for c, new_text, tokens in self.updates(request, choices, queue, poll_disconnect=False):
                    if c.finish == "error":
                        yield sse({"error": {"message": c.error, "type": "server_error"}})
                        continue
                    if c.index not in started:  # the template ends with "Assistant:"; drop the reply's leading space
                        new_text = new_text.lstrip(" ")
                        if new_text:
                            started.add(c.index)
                    if not new_text and c.finish is None:
                        continue
                    logprobs = None if s.logprobs is None else self.chat_logprobs(tokens, s.logprobs, s.tokens_as_ids)
                    delta = {"content": new_text} if new_text else {}
                    yield sse({**chunk, "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs,
                                                     "finish_reason": c.finish}]})
                if s.include_usage:
                    yield sse({**chunk, "choices": [], "usage": self.usage(choices, encoded)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async for _ in self.updates(request, choices, queue, poll_disconnect=True):
            pass
        if any(c.finish is None for c in choices):
            return Response(status_code=499)
        error = self.error_of(choices)
        if error:
            raise RuntimeError(error)
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.stream.text.lstrip(" ")},
                "logprobs": None if s.logprobs is None else self.chat_logprobs(c.tokens, s.logprobs, s.tokens_as_ids),
                "finish_reason": c.finish} for c in sorted(choices, key=lambda c: c.index)]
        return JSONResponse({**meta, "object": "chat.completion", "choices": out,
                             "usage": self.usage(choices, encoded)})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmjax",
            "max_model_len": self.engine.context}]})

    async def tokenize(self, request: Request) -> Response:
        prompt, add_special = protocol.parse_tokenize(await self.body(request))
        ids = self.encode(prompt, "prompt")[0] if add_special else self.encode_plain(prompt)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.context})

    def encode_plain(self, prompt: str) -> list[int]:
        try:
            return self.tokenizer.encode(prompt)
        except ValueError as e:
            raise protocol.BadRequest(f"'prompt' cannot be tokenized: {e}", "prompt") from None

    async def detokenize(self, request: Request) -> Response:
        ids = protocol.parse_detokenize(await self.body(request), self.engine.cfg.vocab_size)
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    async def tokenizer_info(self, request: Request) -> Response:
        """What evaluation clients (lm-evaluation-harness's remote tokenizer) read before they call
        /tokenize: no special token here has a text that encodes to it, so they are null."""
        return JSONResponse({"eos_token": None, "bos_token": None, "pad_token": None,
                             "model_max_length": self.engine.context, "chat_template": None})

    async def health(self, request: Request) -> Response:
        if self.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "active_slots": self.engine.active_slots(),
                             "queue_length": self.engine.queue_length()})

    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _http_error(request: Request, exc: HTTPException) -> Response:
    body = {"error": {"message": f"{exc.detail}: {request.method} {request.url.path}", "type": "invalid_request_error",
                      "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_app(engine: engine_lib.Engine, tokenizer: Tokenizer, model_name: str, *,
               warm_every_bucket: bool = True) -> Starlette:
    """The application; starting it starts (and warms up) the engine, shutting it down drains and stops it."""
    if engine.metrics is None:
        engine.metrics = Metrics(engine.max_slots)
    server = Server(engine, tokenizer, model_name, engine.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if not engine.running:
            engine.start()
            await asyncio.to_thread(engine.warm_up, warm_every_bucket)
        yield
        server.shutting_down = True  # uvicorn has stopped accepting and waited for the open requests
        await asyncio.to_thread(engine.stop, True)

    routes = [
        server.route("/v1/completions", server.completions, ["POST"]),
        server.route("/v1/chat/completions", server.chat, ["POST"]),
        server.route("/v1/models", server.models, ["GET"]),
        server.route("/tokenize", server.tokenize, ["POST"]),
        server.route("/detokenize", server.detokenize, ["POST"]),
        server.route("/tokenizer_info", server.tokenizer_info, ["GET"]),
        server.route("/health", server.health, ["GET"]),
        server.route("/metrics", server.prometheus, ["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app


def app_from_workdir(workdir: str, *, max_slots: int, max_queue: int, model_name: str | None = None,
                     warm_every_bucket: bool = True, quantize: str = "none") -> Starlette:
    """The application for the newest checkpoint of a run directory (its stored config, its tokenizer),
    on one device whatever mesh it was trained on; `quantize` int8/int4 serves weight-quantized params
    (made once and kept beside the checkpoints, as `--mode=generate --quantize` keeps them)."""
    from lmjax.infer import quantization
    from lmjax.model import quantization as quant_lib
    from lmjax.train import workdir as workdir_lib

    quant_lib.check_mode(quantize)

    config = workdir_lib.saved_config(workdir)
    config.mesh.update(data=-1, fsdp=1, tensor=1, num_slices=1)  # the restore reshards onto it
    setup = workdir_lib.Setup(config, workdir)
    restored = setup.restore(read_only=True)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}")
    params, model_cfg = restored.state.params, setup.config.model
    if quantize != "none":
        params = quantization.load_or_quantize(setup, restored.step, params, quantize)
        model_cfg = quant_lib.with_quantization(model_cfg, quantize)
    params = jax.device_put(params, jax.devices()[0])
    tokenizer = setup.tokenizer
    engine = engine_lib.Engine(model_cfg, params, max_slots=max_slots, max_queue=max_queue,
                               eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None, metrics=Metrics(max_slots))
    name = model_name or os.path.basename(os.path.normpath(workdir))
    return create_app(engine, tokenizer, name, warm_every_bucket=warm_every_bucket)
