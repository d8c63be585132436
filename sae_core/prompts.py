"""The one rule for reading a list of prompts or names that a user typed or keeps in a text file.

- Items are separated by new lines; :func:`parse_names` also splits on commas (names never contain
  one, prompts often do: "a cat, oil painting").
- Each item is stripped of surrounding white space; blank items are dropped.
- A line whose first non-blank character is ``#`` is a comment and is dropped.
- Duplicates are dropped, keeping the first occurrence and the order.

Every node input and command-line option that takes several prompts or names reads them with these;
a prompt file (plain or gzip-compressed UTF-8 text, one prompt per line) is read by :func:`read_prompt_file`,
which refuses what is not a prompt list with an error naming the file and the line.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Iterable
from typing import Union

__all__ = ["COMMENT", "MAX_PROMPT_CHARS", "PromptFileError", "parse_names", "parse_prompts", "read_prompt_file"]

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


MAX_PROMPT_CHARS = 4000
"""Longest line :func:`read_prompt_file` accepts (a longer one means the file is not a prompt list)."""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a prompt list (names the file, and the line where it applies)."""


def read_prompt_file(path: Union[str, "os.PathLike[str]"]) -> list[str]:
    """The prompts of a text file (``.gz``: gzip-compressed), read with :func:`parse_prompts`.

    Raises :class:`PromptFileError` for a file that is not UTF-8 text, holds control characters (a binary
    file) or lines over :data:`MAX_PROMPT_CHARS` characters, or has no prompt at all (only blank lines and
    comments); ``FileNotFoundError`` when it does not exist.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"prompt file not found: {name}")
    with open(name, "rb") as f:
        data = f.read()
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise PromptFileError(f"prompt file {name}: not a readable gzip file ({err})") from None
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PromptFileError(f"prompt file {name}, line {number}: not UTF-8 text; save the file as UTF-8 "
                                  "(one prompt per line)") from None
        line = line.removeprefix("\ufeff") if number == 1 else line
        if _CONTROL.search(line):
            raise PromptFileError(f"prompt file {name}, line {number}: contains a control character "
                                  f"({_CONTROL.search(line).group()!r}); is this a text file of prompts?")
        if len(line) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"prompt file {name}, line {number}: {len(line)} characters, more than "
                                  f"{MAX_PROMPT_CHARS}; put one prompt per line")
        lines[number - 1] = line
    prompts = parse_prompts("\n".join(lines))
    if not prompts:
        raise PromptFileError(f"prompt file {name} holds no prompts (only blank lines or '#' comments); "
                              "write one prompt per line")
    return prompts
