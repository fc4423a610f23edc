"""From token ids to the text a client may see: incremental decoding, stop strings, the chat template.

A token can end in the middle of a UTF-8 character (byte tokens, SentencePiece byte fallback) and
the text so far can end with the beginning of a stop string; neither may reach a streaming client
before the next tokens settle it, so `TextStream` holds such a tail back.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmjax.data import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding shows for an unfinished UTF-8 character

# The plain chat template, used until post-training defines the one its models are tuned on.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:", "\nSystem:")


def chat_prompt(messages: Sequence[dict]) -> str:
    """`Role: content` lines, then `Assistant:` for the model to continue."""
    lines = [f"{CHAT_ROLES[m['role']]}: {m['content']}\n" for m in messages]
    return "".join(lines) + f"{CHAT_ROLES['assistant']}:"


class TextStream:
    """The text of a growing list of ids, released as it becomes final, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the text already handed out
        self.stopped = False  # a stop string was found: the text ends before it

    def add(self, ids: Sequence[int]) -> str:
        """Take new ids; return the text that is now final and was not returned before."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._release(text[: min(found)])
        hold = max([self._stop_prefix(text)] + [len(text) - len(text.rstrip(REPLACEMENT))])
        return self._release(text[: len(text) - hold])

    def finish(self) -> str:
        """The held-back tail, once no token will follow."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids))

    @property
    def text(self) -> str:
        text = self.tokenizer.decode(self.ids)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(found)] if found else text

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, ready: str) -> str:
        new = ready[self.released:]
        self.released = max(self.released, len(ready))
        return new
