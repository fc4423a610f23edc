"""`lmjax.serve`: the OpenAI-compatible server over a tiny random-init run saved as a checkpoint.

One uvicorn server on a free loopback port serves the module (one compile of each program); the
expected values come from the model itself: `--mode=generate`'s sampler, the full forward pass.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

from lmjax import config as config_lib
from lmjax.infer import quantization, sampling
from lmjax.model import Transformer, decoding
from lmjax.model import quantization as quant_lib
from lmjax.serve import app as app_lib
from lmjax.serve import engine as engine_lib
from lmjax.serve import sampler, text
from lmjax.train import checkpointing
from lmjax.train import workdir as workdir_lib

MAX_LEN = 128
MAX_SLOTS = 4
MAX_QUEUE = 6


def tiny_run(workdir: str) -> None:
    """A byte-level 2-layer model with random weights (drawn with numpy: compiling Flax's init costs
    more than this whole module's serving), saved as a checkpoint with its config as training does."""
    c = config_lib.default_config()
    c.model.update(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=2, max_len=MAX_LEN)
    c.data.update(source="text:unused.txt", tokenizer="byte", seq_len=32)
    setup = workdir_lib.Setup(c, workdir)
    rng = np.random.default_rng(0)
    abstract = setup.abstract_state
    state = abstract.replace(
        step=np.int32(1), rng=np.zeros((2,), np.uint32),
        params=jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), abstract.params),
        opt_state=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.opt_state),
    )
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint)
    checkpointing.save(manager, 1, state, data_state={}, config=config_lib.to_json(setup.config))
    manager.wait_until_finished()
    manager.close()


class Running:
    """A uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, application):
        self.app = application
        self.server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @property
    def engine(self) -> engine_lib.Engine:
        return self.app.state.server.engine

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server of the tiny run's directory, as `python -m lmjax.serve` builds it."""
    workdir = str(tmp_path_factory.mktemp("serve_run"))
    tiny_run(workdir)
    running = Running(app_lib.app_from_workdir(workdir, max_slots=MAX_SLOTS, max_queue=MAX_QUEUE, model_name="tiny",
                                               warm_every_bucket=False))  # tests compile only what they use
    running.workdir = workdir
    yield running
    running.stop()


@pytest.fixture(scope="module")
def run(served):
    """(the run's stored config, the served params, tokenizer)."""
    server = served.app.state.server
    return workdir_lib.saved_config(served.workdir), server.engine.params, server.tokenizer


def complete(served, **body) -> dict:
    response = served.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(served, path: str, body: dict) -> list[dict]:
    events = []
    with served.client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def forward_logprobs(config, params, ids: list[int]) -> np.ndarray:
    """log-softmax of the full forward pass over `ids`: row t scores the token after position t."""
    logits = jax.jit(Transformer(config.model).apply)({"params": params}, jnp.asarray([ids], jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits[0], axis=-1))


# --- generation equals the model's own ----------------------------------------------------------


