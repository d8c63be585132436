"""Selective Amnesia, host-neutral: the Fisher estimate, the training data and the forgetting LoRA.

Both hosts call these functions with one :class:`~sae_core.amnesia.config.AmnesiaConfig`:

* the ComfyUI nodes (``nodes/amnesia.py``: Compute Fisher, LoRA Train), whose inputs carry the
  config's field names;
* the MiniCanvas plug-in (``sae_core/minicanvas/plugins/amnesia.py``: ``python -m sae_core bench
  --method amnesia``), whose ``--option`` names are the config's field names.

A host adapts its model to :class:`AmnesiaHost`: a text encoder, a sampler, and two training
contexts that expose an eps denoiser running through trainable LoRA factors (or through the base
weights whose Fisher is wanted). What stays with the host is what only it knows: where files live,
how its model is identified, which data a benchmark erasure uses.

The steps, in order:

1. :func:`estimate_fisher` (once per model and target preset): diagonal Fisher of the base weights
   of the LoRA targets over samples of the model itself; reused when a complete file of the same
   run exists, resumed when an unfinished one does (:mod:`sae_core.amnesia.resumable`).
   :func:`fisher_samples` draws the node's Fisher data (prompts cycled, one seed per sample).
2. :func:`training_samples`: surrogate samples of the ``surrogate_prompt`` lines and replay samples of
   the ``remember_prompts``, drawn by the host's sampler (cached) or taken from a sample bank (the
   model's samples of many prompts, made once: the MiniCanvas bench's shipped bank, or the samples of
   a Fisher estimate, as the reference replays its Fisher data).
3. :func:`train_forgetting_lora`: the LoRA factors trained with the Selective Amnesia objective
   (:class:`~sae_core.amnesia.trainer.AmnesiaTrainer`), resumable from a checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from ..artefacts import Action
from ..prompts import parse_prompts
from .config import AmnesiaConfig
from .ewc import fisher_candidates, fisher_key
from .fisher import FISHER_FORMAT, FisherEstimate, compute_fisher, eps_mse_loss_fn, fisher_file_identity, load_fisher
from .resumable import decide_checkpoint
from .samples import SampleSet, bank_rows, cached_samples, generate_samples, sample_pairs
from .trainer import AmnesiaResult, AmnesiaTrainer, forget_lists, prompts_to_encode

__all__ = [
    "AmnesiaConfig",
    "AmnesiaHost",
    "LoRATraining",
    "FisherTraining",
    "TrainingData",
    "LoRARun",
    "REPLAY_SEED_OFFSET",
    "fisher_samples",
    "estimate_fisher",
    "training_samples",
    "train_forgetting_lora",
]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

REPLAY_SEED_OFFSET = 1_000_003
"""Replay samples use seeds from ``seed + REPLAY_SEED_OFFSET`` on (disjoint from the surrogate's)."""


class LoRATraining(NamedTuple):
    """What a host's :meth:`AmnesiaHost.lora_training` context yields."""

    denoiser: Denoiser
    """``eps(x_t, t, context)`` of the base model with the adapters applied (DDPM form, ``t`` int64)."""
    adapters: dict[str, nn.Module]
    """``{module name: LoRA layer or LoRADelta}`` for every target module; their ``up``/``down`` are trained."""


class FisherTraining(NamedTuple):
    """What a host's :meth:`AmnesiaHost.fisher_training` context yields."""

    denoiser: Denoiser
    """``eps(x_t, t, context)`` of the base model (DDPM form, ``t`` int64)."""
    params: dict[str, torch.Tensor]
    """``{diffusion_model.<module>.weight: tensor}``: the base weight of every target module, or a zero
    delta added to it (its gradient is the weight's gradient)."""


@runtime_checkable
class AmnesiaHost(Protocol):
    """What the pipeline needs from a host (the ComfyUI nodes, the MiniCanvas plug-in)."""

    device: torch.device
    """Where the denoiser runs (samples, contexts and the Fisher are moved there)."""
    alphas_cumprod: torch.Tensor
    """``[T]`` abar_t of the model's discrete noise schedule."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text conditioning ``[N, L, D]`` of the prompts (the frozen text encoder; one row each).

        The pipeline only indexes, moves and concatenates these rows and hands them to the host's denoiser, so a
        host may pack more per-prompt conditioning into a row (the ComfyUI host appends SDXL's ADM vector ``y``).
        """
        ...

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The base model's samples ``[N, ...]`` in the denoiser's input space, row ``i`` for ``(prompts[i], seeds[i])``."""
        ...

    def lora_training(self, config: AmnesiaConfig, generator: torch.Generator) -> AbstractContextManager[LoRATraining]:
        """A context in which LoRA factors (``config.rank``/``alpha``, down factors drawn from
        ``generator`` in the order of :func:`sae_core.amnesia.lora.select_targets`) on the
        ``config.targets`` modules of a private copy of the model can be trained."""
        ...

    def fisher_training(self, config: AmnesiaConfig) -> AbstractContextManager[FisherTraining]:
        """A context in which gradients reach the base weights of the ``config.targets`` modules."""
        ...


# ---------------------------------------------------------------------------------------------
# 1. the Fisher estimate
# ---------------------------------------------------------------------------------------------


def fisher_samples(host: AmnesiaHost, prompts: Union[str, Sequence[str]], samples: int, seed: int,
                   cache: Optional[PathLike] = None, identity: Optional[Mapping[str, Any]] = None,
                   should_stop: Optional[Callable[[], bool]] = None,
                   callback: Optional[Callable[[int, int], None]] = None) -> SampleSet:
    """``samples`` samples of the model, cycling over ``prompts`` (one per line); sample ``i`` uses seed ``seed + i``.

    Cached at ``cache`` under ``identity`` (everything the samples depend on) when given.
    """
    prompt_list = parse_prompts(prompts)
    if not prompt_list:
        raise ValueError("prompts: give at least one prompt (one per line)")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    pairs = [(prompt_list[i % len(prompt_list)], int(seed) + i) for i in range(int(samples))]

    def make() -> SampleSet:
        return sample_pairs(host.sample, pairs, batch_size=1, should_stop=should_stop, callback=callback)

    return cached_samples(cache, dict(identity or {}), make) if cache is not None else make()


def _fisher_identity(host: AmnesiaHost, config: AmnesiaConfig, identity: Mapping[str, str]) -> tuple[int, int, dict[str, str]]:
    big_t = int(torch.as_tensor(host.alphas_cumprod).numel())
    k = min(int(config.timesteps_per_sample), big_t)
    wanted = {"format": FISHER_FORMAT, "timesteps_per_sample": str(k), "total_timesteps": str(big_t),
              "seed": str(int(config.seed)), **{str(a): str(b) for a, b in identity.items()}}
    return k, big_t, wanted


def estimate_fisher(
    host: AmnesiaHost,
    config: AmnesiaConfig,
    data: Callable[[], SampleSet],
    count: int,
    out_path: Optional[PathLike],
    *,
    identity: Optional[Mapping[str, str]] = None,
    metadata: Optional[Mapping[str, object]] = None,
    search: Sequence[PathLike] = (),
    redo_different: bool = False,
    should_stop: Optional[Callable[[], bool]] = None,
    callback: Optional[Callable[[int, Optional[int]], None]] = None,
    progress: bool = True,
) -> FisherEstimate:
    """Diagonal Fisher of the base weights of ``config.targets`` over ``count`` samples of the model.

    Args:
        data: makes the samples (called only when no complete estimate can be reused).
        count: how many samples ``data()`` gives.
        out_path: the Fisher file (written every ``config.checkpoint_every`` samples, when stopped and
            at the end); None: nothing is written.
        identity: what else the estimate depends on (model and data fingerprints), as metadata
            fields; a file is reused or resumed only if they match.
        metadata: more metadata written to the file.
        search: other files to reuse when complete and of the same run (e.g. shipped ones); never written.
        redo_different: compute again when ``out_path`` holds another run (else ``FileExistsError``).
        should_stop, callback, progress: as in :func:`sae_core.amnesia.fisher.compute_fisher`.

    Uses ``config.timesteps_per_sample`` (capped at T), ``timestep_batch``, ``seed``, ``targets``,
    ``precision`` (through the host) and ``checkpoint_every``.
    """
    identity = dict(identity or {})
    k, big_t, wanted = _fisher_identity(host, config, identity)
    for path in [*search, out_path]:
        if path is None or not Path(path).is_file():
            continue
        try:
            found, found_count = fisher_file_identity(path, wanted)
            found.pop("layout")
            decision = decide_checkpoint("Fisher estimate", path, wanted, found, complete=found_count == count)
        except (ValueError, FileExistsError):
            continue
        if decision.action is Action.REUSE:
            log.info("Selective Amnesia: %s", decision.message)
            f = load_fisher(path)
            return FisherEstimate(f.fisher, int(f.count or 0), stopped=False)
    samples = data()
    if len(samples) != count:
        raise ValueError(f"estimate_fisher: data() gave {len(samples)} samples, expected {count}")
    unique = sorted(set(samples.prompts))
    with torch.no_grad():
        enc = host.encode(unique)
    contexts = {p: enc[i : i + 1] for i, p in enumerate(unique)}
    items = [(samples.samples[i : i + 1], contexts[p]) for i, p in enumerate(samples.prompts)]
    with host.fisher_training(config) as run:
        loss_fn = eps_mse_loss_fn(run.denoiser, host.alphas_cumprod, device=host.device)
        return compute_fisher(loss_fn, run.params, items, timesteps_per_sample=k, total_timesteps=big_t,
                              out_path=out_path, resume=True, progress=progress, should_stop=should_stop,
                              seed=int(config.seed), save_every=int(config.checkpoint_every),
                              chunk_size=config.timestep_batch, callback=callback, metadata=metadata,
                              identity=identity, redo_different=redo_different)


# ---------------------------------------------------------------------------------------------
# 2. the training data
# ---------------------------------------------------------------------------------------------


class TrainingData(NamedTuple):
    """Surrogate and replay samples of a run."""

    surrogate: SampleSet
    """``surrogate_samples`` samples of each surrogate prompt, prompt-major."""
    replay: Optional[SampleSet]
    """``replay_per_prompt`` samples of every remember prompt (None when ``gamma`` is 0)."""


def _check_steps(config: AmnesiaConfig) -> None:
    if config.steps < 1:  # 0 is a valid config for a Fisher estimate, not for training
        raise ValueError(f"steps must be >= 1 to train a LoRA (at 0 it stays zero: nothing is forgotten), got "
                         f"{config.steps}")


def training_samples(
    host: AmnesiaHost,
    config: AmnesiaConfig,
    folder: Optional[PathLike] = None,
    identity: Optional[Mapping[str, Any]] = None,
    *,
    bank: Optional[SampleSet] = None,
    batch_size: int = 4,
    should_stop: Optional[Callable[[], bool]] = None,
    callback: Optional[Callable[[int, int], None]] = None,
    checkpoint: Optional[PathLike] = None,
) -> TrainingData:
    """Surrogate and replay samples of the config's prompts: drawn by the host's sampler, or taken from ``bank``.

    Drawn: sample ``j`` of surrogate prompt ``i`` uses seed ``seed + i * surrogate_samples + j``
    (one surrogate prompt: ``seed + j``); replay sample ``j`` of remember prompt ``i`` uses
    ``seed + REPLAY_SEED_OFFSET + i * replay_per_prompt + j``. With ``folder`` the sets are
    cached there (``surrogate.safetensors``, ``replay.safetensors``) under ``identity`` (the
    host's model and sampler identity) plus their prompts, counts and seeds. While ``checkpoint`` (the
    training checkpoint of the run in ``folder``) exists, cached sets of other settings are kept: the run
    is refused with ``FileExistsError`` before anything is sampled (:func:`~sae_core.amnesia.samples.cached_samples`).

    From a bank (:func:`~sae_core.amnesia.samples.bank_rows`): the first ``surrogate_samples``
    samples of every surrogate prompt and the first ``replay_per_prompt`` of every remember prompt,
    in the bank's order; nothing is sampled or cached.

    Raises:
        ValueError: no forget prompt, no surrogate prompt, no remember prompt while gamma > 0, or a
            prompt the bank has too few samples of (messages name the field).
        InterruptedError: ``should_stop()`` became true.
    """
    _check_steps(config)
    if not config.forget_prompts:
        raise ValueError("forget_prompts: give at least one prompt or keyword (comma-separated)")
    surrogates = list(config.surrogate_prompts)
    if not surrogates:
        raise ValueError("surrogate_prompt is empty: say what the forget prompts should produce instead")
    remember = list(config.remember_prompts)
    if config.gamma > 0 and not remember:
        raise ValueError("remember_prompts: give at least one prompt per line, or set gamma to 0")
    if bank is not None:
        surrogate = bank_rows(bank, surrogates, int(config.surrogate_samples), "surrogate_prompt")
        replay = bank_rows(bank, remember, int(config.replay_per_prompt), "remember_prompts") if config.gamma > 0 else None
        return TrainingData(surrogate, replay)
    base = dict(identity or {})
    n_sur = len(surrogates) * int(config.surrogate_samples)
    n_rep = len(remember) * int(config.replay_per_prompt) if config.gamma > 0 else 0
    total = n_sur + n_rep

    def counted(offset: int) -> Optional[Callable[[int, int], None]]:
        return None if callback is None else (lambda c, n: callback(offset + c, total))

    def draw(name: str, prompts: list[str], per_prompt: int, seed: int, offset: int) -> SampleSet:
        def make() -> SampleSet:
            return generate_samples(host.sample, prompts, per_prompt, seed=seed, batch_size=batch_size,
                                    should_stop=should_stop, callback=counted(offset))

        if folder is None:
            return make()
        settings = {**base, "prompts": prompts, "per_prompt": per_prompt, "seed": seed}
        return cached_samples(Path(folder) / f"{name}.safetensors", settings, make, keep_for=checkpoint)

    seed = int(config.seed)
    surrogate = draw("surrogate", surrogates, int(config.surrogate_samples), seed, 0)
    replay = None
    if n_rep:
        replay = draw("replay", remember, int(config.replay_per_prompt), seed + REPLAY_SEED_OFFSET, n_sur)
    return TrainingData(surrogate, replay)


# ---------------------------------------------------------------------------------------------
# 3. the forgetting LoRA
# ---------------------------------------------------------------------------------------------


class LoRARun(NamedTuple):
    """Outcome of :func:`train_forgetting_lora`."""

    adapters: dict[str, nn.Module]
    """The trained LoRA factors, ``{module name: layer}`` (the host merges, patches or saves them)."""
    result: AmnesiaResult
    """Loss history, steps done, whether it was stopped."""


def _check_fisher_covers(fisher: Mapping[str, torch.Tensor], adapters: Mapping[str, nn.Module], targets: str) -> None:
    missing = [n for n in adapters if not any(c in fisher for c in fisher_candidates(n))]
    if missing:
        raise ValueError(f"the Fisher has no Fisher for {len(missing)} of the {len(adapters)} '{targets}' targets "
                         f"(e.g. {fisher_key(missing[0])}); compute the Fisher with targets = {targets}")


def train_forgetting_lora(
    host: AmnesiaHost,
    config: AmnesiaConfig,
    surrogate: SampleSet,
    replay: Optional[SampleSet],
    fisher: Optional[Mapping[str, torch.Tensor]],
    *,
    checkpoint: Optional[PathLike] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    callback: Optional[Callable[[int, int, dict[str, float]], None]] = None,
    progress: bool = True,
) -> LoRARun:
    """Train LoRA factors that make ``config.forget_prompts`` produce the surrogate samples.

    Args:
        surrogate: surrogate samples, each trained under a forget prompt (``config.forget_prompts``:
            a shared list, or a mapping from the sample's prompt to its forget prompts).
        replay: remember samples, each trained under its own prompt (ignored when gamma is 0).
        fisher: ``{key: F}`` covering every target (ignored when lam is 0).
        checkpoint: resumable checkpoint file (:meth:`AmnesiaTrainer.train`).

    The prompts are encoded once, before the host's training context is entered (a host may load
    its text encoder and its UNet in turn). The LoRA's down factors are drawn from a generator
    seeded with ``config.seed``.
    """
    _check_steps(config)
    use_replay = config.gamma > 0
    replay = replay if use_replay else None
    fisher = fisher if config.lam > 0 else None
    unique = prompts_to_encode(forget_lists(surrogate, config.forget_prompts), replay)
    with torch.no_grad():
        table = host.encode(unique)
    index = {p: i for i, p in enumerate(unique)}

    def encode(prompts: list[str]) -> torch.Tensor:
        return table[[index[p] for p in prompts]]

    generator = torch.Generator().manual_seed(int(config.seed))
    with host.lora_training(config, generator) as run:
        if fisher is not None:
            _check_fisher_covers(fisher, run.adapters, config.targets)
        trainer = AmnesiaTrainer(config, run.denoiser, host.alphas_cumprod, encode, run.adapters, surrogate,
                                 config.forget_prompts, replay=replay, fisher=fisher, device=host.device)
        result = trainer.train(checkpoint, resume=True, should_stop=should_stop, callback=callback, progress=progress)
    return LoRARun(run.adapters, result)
