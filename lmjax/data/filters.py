"""Heuristic quality filters (in the spirit of Gopher/C4 rules), thresholds in `data.clean`.

Each filter looks at one document and says whether to drop it; `first_failure` names the first
filter a document fails, so the prepare command can count what each one removed.
"""

from __future__ import annotations

import re
from typing import Callable

_WORD = re.compile(r"\w+")


def repeated_line_ratio(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line (boilerplate, spam)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of the word n-grams that repeat an earlier one (degenerate, looping text)."""
    words = _WORD.findall(text.lower())
    grams = list(zip(*(words[i:] for i in range(n))))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def non_alnum_ratio(text: str) -> float:
    """Share of characters that are neither alphanumeric nor whitespace (markup, binary junk)."""
    if not text:
        return 0.0
    plain = sum(1 for c in text if c.isalnum() or c.isspace())
    return 1.0 - plain / len(text)


def filters(clean_cfg) -> dict[str, Callable[[str], bool]]:
    """Filter name -> predicate that is True when the document should be dropped."""
    return {
        "too_short": lambda t: len(t) < clean_cfg.min_chars,
        "too_long": lambda t: len(t) > clean_cfg.max_chars,
        "repeated_lines": lambda t: repeated_line_ratio(t) > clean_cfg.max_repeated_line_ratio,
        "repeated_ngrams": lambda t: repeated_ngram_ratio(t) > clean_cfg.max_repeated_ngram_ratio,
        "non_alnum": lambda t: non_alnum_ratio(t) > clean_cfg.max_non_alnum_ratio,
    }


def first_failure(text: str, clean_cfg) -> str | None:
    """The name of the first filter that drops `text`, or None if it passes all of them."""
    for name, drop in filters(clean_cfg).items():
        if drop(text):
            return name
    return None