def test_greedy_completions_equal_generate_mode(run, served):
    config, params, tokenizer = run
    prompts = ["def ", "import os\n", "x"]
    expected = sampling.sample_texts(config, params, tokenizer, prompts, 24, temperature=0.0)
    result = complete(served, prompt=prompts, max_tokens=24, temperature=0)
    assert [c["text"] for c in sorted(result["choices"], key=lambda c: c["index"])] == expected
    ids = [sampling.prompt_ids(tokenizer, p) for p in prompts]
    assert result["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]


def test_quantized_server_decodes_like_generate_with_the_same_weights(served):
    """--quantize=int8: the int8 weights kept beside the checkpoint, decoded like `generate --quantize`."""
    running = Running(app_lib.app_from_workdir(served.workdir, max_slots=2, max_queue=4, warm_every_bucket=False,
                                               quantize="int8"))
    try:
        server = running.app.state.server
        config = workdir_lib.saved_config(served.workdir)
        qparams = quantization.restore(quantization.quantized_dir(served.workdir, 1, "int8", quant_lib.DEFAULT_GROUP),
                                       config.model, "int8")
        expected = sampling.sample_texts(config, qparams, server.tokenizer, ["def "], 16, temperature=0.0,
                                         model_config=quant_lib.with_quantization(config.model, "int8"))
        result = complete(running, prompt="def ", max_tokens=16, temperature=0)
        assert [c["text"] for c in result["choices"]] == expected
        served_bytes = quant_lib.param_bytes(server.engine.params)
        assert served_bytes == quant_lib.param_bytes(qparams) < 0.6 * quant_lib.param_bytes(served.engine.params)
    finally:
        running.stop()


def test_echo_logprobs_equal_the_full_forward(run, served):
    config, params, tokenizer = run
    prompt = "def f(x):"
    result = complete(served, prompt=prompt, max_tokens=10, temperature=0.7, seed=3, echo=True, logprobs=3,
                      return_tokens_as_token_ids=True)
    choice = result["choices"][0]
    lp = choice["logprobs"]
    ids = sampling.prompt_ids(tokenizer, prompt)
    full = [ids[0]] + [int(t.split(":")[1]) for t in lp["tokens"]]
    assert full[: len(ids)] == ids and len(full) == len(ids) + result["usage"]["completion_tokens"]
    assert choice["text"] == prompt + tokenizer.decode(full[len(ids):])
    reference = forward_logprobs(config, params, full)
    expected = [reference[t - 1, full[t]] for t in range(1, len(full))]
    np.testing.assert_allclose(lp["token_logprobs"], expected, atol=2e-4)
    for t, top in enumerate(lp["top_logprobs"]):
        assert list(top) == [f"token_id:{i}" for i in np.argsort(-reference[t])[:3]]
        np.testing.assert_allclose(list(top.values()), np.sort(reference[t])[::-1][:3], atol=2e-4)
    assert lp["text_offset"] == np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()

    scored = complete(served, prompt=prompt, max_tokens=0, echo=True, logprobs=0)["choices"][0]
    assert scored["text"] == prompt
    np.testing.assert_allclose(scored["logprobs"]["token_logprobs"], expected[: len(ids) - 1], atol=2e-4)


def test_same_seed_same_tokens_alone_under_load_and_streamed(served):
    body = {"prompt": "class A:", "max_tokens": 40, "temperature": 1.0, "top_k": 40, "top_p": 0.95, "seed": 11}
    alone = complete(served, **body)["choices"][0]["text"]

    async def load():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            others = [client.post("/v1/completions", json={"prompt": "x" * (i + 1), "max_tokens": 30 + i,
                                                           "temperature": 0.8, "seed": i}) for i in range(3)]
            mine = client.post("/v1/completions", json=body)
            return await asyncio.gather(mine, *others)

    responses = asyncio.run(load())
    assert all(r.status_code == 200 for r in responses)
    assert responses[0].json()["choices"][0]["text"] == alone
    events = stream_events(served, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events) == alone
    assert events[-1]["choices"][0]["finish_reason"] == "length" or len(alone) < 40

    n = complete(served, **{**body, "n": 3})["choices"]
    assert n[0]["text"] == alone and len({c["text"] for c in n}) == 3  # choice 0 is the seed's own stream
    assert complete(served, **{**body, "seed": 12})["choices"][0]["text"] != alone


def test_stop_strings_cut_the_text_streamed_or_not(served):
    full = complete(served, prompt="a", max_tokens=30, temperature=0)["choices"][0]["text"]
    stop = full[5:7]
    cut = complete(served, prompt="a", max_tokens=30, temperature=0, stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    events = stream_events(served, "/v1/completions",
                           {"prompt": "a", "max_tokens": 30, "temperature": 0, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events) == cut["text"]


def test_chat_uses_the_plain_template(served):
    assert text.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "System: Be brief.\nUser: Hi\nAssistant:"
    messages = [{"role": "user", "content": "Hi"}]
    chat = {"messages": messages, "max_tokens": 20, "temperature": 0}
    response = served.client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200, response.text
    reply = response.json()["choices"][0]
    prompt = text.chat_prompt(messages)
    same = complete(served, prompt=prompt, max_tokens=20, temperature=0, stop=list(text.CHAT_STOP))["choices"][0]
    assert reply["message"] == {"role": "assistant", "content": same["text"].lstrip(" ")}
    events = stream_events(served, "/v1/chat/completions", chat)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == reply["message"]["content"]
    scored = served.client.post("/v1/chat/completions",
                                json={**chat, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}).json()
    content = scored["choices"][0]["logprobs"]["content"]
    assert len(content) == scored["usage"]["completion_tokens"]
    assert all(c["logprob"] == c["top_logprobs"][0]["logprob"] and len(c["top_logprobs"]) == 2 for c in content)


# --- the other endpoints --------------------------------------------------------------------------


def test_models_tokenize_detokenize_health_metrics(run, served):
    _, _, tokenizer = run
    assert served.client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    tokens = served.client.post("/tokenize", json={"prompt": "héllo"}).json()
    assert tokens["tokens"] == sampling.prompt_ids(tokenizer, "héllo") and tokens["max_model_len"] == MAX_LEN
    plain = served.client.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()["tokens"]
    assert served.client.post("/detokenize", json={"tokens": plain}).json() == {"prompt": "héllo"}
    assert served.client.get("/health").json()["status"] == "ok"
    complete(served, prompt="x", max_tokens=5, temperature=0)
    metrics = served.client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line[:1] != "#"}
    assert values["lmjax_max_slots"] == MAX_SLOTS and "lmjax_queue_length" in values and "lmjax_active_slots" in values
    assert values["lmjax_generation_tokens_total"] >= 5 and values["lmjax_prompt_tokens_total"] >= 2
    assert values["lmjax_time_to_first_token_seconds_count"] >= 1 and values["lmjax_request_latency_seconds_count"] >= 1


# --- bad input, load, disconnects, shutdown --------------------------------------------------------


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ["not valid JSON"]),
    (b"[1, 2]", 400, ["JSON object"]),
    ({"max_tokens": 5}, 400, ["'prompt' is required"]),
    ({"prompt": "a", "max_tokens": "5"}, 400, ["'max_tokens'", "integer", "string"]),
    ({"prompt": "a", "max_tokens": -1}, 400, ["'max_tokens'", "-1"]),
    ({"prompt": "a", "temperature": 1e9}, 400, ["'temperature'", "[0.0, 2.0]"]),
    ({"prompt": "a", "top_p": 0}, 400, ["'top_p'"]),
    ({"prompt": "a", "n": True}, 400, ["'n'", "boolean"]),
    ({"prompt": "a", "nonsense": 1}, 400, ["unknown field", "nonsense"]),
    ({"prompt": "a", "frequency_penalty": 0.5}, 400, ["frequency_penalty", "not supported"]),
    ({"prompt": [[1, 2], [300]]}, 400, ["outside the vocabulary", "300"]),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, ["'stop'", "at most 4"]),
    ({"prompt": "a", "n": 100}, 400, ["queue"]),
    ({"prompt": "a" * 120, "max_tokens": 20}, 400, ["context of 128", "max_len=128", "121 tokens"]),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(served, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = served.client.post("/v1/completions", **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message
    after = complete(served, prompt="ok", max_tokens=3, temperature=0, ignore_eos=True)
    assert after["choices"][0]["finish_reason"] == "length" and after["usage"]["completion_tokens"] == 3


def test_bad_requests_on_other_routes(served):
    chat = served.client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert chat.status_code == 400 and "messages[0].role" in chat.json()["error"]["message"]
    assert served.client.post("/detokenize", json={"tokens": [1, -3]}).status_code == 400
    assert served.client.get("/v1/nope").status_code == 404
    assert served.client.get("/v1/completions").status_code == 405


def test_load_every_request_completes_or_gets_429(served):
    """More clients than slots plus queue: each gets its whole completion or a 429 with Retry-After."""
    async def load():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await asyncio.gather(*[
                client.post("/v1/completions",
                            json={"prompt": f"{i}", "max_tokens": 60, "temperature": 0, "ignore_eos": True})
                for i in range(24)])

    responses = asyncio.run(load())
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(busy) == 24 and len(ok) >= MAX_QUEUE
    assert busy, "24 simultaneous 60-token requests overflow 4 slots and a queue of 6"
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"] for r in busy)
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == 60 and r.json()["choices"][0]["finish_reason"] == "length"
    assert served.client.get("/health").json()["active_slots"] == 0


def test_a_streaming_client_that_disconnects_frees_its_slot(served, monkeypatch):
    decode = served.engine._decode

    def slow_decode():  # the request must still be running when the client goes away, however busy the machine
        time.sleep(0.05)
        decode()

    monkeypatch.setattr(served.engine, "_decode", slow_decode)
    body = {"prompt": "d", "max_tokens": MAX_LEN - 4, "temperature": 1.0, "seed": 5, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=served.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())
        busy = [r for r in served.engine.slots if r is not None]
    assert len(busy) == 1
    request = busy[0]
    for _ in range(200):
        if request not in served.engine.slots:
            break
        time.sleep(0.02)
    assert request not in served.engine.slots and request.cancelled.is_set()


def test_shutdown_finishes_requests_in_flight(run):
    config, params, tokenizer = run
    engine = engine_lib.Engine(config.model, params, max_slots=MAX_SLOTS, max_queue=2, eos_id=tokenizer.eos_id)
    running = Running(app_lib.create_app(engine, tokenizer, "tiny", warm_every_bucket=False))
    result = {}

    def client():
        result["response"] = httpx.post(f"{running.url}/v1/completions", timeout=60,
                                        json={"prompt": "z", "max_tokens": 100, "temperature": 1.0, "seed": 1})

    thread = threading.Thread(target=client)
    thread.start()
    while not running.engine.active_slots():
        time.sleep(0.005)
    running.stop()  # what uvicorn does on SIGTERM
    thread.join(60)
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] == 100 or \
        result["response"].json()["choices"][0]["finish_reason"] == "stop"
    assert not running.engine.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{running.url}/health")


def test_tokenizer_info_is_what_lm_eval_remote_tokenizer_reads(served):
    """lm-evaluation-harness's `local-completions` uses the server's tokenizer only if this answers
    with an `eos_token` key and /tokenize answers its probe."""
    info = served.client.get("/tokenizer_info").json()
    assert "eos_token" in info and info["model_max_length"] == MAX_LEN
    probe = served.client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert probe["tokens"] == list(b"test")


def test_a_request_gets_the_same_numbers_whichever_key_bucket_served_it(run, monkeypatch):
    """A short request alone runs the smallest key bucket; beside a long companion, the whole cache.
    Its tokens and log-probs (greedy and sampled) must be equal bit for bit."""
    config, params, tokenizer = run
    used = []

    def spy(*args, keys, **kwargs):
        used.append(keys)
        return decode_slots(*args, keys=keys, **kwargs)

    decode_slots = engine_lib.decode_slots
    monkeypatch.setattr(engine_lib, "decode_slots", spy)
    engine = engine_lib.Engine(config.model, params, max_slots=2, max_queue=4, eos_id=tokenizer.eos_id)
    engine.start()

    def serve(*requests):
        done = [threading.Event() for _ in requests]
        got = [[] for _ in requests]
        for request, tokens, event in zip(requests, got, done):
            request.emit = lambda u, tokens=tokens, event=event: (tokens.extend(u.tokens), u.finish and event.set())
        engine.submit(list(requests))
        for event in done:
            assert event.wait(60)
        return got

    def short(temperature):
        return engine_lib.Request([5, 6, 7], 10, emit=None, temperature=temperature, seed=3, ignore_eos=True)

    def long():
        return engine_lib.Request(list(range(10, 110)), 20, emit=None, temperature=0.0, ignore_eos=True)

    try:
        for temperature in (0.0, 0.9):
            used.clear()
            alone = serve(short(temperature))[0]
            assert set(used) == {engine_lib.MIN_BUCKET}
            used.clear()
            companion, beside = serve(long(), short(temperature))
            assert len(companion) == 20 and used[0] == MAX_LEN
            assert len(alone) == 10
            assert [(t.id, t.logprob, t.top) for t in alone] == [(t.id, t.logprob, t.top) for t in beside]
    finally:
        engine.stop()


def test_a_failing_decode_step_ends_every_request_in_flight_with_an_error_and_the_engine_serves_on(run, monkeypatch):
    """A generating request and a prompt only scored, dispatched together when the step fails: both end
    with an error (neither hangs); the next request is served normally."""
    config, params, tokenizer = run
    decode_slots, calls = engine_lib.decode_slots, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return decode_slots(*args, **kwargs)

    monkeypatch.setattr(engine_lib, "decode_slots", failing_once)
    engine = engine_lib.Engine(config.model, params, max_slots=2, max_queue=4, eos_id=tokenizer.eos_id)
    engine.start()

    def request(max_tokens, **kwargs):
        updates, done = [], threading.Event()
        emit = lambda u: (updates.append(u), u.finish and done.set())  # noqa: E731
        return engine_lib.Request([5, 6, 7], max_tokens, emit=emit, temperature=0.0, ignore_eos=True,
                                  **kwargs), updates, done

    try:
        batch = [request(4), request(0, score_prompt=True)]
        engine.submit([r for r, _, _ in batch])
        for _, updates, done in batch:
            assert done.wait(60)
            assert updates[-1].finish == "error" and "boom" in updates[-1].error
        later, updates, done = request(4)
        engine.submit([later])
        assert done.wait(60) and updates[-1].finish == "length"
        assert sum(len(u.tokens) for u in updates) == 4
    finally:
        engine.stop()


def test_the_decode_step_writes_the_donated_cache_in_place_without_copying_it(served):
    """The step's output cache is the input's buffers (donated), and the compiled step holds no copy
    or transpose of a whole layer's cache (each layer's keys are read where they lie, once)."""
    engine = served.engine
    cache = decoding.init_cache(engine.cfg, MAX_SLOTS, MAX_LEN, per_row_index=True)
    layers = jax.tree.leaves(cache["layers"])
    pointers = [x.unsafe_buffer_pointer() for x in layers]
    requests = [engine_lib.Request([1], 1, emit=None, temperature=0.5, seed=i) for i in range(MAX_SLOTS)]
    args = (engine.cfg, engine.params, cache, np.arange(MAX_SLOTS, dtype=np.int32), np.ones(MAX_SLOTS, bool),
            engine_lib._settings(requests), np.zeros(MAX_SLOTS, np.int32))
    program = engine_lib.decode_slots.lower(*args, keys=MAX_LEN).compile().as_text()
    new, _ = engine_lib.decode_slots(*args, keys=MAX_LEN)
    assert all(x.is_deleted() for x in layers)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new["layers"])] == pointers
    size = layers[0].size
    copied = [line for line in program.splitlines() if (" copy(" in line or " transpose(" in line)
              and np.prod([int(d) for d in line.split("[", 1)[1].split("]", 1)[0].split(",") if d]) == size]
    assert not copied, copied[:2]


