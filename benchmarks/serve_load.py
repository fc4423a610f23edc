"""Serving under load: continuous batching against the same requests served one at a time.

    python -m benchmarks.serve_load --requests=48 --max_tokens=64 --clients=16 --slots=1,4,16 --rounds=3

Starts `python -m lmjax.serve` on loopback (one server per `--slots` value, all up and warmed before
any is measured) and sends each the same `--requests` streamed completions: from `--clients`
concurrent clients, and, on the smallest slot count, from one client, one after another (served one
at a time). The phases alternate, round after round, so that a machine whose speed drifts (a shared
host) affects every mode alike; the ratio to sequential is taken within each round. Reports
generated tokens/s over each phase and the p50/p99 of request latency and time to first token
(first streamed chunk), all measured by the clients. The clients run on the same CPU as the server;
they use aiohttp, whose C parser costs a third of httpx's CPU per streamed event.

Without `--workdir` it serves a random-init model of `--preset`'s shape (byte tokenizer):
serving cost does not depend on the weights, and `ignore_eos` makes every request generate exactly
`--max_tokens` tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def ", "import os\n", "class Server:\n    def __init__(self):", "for i in range(10):\n",
           "# Parse the request body, check every field\n", "return {", "x = [", "if __name__"]


def random_run(workdir: str, preset: str, max_len: int | None) -> None:
    """A checkpoint of `preset`'s shape (byte tokenizer, so vocab 259) with random weights (numpy, N(0, 0.02))."""
    import jax

    from lmjax import config as config_lib
    from lmjax.train import checkpointing
    from lmjax.train import workdir as workdir_lib

    c = config_lib.load(preset)
    c.model.max_len = max_len or c.model.max_len
    c.model.vocab_size = None  # the byte tokenizer's
    c.data.update(source="text:unused.txt", tokenizer="byte", seq_len=min(c.data.seq_len, c.model.max_len))
    setup = workdir_lib.Setup(c, workdir)
    rng = np.random.default_rng(0)
    abstract = setup.abstract_state
    state = abstract.replace(
        step=np.int32(1), rng=np.zeros((2,), np.uint32),
        params=jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), abstract.params),
        opt_state=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.opt_state),
    )
    manager = checkpointing.make_manager(workdir, setup.config.checkpoint)
    checkpointing.save(manager, 1, state, data_state={}, config=config_lib.to_json(setup.config))
    manager.wait_until_finished()
    manager.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, workdir: str, max_slots: int, max_queue: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=REPO)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmjax.serve", f"--workdir={workdir}", f"--port={self.port}",
             f"--max_slots={max_slots}", f"--max_queue={max_queue}"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not start within 300 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def one_request(session: aiohttp.ClientSession, body: dict) -> dict:
    """Latency, time to first chunk and generated tokens of one streamed completion (only the event
    carrying `usage` is parsed: the clients share the server's CPU)."""
    start = time.perf_counter()
    first, tokens, pending = None, 0, b""
    async with session.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - start
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if b'"usage"' in event:
                    tokens = json.loads(event[len(b"data: "):])["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def one_request_httpx(client: httpx.AsyncClient, body: dict) -> dict:
    """`one_request` through httpx (`--client=httpx`, what this benchmark used before)."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - start
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def phase(url: str, bodies: list[dict], clients: int, library: str = "aiohttp") -> dict:
    """`bodies` sent by `clients` concurrent clients, each taking the next unsent one."""
    pending = list(reversed(bodies))
    results = []
    send = one_request if library == "aiohttp" else one_request_httpx

    async def client_loop(session) -> None:
        while pending:
            results.append(await send(session, pending.pop()))

    if library == "aiohttp":
        session = aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=clients),
                                        timeout=aiohttp.ClientTimeout(total=600))
    else:
        session = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients))
    async with session:
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(session) for _ in range(clients)])
        wall = time.perf_counter() - start
    latency = np.array([r["latency"] for r in results])
    ttft = np.array([r["ttft"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "latency_p50": float(np.percentile(latency, 50)), "latency_p99": float(np.percentile(latency, 99)),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99))}


def bodies(n: int, max_tokens: int) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
             "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="a trained run to serve (default: a random-init gpt_small shape)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slots", default="1,4,16", help="comma-separated --max_slots values to measure")
    parser.add_argument("--rounds", type=int, default=3, help="times every phase runs, alternating")
    parser.add_argument("--client", default="aiohttp", choices=["aiohttp", "httpx"], help="the clients' HTTP library")
    parser.add_argument("--preset", default="configs/gpt_small.py", help="shape of the random-init model")
    parser.add_argument("--max_len", type=int, default=None, help="its context (default: the preset's)")
    args = parser.parse_args()
    slots = sorted(int(s) for s in args.slots.split(","))

    workdir = args.workdir
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="serve_load-")
        random_run(workdir, args.preset, args.max_len)
    work = bodies(args.requests, args.max_tokens)
    warm = bodies(len(PROMPTS), 4)  # compiles every prompt bucket before the clock starts
    servers = {}
    try:
        for max_slots in reversed(slots):
            servers[max_slots] = ServerProcess(workdir, max_slots, max_queue=max(256, args.requests))
            asyncio.run(phase(servers[max_slots].url, warm, 1))
        phases = [("sequential", slots[0], 1)] + [("concurrent", n, args.clients) for n in reversed(slots)]
        rows = collections.defaultdict(list)  # (mode, slots) -> one result per round
        for round_ in range(args.rounds):
            for mode, max_slots, clients in phases:
                rows[mode, max_slots].append(asyncio.run(phase(servers[max_slots].url, work, clients, args.client)))
                print(round_, mode, max_slots, {k: round(v, 3) for k, v in rows[mode, max_slots][-1].items()},
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()

    sequential = [r["tokens_per_s"] for r in rows["sequential", slots[0]]]
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, streamed; {args.rounds} rounds; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end. Medians over the rounds; the ratio to "
          f"sequential is the median of the rounds' ratios (its range in brackets).\n")
    print("| mode | clients | max_slots | tokens/s | vs sequential | latency p50 / p99 (s) | TTFT p50 / p99 (s) |")
    print("|---|---|---|---|---|---|---|")
    for mode, max_slots, clients in phases:
        runs = rows[mode, max_slots]
        ratios = [r["tokens_per_s"] / s for r, s in zip(runs, sequential)]
        med = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        print(f"| {mode} | {clients} | {max_slots} | {med['tokens_per_s']:.0f} | {np.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | {med['latency_p50']:.2f} / {med['latency_p99']:.2f} | "
              f"{med['ttft_p50']:.3f} / {med['ttft_p99']:.3f} |")


if __name__ == "__main__":
    main()
