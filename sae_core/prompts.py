"""The one rule for reading a list of prompts or names that a user typed or keeps in a text file.

- Items are separated by new lines; :func:`parse_names` also splits on commas (names never contain
  one, prompts often do: "a cat, oil painting").
- Each item is stripped of surrounding white space; blank items are dropped.
- A line whose first non-blank character is ``#`` is a comment and is dropped.
- Duplicates are dropped, keeping the first occurrence and the order.

Every node input and command-line option that takes several prompts or names reads them with these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Union

__all__ = ["COMMENT", "parse_names", "parse_prompts"]

COMMENT = "#"
"""Lines starting with this (after white space) are comments."""

Text = Union[str, Iterable[str], None]


def _lines(text: Text) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return text.splitlines()
    lines: list[str] = []
    for item in text:
        if not isinstance(item, str):
            raise TypeError(f"expected text, got {type(item).__name__}")
        lines.extend(item.splitlines() or [""])
    return lines


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def parse_prompts(text: Text) -> list[str]:
    """One prompt per line (prompts may contain commas); comments, blanks and duplicates dropped.

    ``text`` is a string or a sequence of strings (each may hold several lines).
    """
    return _unique(line.strip() for line in _lines(text) if not line.strip().startswith(COMMENT))


def parse_names(text: Text) -> list[str]:
    """Names separated by new lines or commas (``"nudity, naked"``); comments, blanks and duplicates dropped."""
    names: list[str] = []
    for line in _lines(text):
        if line.strip().startswith(COMMENT):
            continue
        names.extend(part.strip() for part in re.split(r",", line))
    return _unique(names)