def test_updates_waiting_together_come_out_as_one_event_per_choice(served):
    """A client behind the engine gets its waiting tokens in one event: text joined, every token's
    log-prob kept in order, and the finish of the last."""
    server = served.app.state.server
    tokens = [engine_lib.Token(104, -0.5, ((104, -0.5),)), engine_lib.Token(105, -1.5, ((7, -0.25),)),
              engine_lib.Token(33, -2.5, ((33, -2.5),))]

    async def drain():
        queue = asyncio.Queue()
        choices = [app_lib.Choice(i, engine_lib.Request([1], 3, emit=None), server.tokenizer, [], "", False)
                   for i in range(2)]
        for t, token in enumerate(tokens):
            for index in (0, 1):
                queue.put_nowait((index, engine_lib.Update(tokens=(token,), finish="length" if t == 2 else None)))
        return choices, [item async for item in server.updates(None, choices, queue, poll_disconnect=False)]

    choices, items = asyncio.run(drain())
    assert [(c.index, new_text, got) for c, new_text, got in items] == [(0, "hi!", tokens), (1, "hi!", tokens)]
    assert [c.finish for c in choices] == ["length", "length"]


def test_key_buckets_cover_the_context():
    assert engine_lib.key_buckets(128) == [32, 64, 128]
    assert engine_lib.key_buckets(100) == [32, 64, 100]
    assert engine_lib.key_buckets(16) == [16]
    assert [engine_lib.key_bucket(n, 128) for n in (1, 32, 33, 65, 128)] == [32, 32, 64, 128, 128]


