"""The chat template: a conversation -> token ids, and the loss weight of predicting each of them.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
Roles and turn ends are marked by four special tokens with ids reserved right after the
tokenizer's own (so no text, however written, can produce them):

  <|system|> = V,  <|user|> = V + 1,  <|assistant|> = V + 2,  <|end|> = V + 3   (V = tokenizer vocab)

and the model needs `vocab_size >= V + 4` (a pretrained model with exactly V rows is grown; see
`lmjax.posttrain.init`). A conversation is laid out as

  [EOS] <|user|> how are you? <|end|> <|assistant|> fine <|end|> <|user|> ... <|end|>

EOS (when the tokenizer has one) starts the sequence because pretraining documents start right
after an EOS. Each token gets the weight of the loss for predicting it: 1 for the content of an
assistant message and the `<|end|>` that closes it (the model must learn to stop), and
`prompt_loss_weight` (default 0) for everything else, the `<|assistant|>` header included: the
header is given by the template, never generated. A prompt for generation ends with
`<|assistant|>`; sampling stops at `<|end|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lmjax.data.tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NUM_SPECIAL = len(SPECIAL_TOKENS)

Message = Mapping[str, str]


class ChatTemplate:
    """Encodes conversations with `tokenizer` plus the reserved role and end-of-turn ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.first_special = int(tokenizer.vocab_size)
        self.special_ids = {name: self.first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.role_ids = {role: self.first_special + i for i, role in enumerate(ROLES)}
        self.end_id = self.special_ids["<|end|>"]
        self.vocab_size = self.first_special + NUM_SPECIAL  # the least model.vocab_size that fits

    def encode(
        self, messages: Sequence[Message], *, prompt_loss_weight: float = 0.0, add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids [T] int32, weights [T] float32): weights[t] is the loss weight of predicting ids[t]."""
        ids: list[int] = []
        weights: list[float] = []

        def add(tokens: Sequence[int], weight: float) -> None:
            ids.extend(int(t) for t in tokens)
            weights.extend([weight] * len(tokens))

        if self.tokenizer.eos_id >= 0:
            add([self.tokenizer.eos_id], prompt_loss_weight)
        for i, message in enumerate(messages):
            role, content = check_message(message, i)
            answer = 1.0 if role == "assistant" else prompt_loss_weight
            add([self.role_ids[role]], prompt_loss_weight)
            add(self.tokenizer.encode(content), answer)
            add([self.end_id], answer)
        if add_generation_prompt:
            add([self.role_ids["assistant"]], prompt_loss_weight)
        return np.asarray(ids, np.int32), np.asarray(weights, np.float32)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids a model continues to answer `messages`: the conversation, then `<|assistant|>`."""
        return self.encode(messages, add_generation_prompt=True)[0].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text, with the special tokens written as their names (for logs and samples)."""
        names = {i: name for name, i in self.special_ids.items()}
        out, run = [], []
        for i in map(int, ids):
            if i in names:
                out.append(self.tokenizer.decode(run))
                out.append(names[i])
                run = []
            else:
                run.append(i)
        out.append(self.tokenizer.decode(run))
        return "".join(out)


def conversation(prompt: str | Sequence[Message], response: str | None = None) -> list[dict]:
    """Messages from a plain prompt string (one user turn) or a message list, plus an assistant reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for i, message in enumerate(messages):
        check_message(message, i)
    messages = [dict(m) for m in messages]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def check_message(message: Message, index: int) -> tuple[str, str]:
    """(role, content) of a well-formed message; a ValueError naming the message otherwise."""
    if not isinstance(message, Mapping) or set(message) - {"role", "content"} or "role" not in message:
        raise ValueError(f"message {index}: expected {{'role': ..., 'content': ...}}, got {message!r}")
    role, content = message["role"], message.get("content", "")
    if role not in ROLES:
        raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
    if not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
    return role, content
