"""Per-concept SAeUron parameters: a ``gamma`` and a selection rule for each erased concept.

SAeUron's object erasure tunes the multiplier and the percentile class by class (the reference sweeps
``percentile x gamma`` per class and keeps the pair with the best ``(UA + IRA) / 2``). One
:class:`ConceptParams` holds what one concept overrides; anything it leaves out comes from the block's
own ``gamma`` / ``selection`` / ``top_n`` / ``percentile``.

Two spellings, both read by :func:`parse_concept_params`:

* text, one concept per line (the Concept Block node's ``concept_params`` input)::

      # concept: gamma[, rule]
      dog: -15, percentile=99.995
      cat: -5, top_n=3
      Van Gogh: -1
      bird: -10, 99.99          # a bare second number is a value of the block's `selection` rule

  ``gamma=``, ``multiplier=`` (the reference's name for gamma), ``top_n=`` and ``percentile=`` may be
  written as keys in any order; ``#`` starts a comment; blank lines are skipped. The name is everything
  before the last colon.
* a mapping ``{concept: gamma}`` or ``{concept: {"gamma" | "multiplier": g, "top_n": n | "percentile": p}}``
  (the reference's per-class table has this shape with ``multiplier`` and ``percentile``).

Every problem is a ``ValueError`` that names ``concept_params``, the line and the forms allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["ConceptParams", "format_concept_params", "parse_concept_params"]

_FORMS = ("'concept: gamma', 'concept: gamma, top_n=N', 'concept: gamma, percentile=P' or "
          "'concept: gamma, V' (V: a value of the block's selection rule)")
_KEYS = {"gamma": "gamma", "multiplier": "gamma", "top_n": "top_n", "percentile": "percentile"}
_ITEM = re.compile(r"^(?:(?P<key>[A-Za-z_]+)\s*=?\s*)?(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


class ConceptParams(NamedTuple):
    """What one concept sets for itself; ``None`` = the block's value."""

    name: str
    """The concept (a name of the feature table)."""
    gamma: float | None = None
    """Its multiplier."""
    top_n: int | None = None
    """Its latents per step (rule ``top_n``)."""
    percentile: float | None = None
    """Its score percentile (rule ``percentile``)."""

    def describe(self) -> str:
        parts = [] if self.gamma is None else [f"gamma {self.gamma!r}"]
        if self.top_n is not None:
            parts.append(f"top_n {self.top_n}")
        if self.percentile is not None:
            parts.append(f"percentile {self.percentile!r}")
        return f"{self.name} ({', '.join(parts) or 'block defaults'})"


def _checked(where: str, name: str, gamma: Any, top_n: Any, percentile: Any) -> ConceptParams:
    """One entry's values, checked: a finite gamma, top_n >= 1 (whole), percentile in [0, 100), one rule."""
    if not name:
        raise ValueError(f"concept_params {where}: the concept name is empty; write {_FORMS}")
    if gamma is not None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(float(gamma)):
            raise ValueError(f"concept_params {where}: gamma must be a finite number, got {gamma!r}")
        gamma = float(gamma)
    if top_n is not None and percentile is not None:
        raise ValueError(f"concept_params {where}: give either top_n or percentile for '{name}', not both")
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, (int, float)) or float(top_n) != int(top_n) \
                or int(top_n) < 1:
            raise ValueError(f"concept_params {where}: top_n must be a whole number >= 1, got {top_n!r}")
        top_n = int(top_n)
    if percentile is not None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not 0.0 <= float(percentile) < 100.0:
            raise ValueError(f"concept_params {where}: percentile must be a number in [0, 100), got {percentile!r}")
        percentile = float(percentile)
    return ConceptParams(name, gamma, top_n, percentile)


