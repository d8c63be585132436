"""The one shape of a long, resumable loop (LoRA training steps, Fisher samples).

Both loops of Selective Amnesia work the same way:

1. **Decide** what to do with the file at the checkpoint path (:func:`decide_checkpoint`, the
   project's artefact policy :func:`sae_core.artefacts.decide_artefact`): nothing there ->
   *create*; the same run, finished -> *reuse*; the same run, unfinished -> *resume*; another
   run -> refused (``FileExistsError`` naming what differs), or *redo* where the caller's policy
   says so.
2. **Run** the remaining units (:func:`run_units`): ``should_stop`` is polled before every unit;
   a checkpoint is written every ``save_every`` units (0: only at the end), when stopped and at the
   end; a tqdm bar and a ``callback`` report progress.
3. Return how far it got and whether it was stopped; a stopped run is continued by calling again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Optional, TypeVar, Union

from ..artefacts import OVERWRITE_REMEDY, Action, ArtefactDecision, decide_artefact

__all__ = ["LoopEnd", "decide_checkpoint", "run_units"]

T = TypeVar("T")
R = TypeVar("R")


class LoopEnd(NamedTuple):
    """How a loop ended."""

    done: int
    """Units done in total (including those of a resumed checkpoint)."""
    stopped: bool
    """True when ``should_stop`` ended the loop early."""


def decide_checkpoint(what: str, path: Union[str, os.PathLike], wanted: Mapping[str, Any],
                      found: Optional[Mapping[str, Any]], *, complete: bool,
                      redo_different: bool = False, remedy: str = OVERWRITE_REMEDY) -> ArtefactDecision:
    """Create, reuse, resume or redo the checkpoint of a resumable loop.

    Args:
        wanted: identity of the run the caller is about to do (JSON-comparable values).
        found: identity recorded in the file at ``path`` (None: nothing there).
        complete: whether the file there holds a finished run.
        redo_different: when the file comes from another run, compute again instead of refusing.
        remedy: what a refusal advises (see :func:`sae_core.artefacts.decide_artefact`).
    """
    try:
        return decide_artefact(what, path, wanted, found, complete=complete, resumable=True, remedy=remedy)
    except FileExistsError as err:
        if not redo_different:
            raise
        return ArtefactDecision(Action.REDO, f"{what}: {err}; computing it again")


def run_units(
    units: Iterable[T],
    run: Callable[[T], R],
    *,
    done: int,
    total: Optional[int],
    save: Optional[Callable[[], None]] = None,
    saved: Callable[[], bool] = lambda: True,
    save_every: int = 0,
    should_stop: Optional[Callable[[], bool]] = None,
    on_unit: Optional[Callable[[int, R], None]] = None,
    desc: str = "",
    unit: str = "it",
    progress: bool = True,
    leave: bool = False,
    postfix: Optional[Callable[[R], Mapping[str, Any]]] = None,
) -> LoopEnd:
    """Run ``run(u)`` for each remaining unit ``u`` (the loop shape of the module docstring).

    Args:
        units: the units still to do, in order.
        done: units already done (from a resumed checkpoint).
        total: the number of units of the whole run (None: until ``units`` ends).
        save: writes the checkpoint (None: no checkpoint).
        saved: whether the checkpoint file exists (a finished run that was never saved is saved once;
            a run that did nothing writes nothing).
        save_every: units between intermediate saves (0: only when stopped or done).
        on_unit: ``on_unit(done, result)`` after every unit.
        postfix: tqdm postfix of a unit's result.
    """
    from tqdm.auto import tqdm

    last_saved = done
    stopped = False
    initial = done if total is None else min(done, total)
    bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit, disable=not progress, leave=leave)
    it = iter(units)
    try:
        while total is None or done < total:
            try:
                u = next(it)  # nothing is drawn past ``total``
            except StopIteration:
                break
            if should_stop is not None and should_stop():
                stopped = True
                break
            result = run(u)
            done += 1
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(**postfix(result))
            if on_unit is not None:
                on_unit(done, result)
            if save is not None and save_every and done - last_saved >= save_every:
                save()
                last_saved = done
    finally:
        bar.close()
    if save is not None and done > 0 and (done != last_saved or not saved()):
        save()
    return LoopEnd(done, stopped)