# --- the pieces -----------------------------------------------------------------------------------


def test_per_row_sampling_equals_decoding_sample_row_by_row():
    """Rows with different settings (nucleus only; top-k and nucleus) in one call: each row draws what
    `decoding.sample` draws for that row alone with the row's key."""
    settings = [(1.3, 0, 0.8), (0.7, 5, 0.9)]
    temperature, top_k, top_p = (jnp.array(column) for column in zip(*settings))
    logits_BxV = jax.random.normal(jax.random.key(0), (2, 50)) * 3
    sample_rows = jax.jit(sampler.sample_rows)
    sample = jax.jit(decoding.sample, static_argnums=(2, 3, 4))
    for step in range(8):
        keys = sampler.row_keys(jnp.array([9, 9]), jnp.array([0, 1]), jnp.full((2,), step))
        rows = sample_rows(logits_BxV, temperature, top_k, top_p, keys)["token"]
        for b, (t, k, p) in enumerate(settings):
            assert int(rows[b]) == int(sample(logits_BxV[b:b + 1], keys[b], t, k, p)[0])
    # A batch where no row filters skips the sort; it draws what the filtering code draws with
    # top-k and top-p off, and what the same row draws beside a row that filters.
    unfiltered = sampler.filtered_logits(logits_BxV, temperature, jnp.zeros(2, jnp.int32), jnp.ones(2))
    np.testing.assert_array_equal(unfiltered, logits_BxV / temperature[:, None])
    mixed = sampler.filtered_logits(logits_BxV, temperature, jnp.array([0, 5]), jnp.array([1.0, 0.9]))
    np.testing.assert_array_equal(mixed[0], unfiltered[0])
    assert int(jnp.sum(jnp.isfinite(mixed[1]))) <= 5
    plain = sample_rows(logits_BxV, temperature, jnp.zeros(2, jnp.int32), jnp.ones(2), keys)["token"]
    for b in range(2):
        assert int(plain[b]) == int(sample(logits_BxV[b:b + 1], keys[b], float(temperature[b]), 0, 1.0)[0])
    greedy = sample_rows(logits_BxV, jnp.zeros(2), top_k, top_p, keys)
    np.testing.assert_array_equal(greedy["token"], jnp.argmax(logits_BxV, axis=-1))
    np.testing.assert_allclose(greedy["logprob"], jnp.max(jax.nn.log_softmax(logits_BxV), axis=-1), rtol=1e-6)


