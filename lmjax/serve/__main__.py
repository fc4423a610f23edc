"""`python -m lmjax.serve --workdir=DIR [--port=8000] [--max_slots=16] [--quantize=int8]`: an OpenAI-compatible server
for the newest checkpoint of a run (its stored config and tokenizer; no --config needed).

SIGTERM or Ctrl-C stops accepting connections, finishes the requests in flight, then exits.
"""

from __future__ import annotations

from absl import app, flags

from lmjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose newest checkpoint is served.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.", lower_bound=0, upper_bound=65535)
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 16, "Requests decoded together (rows of the KV cache).", lower_bound=1)
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Requests waiting for a slot before 429s.", lower_bound=1)
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                              "Serve weight-only quantized params (qwix), made once and kept beside the checkpoints.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name in /v1/models and responses (default: the workdir's).")
_DRAIN_S = flags.DEFINE_integer("drain_timeout_s", 60, "On shutdown, how long requests in flight may take.",
                                lower_bound=0)
flags.mark_flags_as_required(["workdir"])


def _run() -> None:
    import uvicorn

    from lmjax.serve import app as app_lib

    application = app_lib.app_from_workdir(_WORKDIR.value, max_slots=_MAX_SLOTS.value, max_queue=_MAX_QUEUE.value,
                                           model_name=_MODEL_NAME.value, quantize=_QUANTIZE.value)
    uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level="info",
                timeout_graceful_shutdown=_DRAIN_S.value)


main = cli.absl_main(_run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
