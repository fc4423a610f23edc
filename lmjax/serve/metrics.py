"""What `GET /metrics` reports, in Prometheus's text format (through prometheus_client, on a registry
of this server's own so that several servers in one process do not mix their figures)."""

from __future__ import annotations

import prometheus_client as prom

# Seconds; spans a tiny CPU model's milliseconds to a long generation on a big one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Queue length, active slots, token counters (tokens/s is their rate), time to first token and
    request latency histograms, and HTTP responses by status."""

    def __init__(self, max_slots: int):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.queue = prom.Gauge("lmjax_queue_length", "Requests waiting for a slot.", registry=r)
        self.active = prom.Gauge("lmjax_active_slots", "Slots generating a request.", registry=r)
        prom.Gauge("lmjax_max_slots", "Slots in the KV cache.", registry=r).set(max_slots)
        self.generated = prom.Counter("lmjax_generation_tokens", "Tokens generated.", registry=r)
        self.prompt = prom.Counter("lmjax_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.ttft = prom.Histogram("lmjax_time_to_first_token_seconds", "From arrival to the first new token.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.latency = prom.Histogram("lmjax_request_latency_seconds", "From arrival to the last token.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.responses = prom.Counter("lmjax_http_responses", "HTTP responses by endpoint and status.",
                                      ["path", "status"], registry=r)

    def set_load(self, queue: int, active: int) -> None:
        self.queue.set(queue)
        self.active.set(active)

    def prompt_tokens(self, n: int) -> None:
        self.prompt.inc(n)

    def generated_tokens(self, n: int) -> None:
        self.generated.inc(n)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def request_done(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def response(self, path: str, status: int) -> None:
        self.responses.labels(path, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
