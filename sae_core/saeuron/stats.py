"""Per-concept, per-step SAE latent statistics for SAeUron.

For every concept ``c`` and sampling step index ``t`` SAeUron needs one vector over the SAE's
latents: the mean, over the concept's prompts, of the *spatially averaged* sparse code at the
hooked block (zeros of unselected latents included)::

    a[c, p, t] = (1 / P) * sum_positions z(position)        # [num_latents], P = tokens per image
    M[c, t]    = mean_p a[c, p, t]

:class:`ConceptStatsBuilder` accumulates ``M`` in a streaming way (running sums and prompt
counts per ``(concept, step)`` cell; no per-prompt tensor is ever kept) and
:class:`ConceptStats` holds the result together with what it was measured on (concept names,
the sampling schedule, the hook point and a fingerprint of the SAE). Files are one
``.safetensors`` with the tensors and a JSON description in its header metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..artefacts import ArtefactError, load_tensors, read_metadata, sae_fingerprint, sae_fingerprint_hint, save_tensors
from ..capture import to_tokens
from ..sae import per_token_topk

__all__ = [
    "STATS_FORMAT",
    "ConceptStats",
    "ConceptStatsBuilder",
    "sae_fingerprint",
    "encode_topk_fp32",
]

STATS_FORMAT = "sae_core.saeuron.concept_stats"
STATS_FORMAT_VERSION = 1
_META_KEY = "concept_stats"


def encode_topk_fp32(sae: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token TopK code of ``tokens [N, d]`` computed in float32, whatever the SAE's dtype.

    ``pre = ReLU(W_enc (x - b_dec) + b_enc)``, then the ``k`` largest per token. Returns
    ``(top_acts [N, k] float32, top_indices [N, k] int64)``.
    """
    if tokens.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"SAE expects activations of width d_in={sae.cfg.d_in} (hookpoint={sae.cfg.hookpoint!r}), "
            f"got width {tokens.shape[-1]}"
        )
    dev = tokens.device
    w = sae.encoder.weight.detach().to(device=dev, dtype=torch.float32)
    b = sae.encoder.bias.detach().to(device=dev, dtype=torch.float32)
    b_dec = sae.b_dec.detach().to(device=dev, dtype=torch.float32)
    pre = F.relu(F.linear(tokens.float() - b_dec, w, b))
    acts, idx = per_token_topk(pre, sae.cfg.k)
    return acts, idx


