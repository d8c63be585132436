"""Training data of Selective Amnesia: sample sets, how they are drawn, stored and cached.

:class:`SampleSet` holds samples (images or latents in the denoiser's space, ``[N, ...]``) and
the prompt of each. :func:`generate_samples` draws them from the base model through a
caller-provided sampler ``sampler(prompts, seeds) -> [B, ...]`` (row ``i`` for
``(prompts[i], seeds[i])``); :func:`noise_samples` makes uniform-noise surrogates;
:func:`save_samples` / :func:`load_samples` / :func:`cached_samples` store them as safetensors
plus a JSON sidecar (prompts and the settings they were made with).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch

from ..artefacts import load_tensors, save_json, save_tensors

__all__ = [
    "SAMPLES_FORMAT",
    "SampleSet",
    "Sampler",
    "generate_samples",
    "sample_pairs",
    "bank_rows",
    "noise_samples",
    "save_samples",
    "load_samples",
    "cached_samples",
    "normalise",
]

SAMPLES_FORMAT = "sae_core.amnesia.samples"
"""``format`` field of a sample set's JSON sidecar (unchanged since the shipped bank was written)."""

PathLike = Union[str, os.PathLike]
Sampler = Callable[[list[str], list[int]], torch.Tensor]


class SampleSet(NamedTuple):
    """Training samples and the prompt each was generated from."""

    samples: torch.Tensor
    """``[N, ...]`` in the denoiser's input space (pixels in [-1, 1], or scaled latents)."""
    prompts: list[str]
    """``N`` prompts; a replay sample is trained with its own prompt."""

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.samples.shape[0])

    def select(self, index: Sequence[int]) -> "SampleSet":
        """The rows ``index``, in that order."""
        idx = list(index)
        return SampleSet(self.samples[torch.as_tensor(idx, dtype=torch.long)], [self.prompts[i] for i in idx])

    def where(self, keep: Callable[[str], bool]) -> "SampleSet":
        """The rows whose prompt satisfies ``keep``."""
        return self.select([i for i, p in enumerate(self.prompts) if keep(p)])

    @staticmethod
    def concat(sets: Sequence["SampleSet"]) -> "SampleSet":
        """All rows of ``sets``, in order."""
        sets = [s for s in sets if len(s)]
        if not sets:
            raise ValueError("SampleSet.concat: nothing to concatenate")
        return SampleSet(torch.cat([s.samples for s in sets]), [p for s in sets for p in s.prompts])