def test_text_stream_holds_back_stop_prefixes_and_split_characters():
    from lmjax.data.tokenizers import ByteTokenizer

    stream = text.TextStream(ByteTokenizer(), stop=["END"])
    pieces = [stream.add(list(chunk)) for chunk in (b"ab", b"cE", b"N", b"x\xc3", b"\xa9E", b"ND more")]
    assert pieces == ["ab", "c", "", "ENx", "\u00e9", ""]
    assert stream.stopped and stream.text == "abcENx\u00e9" and stream.finish() == ""
    tail = text.TextStream(ByteTokenizer(), stop=["END"])
    assert tail.add(list(b"xE")) == "x" and tail.finish() == "E"


def test_the_mailbox_wakes_the_loop_once_per_batch_and_keeps_each_queues_order():
    """Updates the engine thread posts while the loop is busy arrive together, in order, after a single
    wake-up; a later batch wakes it again."""
    async def main():
        loop = asyncio.get_running_loop()

        class CountingLoop:
            wakes = 0

            def call_soon_threadsafe(self, callback, *args):
                CountingLoop.wakes += 1
                return loop.call_soon_threadsafe(callback, *args)

        mailbox, queues = app_lib.Mailbox(CountingLoop()), [asyncio.Queue(), asyncio.Queue()]

        def post_step(t):
            for i, queue in enumerate(queues):
                mailbox.post(queue, (i, t))

        got = []
        for batch in ((0, 1, 2), (3,)):
            poster = threading.Thread(target=lambda batch=batch: [post_step(t) for t in batch])
            poster.start()
            poster.join()  # the loop is blocked meanwhile, as when it is busy serving
            await asyncio.sleep(0)
            got.append([[q.get_nowait() for _ in range(q.qsize())] for q in queues])
        return CountingLoop.wakes, got

    wakes, got = asyncio.run(main())
    assert wakes == 2
    assert got == [[[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]], [[(0, 3)], [(1, 3)]]]


def test_serving_a_workdir_without_a_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
        app_lib.app_from_workdir(str(tmp_path), max_slots=1, max_queue=1)