class ConceptStats:
    """Mean spatially averaged SAE code per concept and step index.

    Attributes:
        concepts: concept names, in the order of the first axis.
        means: ``[C, T, num_latents]`` float32, ``M[c, t]`` of the module docstring.
        counts: ``[C, T]`` int64, how many prompts each mean averages.
        schedule: ``[T]`` float32 or ``None``: the timestep (or sigma) the sampler used at each
            step index when the statistics were gathered, from noisiest to cleanest. Used to map
            other samplers' timesteps onto these step indices.
        schedule_kind: ``"timestep"`` or ``"sigma"`` (what ``schedule`` holds).
        hookpoint: the block the statistics were measured at (e.g. ``output_blocks.5.1``).
        sae_fingerprint: :func:`sae_fingerprint` of the SAE used to encode.
        attrs: further JSON-serialisable information (prompt templates, CFG scale, ...).
    """

    def __init__(
        self,
        concepts: Sequence[str],
        means: Tensor,
        counts: Tensor | None = None,
        *,
        schedule: Tensor | Sequence[float] | None = None,
        schedule_kind: str = "timestep",
        hookpoint: str | None = None,
        sae_fingerprint: str | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        concepts = [str(c) for c in concepts]
        if len(concepts) == 0:
            raise ValueError("ConceptStats: the concept list is empty")
        if len(set(concepts)) != len(concepts):
            raise ValueError(f"ConceptStats: concept names must be unique, got {concepts}")
        if means.dim() != 3 or means.shape[0] != len(concepts):
            raise ValueError(
                f"ConceptStats: means must be [C={len(concepts)}, steps, latents], got {tuple(means.shape)}"
            )
        if not torch.isfinite(means).all():
            raise ValueError("ConceptStats: means contain NaN or inf")
        c, t, _ = means.shape
        if counts is None:
            counts = torch.ones(c, t, dtype=torch.int64)
        if tuple(counts.shape) != (c, t):
            raise ValueError(f"ConceptStats: counts must be [{c}, {t}], got {tuple(counts.shape)}")
        if schedule is not None:
            schedule = torch.as_tensor(schedule, dtype=torch.float32).reshape(-1).cpu()
            if schedule.shape[0] != t:
                raise ValueError(f"ConceptStats: schedule has {schedule.shape[0]} entries for {t} steps")
            if not bool(torch.isfinite(schedule).all()):
                raise ValueError("ConceptStats: the step schedule holds NaN or inf")
        if schedule_kind not in ("timestep", "sigma"):
            raise ValueError(f"ConceptStats: schedule_kind must be 'timestep' or 'sigma', got {schedule_kind!r}")
        self.concepts = concepts
        self.means = means.detach().to(device="cpu", dtype=torch.float32)
        self.counts = counts.detach().to(device="cpu", dtype=torch.int64)
        self.schedule = schedule
        self.schedule_kind = schedule_kind
        self.hookpoint = hookpoint
        self.sae_fingerprint = sae_fingerprint
        self.attrs = dict(attrs or {})

    # -- shape ------------------------------------------------------------------------------------
    @property
    def num_concepts(self) -> int:
        return self.means.shape[0]

    @property
    def num_steps(self) -> int:
        return self.means.shape[1]

    @property
    def num_latents(self) -> int:
        return self.means.shape[2]

    def __repr__(self) -> str:
        return (f"ConceptStats(concepts={self.concepts}, steps={self.num_steps}, latents={self.num_latents}, "
                f"hookpoint={self.hookpoint!r}, sae={self.sae_fingerprint!r})")

    def index(self, concept: str) -> int:
        """Position of ``concept`` in :attr:`concepts` (clear error listing them when unknown)."""
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise ValueError(
                f"unknown concept {concept!r}; these statistics hold {self.concepts}"
            ) from None

    # -- the quantities of SAeUron's selection rule -------------------------------------------------
    def mu(self, concept: str) -> Tensor:
        """``mu_c [T, n]``: the concept's mean code per step."""
        return self.means[self.index(concept)]

    def mu_all(self) -> Tensor:
        """``mu_all [T, n]``: the unweighted mean over all concepts (the target included)."""
        return self.means.mean(dim=0)

    def mu_not(self, concept: str) -> Tensor:
        """``mu_notc [T, n]``: the mean over all prompts of every *other* concept.

        Weighted by each concept's prompt count per step, which is exactly the mean over the
        pooled prompts; with equal counts it is the plain mean of the other concepts' means.
        """
        c = self.index(concept)
        if self.num_concepts < 2:
            raise ValueError("SAeUron's score needs statistics for at least two concepts")
        others = [i for i in range(self.num_concepts) if i != c]
        w = self.counts[others].to(torch.float32)  # [C-1, T]
        total = w.sum(0).clamp_min(1.0)
        return (self.means[others] * w[..., None]).sum(0) / total[:, None]

    def check_sae(self, sae: Any) -> None:
        """Raise ValueError when ``sae`` is not the SAE these statistics were measured with."""
        if sae.cfg.num_latents != self.num_latents:
            raise ValueError(
                f"the SAE has {sae.cfg.num_latents} latents but the concept statistics have {self.num_latents}"
            )
        if self.sae_fingerprint is not None:
            fp = sae_fingerprint(sae)
            if fp != self.sae_fingerprint:
                raise ValueError(
                    f"the concept statistics were gathered with SAE {self.sae_fingerprint}, "
                    f"not with this SAE ({fp}); gather them again for this SAE{sae_fingerprint_hint(sae)}"
                )

    # -- files ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": STATS_FORMAT_VERSION,
            "concepts": self.concepts,
            "num_steps": self.num_steps,
            "num_latents": self.num_latents,
            "schedule_kind": self.schedule_kind,
            "hookpoint": self.hookpoint,
            "sae_fingerprint": self.sae_fingerprint,
            "attrs": self.attrs,
        }

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write one ``.safetensors`` file (tensors ``means``, ``counts``, ``schedule``) whose header
        metadata holds the JSON description under ``concept_stats``. Atomic (temp + rename).

        ``dtype=torch.float16`` halves the file; the means are read back as float32.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"concept statistics are saved as .safetensors, got {path}")
        tensors = {"means": self.means.to(dtype), "counts": self.counts}
        if self.schedule is not None:
            tensors["schedule"] = self.schedule
        save_tensors(path, tensors, {_META_KEY: json.dumps(self.to_json())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptStats":
        """Read a file written by :meth:`save` (clear errors for a missing or foreign file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"concept statistics file not found: {path}")
        tensors = load_tensors(path, what="concept statistics file")
        header = read_metadata(path, what="concept statistics file")
        if _META_KEY not in header:
            raise ArtefactError(path, f"no '{_META_KEY}' metadata; not a concept statistics file")
        try:
            info = json.loads(header[_META_KEY])
            if not isinstance(info, dict):
                raise ValueError("the description is not a JSON object")
            if info.get("format") != STATS_FORMAT:
                raise ValueError(f"unknown format {info.get('format')!r}, expected {STATS_FORMAT!r}")
            for key in ("means", "counts"):
                if key not in tensors:
                    raise ValueError(f"missing tensor {key!r}")
            means = tensors["means"].float()
            if list(means.shape) != [len(info["concepts"]), info["num_steps"], info["num_latents"]]:
                raise ValueError(f"means have shape {tuple(means.shape)}, which does not match its description")
            return cls(
                info["concepts"], means, tensors["counts"],
                schedule=tensors.get("schedule"), schedule_kind=info.get("schedule_kind", "timestep"),
                hookpoint=info.get("hookpoint"), sae_fingerprint=info.get("sae_fingerprint"),
                attrs=info.get("attrs") or {},
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            if isinstance(exc, ArtefactError):
                raise
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ArtefactError(path, f"malformed concept statistics: {what}") from exc


class ConceptStatsBuilder:
    """Streaming accumulator of :class:`ConceptStats`.

    Holds one running sum ``[C, T, n]`` (float64 when ``exact=True``, else float32) and a prompt
    count per ``(concept, step)``; every call adds the spatially averaged codes of a batch of
    images at one step. Nothing per prompt is kept.

    Args:
        concepts: concept names.
        num_steps: number of step indices of the sampling schedule.
        num_latents: SAE width.
        device: where the running sums live (use the SAE's device for speed).
        exact: accumulate in float64 (default; the sums are small for MiniCanvas-sized SAEs).
            Use ``False`` for SD-sized SAEs with many concepts to halve memory.
    """

    def __init__(self, concepts: Sequence[str], num_steps: int, num_latents: int,
                 device: torch.device | str = "cpu", exact: bool = True) -> None:
        self.concepts = [str(c) for c in concepts]
        if not self.concepts:
            raise ValueError("ConceptStatsBuilder: the concept list is empty")
        if num_steps <= 0 or num_latents <= 0:
            raise ValueError(f"ConceptStatsBuilder: num_steps and num_latents must be positive, "
                             f"got {num_steps}, {num_latents}")
        self.num_steps = int(num_steps)
        self.num_latents = int(num_latents)
        dtype = torch.float64 if exact else torch.float32
        self.sums = torch.zeros(len(self.concepts), self.num_steps, self.num_latents, dtype=dtype, device=device)
        self.counts = torch.zeros(len(self.concepts), self.num_steps, dtype=torch.int64, device=device)
        self.schedule: list[float | None] = [None] * self.num_steps

    def _concept_rows(self, concept: str | int | Sequence[str | int] | Tensor, batch: int) -> Tensor:
        def one(c: str | int) -> int:
            if isinstance(c, str):
                if c not in self.concepts:
                    raise ValueError(f"unknown concept {c!r}; the builder holds {self.concepts}")
                return self.concepts.index(c)
            c = int(c)
            if not 0 <= c < len(self.concepts):
                raise ValueError(f"concept index {c} out of range 0..{len(self.concepts) - 1}")
            return c

        if isinstance(concept, (str, int)):
            return torch.full((batch,), one(concept), dtype=torch.int64)
        if isinstance(concept, Tensor):
            rows = concept.to(torch.int64).reshape(-1).cpu()
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self.concepts)):
                raise ValueError(f"concept indices must lie in 0..{len(self.concepts) - 1}, got {rows.tolist()}")
        else:
            rows = torch.tensor([one(c) for c in concept], dtype=torch.int64)
        if rows.shape[0] != batch:
            raise ValueError(f"got {rows.shape[0]} concept labels for a batch of {batch} images")
        return rows

    def _check_step(self, step_index: int, timestep: float | None) -> int:
        step_index = int(step_index)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step index {step_index} out of range 0..{self.num_steps - 1}")
        if timestep is not None:
            self.schedule[step_index] = float(timestep)
        return step_index

    @torch.no_grad()
    def add_codes(self, concept: str | int | Sequence[str | int] | Tensor, step_index: int,
                  top_acts: Tensor, top_indices: Tensor, timestep: float | None = None) -> None:
        """Add a batch of sparse codes ``[B, P, k]`` (``P`` spatial positions per image).

        Each image contributes ``(1/P) * sum_positions z`` to its concept's sum at ``step_index``.
        ``concept`` is one name/index for the whole batch or one per image.
        """
        if top_acts.shape != top_indices.shape or top_acts.dim() != 3:
            raise ValueError(f"add_codes expects matching [B, P, k] tensors, got {tuple(top_acts.shape)} "
                             f"and {tuple(top_indices.shape)}")
        step = self._check_step(step_index, timestep)
        b, p, k = top_acts.shape
        rows = self._concept_rows(concept, b).to(self.sums.device)
        cell = rows * self.num_steps + step  # [B]
        flat = (cell[:, None, None] * self.num_latents + top_indices.to(self.sums.device)).reshape(-1)
        vals = (top_acts.to(device=self.sums.device, dtype=self.sums.dtype) / p).reshape(-1)
        self.sums.view(-1).index_add_(0, flat, vals)
        self.counts.view(-1).index_add_(0, cell, torch.ones_like(cell))

    @torch.no_grad()
    def add_token_codes(self, concept_rows: Tensor, step_rows: Tensor, top_acts: Tensor, top_indices: Tensor,
                        tokens_per_image: int, first_token: Tensor) -> None:
        """Add token rows in any order (e.g. streamed from an activation store).

        Args:
            concept_rows: ``[N]`` concept index of each row; rows with ``-1`` are skipped.
            step_rows: ``[N]`` step index of each row.
            top_acts, top_indices: ``[N, k]`` per-token codes.
            tokens_per_image: ``P``, spatial positions per image (each row adds ``z / P``).
            first_token: ``[N]`` bool, True on exactly one row per image (e.g. position 0);
                those rows count the image's prompt.
        """
        if top_acts.shape != top_indices.shape or top_acts.dim() != 2:
            raise ValueError(f"add_token_codes expects matching [N, k] codes, got {tuple(top_acts.shape)}")
        dev = self.sums.device
        concept_rows = concept_rows.to(device=dev, dtype=torch.int64).reshape(-1)
        step_rows = step_rows.to(device=dev, dtype=torch.int64).reshape(-1)
        first_token = first_token.to(device=dev, dtype=torch.bool).reshape(-1)
        n = top_acts.shape[0]
        if not (concept_rows.shape[0] == step_rows.shape[0] == first_token.shape[0] == n):
            raise ValueError("add_token_codes: concept_rows, step_rows, first_token and the codes need one entry per row")
        if n and (int(step_rows.min()) < 0 or int(step_rows.max()) >= self.num_steps):
            raise ValueError(f"add_token_codes: step indices must lie in 0..{self.num_steps - 1}")
        if n and int(concept_rows.max()) >= len(self.concepts):
            raise ValueError(f"add_token_codes: concept indices must lie in -1..{len(self.concepts) - 1}")
        keep = concept_rows >= 0
        cell = (concept_rows * self.num_steps + step_rows)[keep]
        flat = (cell[:, None] * self.num_latents + top_indices.to(dev)[keep]).reshape(-1)
        vals = (top_acts.to(device=dev, dtype=self.sums.dtype)[keep] / tokens_per_image).reshape(-1)
        self.sums.view(-1).index_add_(0, flat, vals)
        firsts = cell[first_token[keep]]
        self.counts.view(-1).index_add_(0, firsts, torch.ones_like(firsts))

    @torch.no_grad()
    def add_mean_codes(self, concept: str | int | Sequence[str | int] | Tensor, step_index: int,
                       mean_codes: Tensor, timestep: float | None = None) -> None:
        """Add already spatially averaged dense codes ``[B, n]`` (one row per image)."""
        if mean_codes.dim() != 2 or mean_codes.shape[1] != self.num_latents:
            raise ValueError(f"add_mean_codes expects [B, {self.num_latents}], got {tuple(mean_codes.shape)}")
        step = self._check_step(step_index, timestep)
        rows = self._concept_rows(concept, mean_codes.shape[0]).to(self.sums.device)
        cell = rows * self.num_steps + step
        self.sums.view(-1, self.num_latents).index_add_(0, cell, mean_codes.to(self.sums))
        self.counts.view(-1).index_add_(0, cell, torch.ones_like(cell))

    @torch.no_grad()
    def add_block_output(self, concept: str | int | Sequence[str | int] | Tensor, step_index: int,
                         block_output: Tensor, sae: Any, timestep: float | None = None) -> None:
        """Encode a block output ``[B, C, H, W]`` (or ``[B, P, d]``) with ``sae`` and add it."""
        if block_output.dim() not in (3, 4):
            raise ValueError(f"block output must be [B, C, H, W] or [B, P, d], got {tuple(block_output.shape)}")
        b = block_output.shape[0]
        tokens = to_tokens(block_output)
        acts, idx = encode_topk_fp32(sae, tokens)
        self.add_codes(concept, step_index, acts.reshape(b, -1, acts.shape[-1]),
                       idx.reshape(b, -1, idx.shape[-1]), timestep)

    def finalize(self, *, schedule_kind: str = "timestep", hookpoint: str | None = None,
                 sae_fingerprint: str | None = None, attrs: dict[str, Any] | None = None) -> ConceptStats:
        """The means so far. Every ``(concept, step)`` cell must have at least one prompt."""
        empty = (self.counts == 0).nonzero().tolist()
        if empty:
            shown = ", ".join(f"({self.concepts[c]!r}, step {t})" for c, t in empty[:8])
            raise ValueError(f"no prompts were added for {len(empty)} (concept, step) cells: {shown}"
                             + (", ..." if len(empty) > 8 else ""))
        means = (self.sums / self.counts[..., None].to(self.sums.dtype)).to(torch.float32)
        schedule = None if any(s is None for s in self.schedule) else self.schedule
        return ConceptStats(self.concepts, means.cpu(), self.counts.cpu(), schedule=schedule,
                            schedule_kind=schedule_kind, hookpoint=hookpoint,
                            sae_fingerprint=sae_fingerprint, attrs=attrs)