def _parse_line(line: str, number: int, selection: str) -> ConceptParams:
    where = f"line {number} ({line!r})"
    if ":" not in line:
        raise ValueError(f"concept_params {where}: no ':' after the concept name; write {_FORMS}")
    name, _, rest = line.rpartition(":")
    name = name.strip()
    values: dict[str, float] = {}
    positional: list[float] = []
    for item in (part.strip() for part in rest.split(",")):
        m = _ITEM.match(item)
        if not item or m is None:
            raise ValueError(f"concept_params {where}: cannot read {item!r}; write {_FORMS}")
        key, value = m.group("key"), float(m.group("value"))
        if key is None:
            positional.append(value)
            continue
        field = _KEYS.get(key.lower())
        if field is None:
            raise ValueError(f"concept_params {where}: unknown key {key!r}; allowed: {', '.join(_KEYS)}")
        if field in values:
            raise ValueError(f"concept_params {where}: {field} is given twice")
        values[field] = value
    rule = "top_n" if selection == "top_n" else "percentile"
    free = [s for s in ("gamma", rule) if s not in values]  # plain numbers fill these, in this order
    if rule == "top_n" and "percentile" in values or rule == "percentile" and "top_n" in values:
        free = [s for s in free if s == "gamma"]  # the rule was given by key: a plain number can only be gamma
    if len(positional) > len(free):
        raise ValueError(f"concept_params {where}: {len(positional)} plain number(s) but only {free or 'nothing'} "
                         f"left to set; write {_FORMS}")
    values.update(zip(free, positional))
    if not values:
        raise ValueError(f"concept_params {where}: no value for '{name}'; write {_FORMS}")
    return _checked(where, name, values.get("gamma"), values.get("top_n"), values.get("percentile"))


def _from_mapping(params: Mapping) -> list[ConceptParams]:
    out = []
    for name, entry in params.items():
        where = f"entry {name!r}"
        if isinstance(entry, Mapping):
            unknown = [k for k in entry if str(k).lower() not in _KEYS]
            if unknown:
                raise ValueError(f"concept_params {where}: unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
            fields = {_KEYS[str(k).lower()]: v for k, v in entry.items()}
            if len(fields) < len(entry):
                raise ValueError(f"concept_params {where}: gamma is given twice (gamma and multiplier)")
            out.append(_checked(where, str(name).strip(), fields.get("gamma"), fields.get("top_n"),
                                fields.get("percentile")))
        else:
            out.append(_checked(where, str(name).strip(), entry, None, None))
    return out


def parse_concept_params(params: Any, selection: str = "top_n") -> tuple[ConceptParams, ...]:
    """Per-concept parameters from text lines, a mapping, or already parsed :class:`ConceptParams`.

    ``selection`` is the block's rule (``"top_n"`` or ``"percentile"``): it says what a bare second
    number on a text line is. A concept named twice is an error.
    """
    if params is None or (isinstance(params, str) and not params.strip()):
        return ()
    if isinstance(params, str):
        entries = []
        for number, raw in enumerate(params.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if line:
                entries.append(_parse_line(line, number, selection))
    elif isinstance(params, Mapping):
        entries = _from_mapping(params)
    elif isinstance(params, (list, tuple)) and all(isinstance(p, ConceptParams) for p in params):
        entries = [_checked(f"entry {p.name!r}", p.name, p.gamma, p.top_n, p.percentile) for p in params]
    else:
        raise ValueError(f"concept_params: expected text lines or a mapping concept -> parameters, got "
                         f"{type(params).__name__}")
    seen: set[str] = set()
    for p in entries:
        if p.name in seen:
            raise ValueError(f"concept_params: concept '{p.name}' is given twice")
        seen.add(p.name)
    return tuple(entries)


def format_concept_params(params: tuple[ConceptParams, ...]) -> str:
    """The text form of ``params`` (keys written out), which :func:`parse_concept_params` reads back."""
    lines = []
    for p in params:
        items = [] if p.gamma is None else [f"gamma={p.gamma!r}"]
        if p.top_n is not None:
            items.append(f"top_n={p.top_n}")
        if p.percentile is not None:
            items.append(f"percentile={p.percentile!r}")
        lines.append(f"{p.name}: {', '.join(items)}")
    return "\n".join(lines)
