"""Driving a sampler to collect a block's activations (for SAE training) or SAeUron's concept
statistics (for feature selection).

Generation is the caller's: ``sample_fn(prompts)`` runs one complete sampling of a batch of
prompts. While it runs, a forward hook on ``block`` (a dotted path under ``root_module``) sees
every evaluation of that block and asks ``state()`` where the sampler is. ``state()`` returns an
object or mapping with

* ``step_index`` (int), or ``timestep`` / ``sigma`` (mapped to a step index through
  ``schedule`` with :func:`~sae_core.saeuron.intervention.step_index_from_timestep`);
* ``timestep`` or ``sigma`` (recorded with each row when present);
* ``cond_mask``: ``[B]`` bool, True for conditional (prompted) rows of the CFG batch, or
  ``None`` when every row is conditional (no CFG).

The step index therefore always comes from the sampler, never from counting calls. Within the
rows of one kind (conditional or unconditional) the batch elements are assumed to follow the
prompt order of the ``sample_fn`` call, which is how CFG batches are built (``[uncond; cond]``
or the reverse).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..capture import capture, to_tokens
from .intervention import step_index_from_timestep
from .stats import ConceptStats, ConceptStatsBuilder, encode_topk_fp32, sae_fingerprint

__all__ = [
    "COLLECT_COLUMNS",
    "SamplerPosition",
    "collect_block_activations",
    "concept_stats_from_store",
    "gather_concept_stats",
    "read_sampler_state",
]

COLLECT_COLUMNS = ("step", "timestep", "cond", "prompt_index", "position")
"""Metadata columns :func:`collect_block_activations` can fill (a writer may use any subset)."""


class SamplerPosition:
    """Where the sampler is, as read from ``state()``."""

    __slots__ = ("step_index", "timestep", "cond_mask")

    def __init__(self, step_index: int, timestep: float, cond_mask: Tensor | None) -> None:
        self.step_index = step_index
        self.timestep = timestep
        self.cond_mask = cond_mask


def _get(info: Any, name: str) -> Any:
    if isinstance(info, Mapping):
        return info.get(name)
    return getattr(info, name, None)


def read_sampler_state(info: Any, batch: int, schedule: Sequence[float] | Tensor | None = None) -> SamplerPosition:
    """Interpret one ``state()`` answer for a block call with ``batch`` rows (see module docstring)."""
    if info is None:
        raise ValueError("the sampler state is None: is the hook running outside of sampling?")
    t = _get(info, "timestep")
    if t is None:
        t = _get(info, "sigma")
    if isinstance(t, Tensor):
        t = float(t.reshape(-1)[0])
    step = _get(info, "step_index")
    if step is None:
        if t is None or schedule is None:
            raise ValueError("the sampler state gives no step_index, and no timestep + schedule to derive it")
        step = step_index_from_timestep(t, schedule)
    mask = _get(info, "cond_mask")
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).cpu()
        if mask.shape[0] != batch:
            raise ValueError(f"the sampler's cond_mask has {mask.shape[0]} entries for a block batch of {batch}")
    return SamplerPosition(int(step), float("nan") if t is None else float(t), mask)


def _prompt_index(mask: Tensor | None, batch: int, offset: int) -> tuple[Tensor, Tensor]:
    """Per element: cond flag (int64) and prompt index (rank among rows of the same kind + offset)."""
    if mask is None:
        mask = torch.ones(batch, dtype=torch.bool)
    cond = mask.to(torch.int64)
    rank = torch.empty(batch, dtype=torch.int64)
    for flag in (True, False):
        sel = (mask == flag).nonzero().flatten()
        rank[sel] = torch.arange(sel.numel())
    return cond, rank + offset


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    if size <= 0:
        raise ValueError(f"batch_size must be positive, got {size}")
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def collect_block_activations(
    sample_fn: Callable[[list[str]], Any],
    root_module: nn.Module,
    block: str,
    prompts: Sequence[str],
    steps: int,
    writer: Any,
    cond_only: bool = True,
    *,
    state: Callable[[], Any],
    schedule: Sequence[float] | Tensor | None = None,
    batch_size: int = 16,
    progress: bool = True,
    which: str = "output",
) -> int:
    """Run ``sample_fn`` over ``prompts`` in batches and stream ``block``'s output tokens to ``writer``.

    Args:
        sample_fn: ``sample_fn(prompt_batch)`` samples the batch (all ``steps`` steps).
        root_module: the denoiser holding ``block``.
        block: dotted path of the hooked module (e.g. ``output_blocks.4.1``).
        prompts: all prompts; ``prompt_index`` refers to positions in this list.
        steps: number of sampling steps (step indices must lie in ``0..steps-1``).
        writer: an :class:`~sae_core.store.ActivationWriter` whose metadata columns are a subset of
            :data:`COLLECT_COLUMNS` (``add(rows, **columns)``).
        cond_only: keep only the conditional CFG rows (SAeUron trains on those).
        state: the sampler's position during a block call (see the module docstring).
        schedule: per-step timesteps/sigmas, needed only when ``state()`` has no ``step_index``.
        batch_size: prompts per ``sample_fn`` call.
        progress: show a tqdm bar over batches.
        which: ``"output"`` (the block's output, SAeUron's default) or ``"diff"`` (its update,
            output minus input); see :func:`sae_core.capture.capture`.

    Returns:
        The number of rows written.
    """
    columns = tuple(getattr(writer, "columns", COLLECT_COLUMNS))
    unknown = [c for c in columns if c not in COLLECT_COLUMNS]
    if unknown:
        raise ValueError(f"collect_block_activations fills the columns {COLLECT_COLUMNS}; "
                         f"the writer also wants {unknown}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("collect_block_activations: the prompt list is empty")
    written = 0
    offset = 0

    def on_output(t: Tensor) -> None:
        nonlocal written
        if t.dim() not in (3, 4):
            raise ValueError(f"'{block}' output has shape {tuple(t.shape)}; expected [B, C, H, W] or [B, P, d]")
        b = t.shape[0]
        pos = read_sampler_state(state(), b, schedule)
        if not 0 <= pos.step_index < steps:
            raise ValueError(f"the sampler reports step {pos.step_index}, outside 0..{steps - 1}")
        cond, pidx = _prompt_index(pos.cond_mask, b, offset)
        keep = torch.ones(b, dtype=torch.bool) if not cond_only else cond.bool()
        if not bool(keep.any()):
            return
        rows_of = keep.nonzero().flatten()
        part = t.index_select(0, rows_of.to(t.device))
        tok = to_tokens(part, return_index=True)
        element = rows_of[tok.batch_index]
        meta = {
            "step": torch.full((element.numel(),), pos.step_index, dtype=torch.int64),
            "timestep": torch.full((element.numel(),), pos.timestep, dtype=torch.float32),
            "cond": cond[element],
            "prompt_index": pidx[element],
            "position": tok.position,
        }
        writer.add(tok.rows, **{c: meta[c] for c in columns})
        written += tok.rows.shape[0]

    spans = _batches(len(prompts), batch_size)
    with capture(root_module, block, which, fn=on_output, copy=False):
        for lo, hi in tqdm(spans, desc=f"collect {block}", disable=not progress):
            offset = lo
            sample_fn(prompts[lo:hi])
    return written


@torch.no_grad()
def gather_concept_stats(
    sample_fn: Callable[[list[str]], Any],
    root_module: nn.Module,
    block: str,
    sae: Any,
    concept_prompts: Mapping[str, Sequence[str]],
    steps: int,
    *,
    state: Callable[[], Any],
    schedule: Sequence[float] | Tensor | None = None,
    schedule_kind: str = "timestep",
    cond_only: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    attrs: dict[str, Any] | None = None,
    which: str = "output",
) -> ConceptStats:
    """SAeUron's concept statistics: sample every concept's prompts and average the SAE codes.

    For each concept, each of its prompts and each step index, the block output (conditional
    rows only by default, as the reference) is encoded with per-token TopK (float32), averaged
    over spatial positions, and accumulated into the concept's running mean
    (:class:`ConceptStatsBuilder`). Prompts of different concepts may share a ``sample_fn`` batch.
    ``which="diff"`` encodes the block's update (output minus input) instead, for an SAE trained on
    updates; the statistics then record ``attrs["source"] = "diff"`` (``"output"`` otherwise).

    Returns:
        :class:`ConceptStats` with the schedule seen during sampling, ``hookpoint=block`` and the
        SAE's fingerprint.
    """
    if which not in ("output", "diff"):
        raise ValueError(f"gather_concept_stats: which must be 'output' or 'diff', got {which!r}")
    names = list(concept_prompts)
    if len(names) < 2:
        raise ValueError("gather_concept_stats needs at least two concepts (the score contrasts them)")
    flat: list[tuple[str, int]] = []
    for ci, name in enumerate(names):
        ps = list(concept_prompts[name])
        if not ps:
            raise ValueError(f"gather_concept_stats: concept {name!r} has no prompts")
        flat.extend((p, ci) for p in ps)
    builder = ConceptStatsBuilder(names, steps, sae.cfg.num_latents, device=sae.W_dec.device)
    labels = torch.tensor([c for _, c in flat], dtype=torch.int64)
    offset = 0
    span = 0

    def on_output(t: Tensor) -> None:
        b = t.shape[0]
        pos = read_sampler_state(state(), b, schedule)
        if not 0 <= pos.step_index < steps:
            raise ValueError(f"the sampler reports step {pos.step_index}, outside 0..{steps - 1}")
        cond, pidx = _prompt_index(pos.cond_mask, b, offset)
        keep = cond.bool() if cond_only else torch.ones(b, dtype=torch.bool)
        rows_of = keep.nonzero().flatten()
        if rows_of.numel() == 0:
            return
        if bool((pidx[rows_of] >= offset + span).any()):
            raise ValueError(f"'{block}' saw more rows of one kind than prompts in the batch ({span})")
        part = t.index_select(0, rows_of.to(t.device)).to(sae.W_dec.device)
        builder.add_block_output(labels[pidx[rows_of]], pos.step_index, part, sae,
                                 timestep=None if pos.timestep != pos.timestep else pos.timestep)

    spans = _batches(len(flat), batch_size)
    with capture(root_module, block, which, fn=on_output, copy=False):
        for lo, hi in tqdm(spans, desc=f"concept stats {block}", disable=not progress):
            offset, span = lo, hi - lo
            sample_fn([p for p, _ in flat[lo:hi]])
    return builder.finalize(schedule_kind=schedule_kind, hookpoint=block, sae_fingerprint=sae_fingerprint(sae),
                            attrs={**(attrs or {}), "source": which})


@torch.no_grad()
def concept_stats_from_store(
    reader: Any,
    sae: Any,
    concepts: Sequence[str],
    prompt_concepts: Sequence[int] | Tensor,
    num_steps: int,
    tokens_per_image: int,
    *,
    schedule: Sequence[float] | Tensor | None = None,
    schedule_kind: str = "timestep",
    batch_size: int = 16384,
    progress: bool = True,
    attrs: dict[str, Any] | None = None,
) -> ConceptStats:
    """Concept statistics from activations already collected by :func:`collect_block_activations`.

    Saves a second sampling pass when the SAE's training activations cover the concept prompts.
    Rows are streamed from ``reader`` (an :class:`~sae_core.store.ActivationReader` with the
    ``step``, ``prompt_index`` and ``position`` columns; ``cond`` too if present, and then only
    conditional rows count) in any order.

    Args:
        concepts: concept names.
        prompt_concepts: for every ``prompt_index`` of the store, the concept it belongs to, or
            ``-1`` to leave that prompt out.
        num_steps: step indices in the store (``0..num_steps-1``).
        tokens_per_image: spatial positions per image (``H * W`` of the block output).
        schedule: per-step timestep/sigma of the collection run (recorded in the statistics).
    """
    needed = ("step", "prompt_index", "position")
    missing = [c for c in needed if c not in reader.columns]
    if missing:
        raise ValueError(f"activation store {getattr(reader, 'folder', '')} lacks the columns {missing}")
    cols = needed + (("cond",) if "cond" in reader.columns else ())
    lookup = torch.as_tensor(prompt_concepts, dtype=torch.int64).reshape(-1)
    builder = ConceptStatsBuilder(concepts, num_steps, sae.cfg.num_latents, device=sae.W_dec.device)
    dev = sae.W_dec.device
    total = (len(reader) + batch_size - 1) // batch_size
    for batch in tqdm(reader.iter_batches(batch_size, shuffle=False, columns=cols), total=total,
                      desc="concept stats", disable=not progress):
        meta = batch.meta
        pidx = meta["prompt_index"].to(torch.int64)
        if int(pidx.max()) >= lookup.numel():
            raise ValueError(f"the store has prompt_index {int(pidx.max())} but prompt_concepts covers "
                             f"{lookup.numel()} prompts")
        concept_rows = lookup[pidx]
        if "cond" in meta:
            concept_rows = torch.where(meta["cond"] == 1, concept_rows, torch.full_like(concept_rows, -1))
        keep = concept_rows >= 0
        if not bool(keep.any()):
            continue
        acts, idx = encode_topk_fp32(sae, batch.activations[keep].to(dev))
        builder.add_token_codes(concept_rows[keep], meta["step"][keep], acts, idx, tokens_per_image,
                                meta["position"][keep] == 0)
    if schedule is not None:
        for i, t in enumerate(torch.as_tensor(schedule, dtype=torch.float64).reshape(-1).tolist()):
            builder.schedule[i] = t
    return builder.finalize(schedule_kind=schedule_kind, hookpoint=getattr(reader, "attrs", {}).get("hookpoint"),
                            sae_fingerprint=sae_fingerprint(sae), attrs=attrs)