def generate_samples(
    sampler: Sampler,
    prompts: Sequence[str],
    per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
    callback: Optional[Callable[[int, int], None]] = None,
) -> SampleSet:
    """``per_prompt`` samples of every prompt from the base model, prompt-major.

    Sample ``j`` of prompt ``i`` uses seed ``seed + i * per_prompt + j``, so the set does not
    depend on ``batch_size``. ``sampler(prompts, seeds)`` returns one row per (prompt, seed) pair.

    Raises:
        ValueError: no prompt, a bad count, or a sampler returning the wrong number of rows.
        InterruptedError: ``should_stop()`` became true (nothing is returned half-made).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_samples: the prompt list is empty")
    if per_prompt < 1 or batch_size < 1:
        raise ValueError(f"generate_samples: per_prompt and batch_size must be >= 1, got {per_prompt}, {batch_size}")
    pairs = [(p, int(seed) + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)]
    return sample_pairs(sampler, pairs, batch_size, progress=progress, should_stop=should_stop, callback=callback)


def sample_pairs(
    sampler: Sampler,
    pairs: Sequence[tuple[str, int]],
    batch_size: int = 8,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
    callback: Optional[Callable[[int, int], None]] = None,
) -> SampleSet:
    """One sample per ``(prompt, seed)`` pair, in order, drawn ``batch_size`` pairs per sampler call.

    Raises:
        ValueError: no pair, a bad batch size, or a sampler returning the wrong number of rows.
        InterruptedError: ``should_stop()`` became true (polled before every call; nothing is returned half-made).
    """
    pairs = [(str(p), int(s)) for p, s in pairs]
    if not pairs:
        raise ValueError("sample_pairs: no (prompt, seed) pair was given")
    if batch_size < 1:
        raise ValueError(f"sample_pairs: batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad(), tqdm(total=len(pairs), desc="samples", unit="sample", disable=not progress, leave=False) as bar:
        for b0 in range(0, len(pairs), batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError("sample generation was stopped")
            chunk = pairs[b0 : b0 + batch_size]
            x = sampler([p for p, _ in chunk], [s for _, s in chunk])
            if not isinstance(x, torch.Tensor) or x.shape[0] != len(chunk):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"the sampler returned {got} for {len(chunk)} (prompt, seed) pairs; expected one row each")
            out.append(x.detach().to("cpu", torch.float32).clone())
            bar.update(len(chunk))
            if callback is not None:
                callback(b0 + len(chunk), len(pairs))
    return SampleSet(torch.cat(out), [p for p, _ in pairs])


def bank_rows(bank: SampleSet, prompts: Sequence[str], per_prompt: int, what: str = "prompts") -> SampleSet:
    """The first ``per_prompt`` samples of every prompt in ``bank`` (in the bank's order), prompt-major.

    A sample bank holds a model's samples with their prompts (e.g. several seeds of each prompt); taking
    rows from it instead of sampling again gives every run the same data. ``what`` names the input the
    prompts came from in errors.

    Raises:
        ValueError: a prompt with fewer than ``per_prompt`` samples in the bank (the message names it).
    """
    if per_prompt < 1:
        raise ValueError(f"bank_rows: per_prompt must be >= 1, got {per_prompt}")
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(bank.prompts):
        rows.setdefault(p, []).append(i)
    index: list[int] = []
    for p in prompts:
        found = rows.get(p, [])
        if len(found) < per_prompt:
            raise ValueError(f"{what}: the sample bank has {len(found)} sample(s) of {p!r}, {per_prompt} wanted "
                             f"(the bank holds {len(rows)} prompts; use its prompts, fewer samples per prompt, or no bank)")
        index.extend(found[:per_prompt])
    return bank.select(index)


def noise_samples(n: int, shape: Sequence[int], prompt: str = "", seed: int = 0,
                  low: float = -1.0, high: float = 1.0) -> SampleSet:
    """``n`` uniform-noise samples in ``[low, high)`` (the reference's DDPM/VAE surrogate)."""
    if n < 1:
        raise ValueError(f"noise_samples: n must be >= 1, got {n}")
    if not high > low:
        raise ValueError(f"noise_samples: need high > low, got [{low}, {high})")
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.rand((n, *[int(d) for d in shape]), generator=gen) * (high - low) + low
    return SampleSet(x, [prompt] * n)


def _sidecar(path: PathLike) -> Path:
    return Path(path).with_suffix(".json")


def normalise(obj: Any) -> Any:
    """JSON round trip, so settings compare equal whether they came from a file or not."""
    return json.loads(json.dumps(obj, sort_keys=True))


def save_samples(path: PathLike, samples: SampleSet, metadata: Optional[Mapping[str, Any]] = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Write ``samples`` to ``path`` (safetensors in ``dtype``) and prompts + metadata to ``path``'s ``.json``.

    Both files are written atomically, the JSON last: a set is complete when its JSON exists.
    :func:`load_samples` returns fp32 whatever was stored (fp16 halves the size of image sets).
    """
    path = Path(path)
    if len(samples.prompts) != samples.samples.shape[0]:
        raise ValueError(f"save_samples: {samples.samples.shape[0]} samples but {len(samples.prompts)} prompts")
    path.parent.mkdir(parents=True, exist_ok=True)
    side = _sidecar(path)
    if side.exists():
        side.unlink()  # the pair is incomplete until the new JSON lands
    tensors = {"samples": samples.samples.detach().to("cpu", dtype).contiguous()}
    save_tensors(path, tensors, {"format": SAMPLES_FORMAT})
    doc = {"format": SAMPLES_FORMAT, "count": len(samples.prompts), "shape": list(samples.samples.shape[1:]),
           "prompts": list(samples.prompts), "metadata": normalise(dict(metadata or {}))}
    save_json(side, doc, sort_keys=False)


def load_samples(path: PathLike) -> tuple[SampleSet, dict[str, Any]]:
    """Read a sample set written by :func:`save_samples`; returns ``(samples, metadata)``."""
    path = Path(path)
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"sample set not found or incomplete: {path} (needs {path.name} and {side.name})")
    with open(side, encoding="utf-8") as fh:
        doc = json.load(fh)
    if doc.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{side}: not a sample set (format {doc.get('format')!r}, expected {SAMPLES_FORMAT!r})")
    x = load_tensors(path, what="sample set").get("samples")
    prompts = doc.get("prompts")
    if x is None or not isinstance(prompts, list) or len(prompts) != x.shape[0]:
        raise ValueError(f"{path}: samples and prompts do not match ({None if x is None else x.shape[0]} vs "
                         f"{len(prompts) if isinstance(prompts, list) else prompts!r})")
    return SampleSet(x.float(), [str(p) for p in prompts]), dict(doc.get("metadata") or {})


def cached_samples(path: PathLike, settings: Mapping[str, Any], make: Callable[[], SampleSet],
                   dtype: torch.dtype = torch.float32, keep_for: Optional[PathLike] = None) -> SampleSet:
    """The sample set at ``path`` if it was made with ``settings``; otherwise ``make()``, saved there.

    ``settings`` must describe everything the samples depend on (model identity, prompts, counts,
    seeds, sampler settings); it is stored under the metadata key ``settings``. A new set is
    stored in ``dtype`` and returned as read back, so a fresh set and a cached one are identical.
    While the file ``keep_for`` exists (the checkpoint of a run trained on the set there), a set made
    with other settings is not replaced: ``FileExistsError`` naming what differs, before anything is sampled.
    """
    want = normalise(dict(settings))
    try:
        samples, meta = load_samples(path)
        found = meta.get("settings")
        if found == want:
            return samples
        if keep_for is not None and Path(keep_for).is_file() and isinstance(found, dict):
            differ = sorted(k for k in set(want) | set(found) if want.get(k) != found.get(k))
            shown = "; ".join(f"{k}: {found.get(k)!r} there, {want.get(k)!r} now" for k in differ[:3])
            raise FileExistsError(f"{path} holds the samples of the run checkpointed in {keep_for}, made with other "
                                  f"settings ({shown}); they are kept: train these settings under another run name, "
                                  "or re-queue with that run's settings to continue it")
    except (FileNotFoundError, ValueError):
        pass
    samples = make()
    save_samples(path, samples, {"settings": want}, dtype=dtype)
    return load_samples(path)[0] if dtype != torch.float32 else samples
