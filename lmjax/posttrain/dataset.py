"""Post-training data: JSONL files, one example per line, read and checked in one place.

Schemas (a prompt is a string, one user turn, or a list of messages as in chat.py):
  sft     {"prompt": PROMPT, "response": str}   or   {"messages": [{"role": ..., "content": ...}, ...]}
          (a message list must contain an assistant message: only assistant text is learned)
  pairs   {"prompt": PROMPT, "chosen": str, "rejected": str}   (DPO and the reward model)
  prompts {"prompt": PROMPT, ...}   (PPO samples its own responses; sft and pairs files qualify)
Other keys are ignored (e.g. a judge's label kept for analysis). A bad line fails with the file,
the line number and what is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from lmjax.posttrain import chat

KINDS = ("sft", "pairs", "prompts")


def read_jsonl(path: str, kind: str) -> list[dict[str, Any]]:
    """The examples of `path` as {"messages"} (sft), {"prompt", "chosen", "rejected"} (pairs) or
    {"prompt"} (prompts) dicts, the prompt already a message list."""
    if kind not in KINDS:
        raise ValueError(f"unknown example kind {kind!r}: expected one of {KINDS}")
    if not path:
        raise ValueError("config.posttrain.train_file is not set: point it at a .jsonl file of examples")
    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"post-training data file {path} does not exist")
    examples = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        try:
            examples.append(_sft(record) if kind == "sft" else _pair(record) if kind == "pairs" else
                            {"prompt": _prompt(record)})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not examples:
        raise ValueError(f"post-training data file {path} holds no examples")
    return examples


def _prompt(record: dict) -> list[dict]:
    prompt = record.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise ValueError("'prompt' must be a string or a list of messages")
    return chat.conversation(prompt)


def _response(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty: there is nothing to learn from an empty response")
    return value


def _sft(record: dict) -> dict:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list of {'role', 'content'} objects")
        answers = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not any(isinstance(m.get("content"), str) and m["content"].strip() for m in answers):
            raise ValueError("'messages' has no non-empty assistant message: there is nothing to learn")
        return {"messages": chat.conversation(messages)}
    return {"messages": chat.conversation(_prompt(record), _response(record, "response"))}


def _pair(record: dict) -> dict:
    return {"prompt": _prompt(record), "chosen": _response(record, "chosen"), "rejected": _response(record, "rejected")}
