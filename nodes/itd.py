"""ItD (Interpret then Deactivate) node: ItD Prompt Classifier.

**ItD Prompt Classifier** turns a CLIP into one whose text encoding erases concepts, using a sparse
autoencoder (SAE) trained on one layer of one of its text encoders (CLIP-L, OpenCLIP-bigG or OpenCLIP-H), or of
MiniCanvas' text encoder (``sae_core.itd``, method brief ``methods/itd.md``). Steps 1-2
are :func:`sae_core.itd.run_itd`, the pipeline the MiniCanvas bench runs too; the node's inputs are the fields
of :class:`sae_core.itd.ItDSettings`:

1. *Interpret*: each concept (written as a prompt) and each retain prompt is encoded on its own; the
   concept's features are its top SAE features at the chosen layer minus those of every retain prompt.
2. *Calibrate*: every concept prompt is scored (the mean squared change that flipping its features with
   the strength ``scale`` causes at the layer); the threshold is ``tau = margin x`` the smallest of those
   scores. The retain prompts are scored too, so the report shows how far below ``tau`` they stay.
3. *Deactivate*, at encode time: the clone's layer of the chosen encoder is object-patched. Each chunk whose
   score reaches ``tau`` continues through the remaining layers with its concept features flipped (the
   SAE reconstruction of the steered code); every other chunk passes through bit-exact (the unpatched
   layer's values; the very same tensor when no chunk is flagged). Every score is logged (logger ``concept_erasure``) and the last ones are
   kept on the patch object (``ItDClipPatch.last``), so a user can see why a prompt was or was not changed; for
   SD1.x, SD2.x and the SDXL refiner the decision also travels in the conditioning (``CONDITIONING_KEY``) for ItD
   Prompt Gate.

Calibration templates (the ``templates`` input) put each concept and each retain line into several phrasings, as
the reference calibrates on five templates per artist or person; the report (the STRING output, also shown on the
node) lists every calibration prompt's score and its decision, and the IMAGE output draws them (a dot per prompt,
the threshold as a line, prompts on its wrong side in red).

Padding. ComfyUI pads every chunk to 77 tokens with EOS (MiniCanvas: to 16 with ``<pad>``) and the score
averages over every position, so the threshold only means something in that regime. Calibration therefore
tokenizes through this CLIP's own ComfyUI tokenizer (``clip.tokenize``, the same path CLIPTextEncode takes)
and runs the encoder one prompt at a time, which is the computation an unweighted one-chunk prompt gets at
encode time: the same prompt scores the same in both.

Which rows are classified: only the prompt chunks, never the empty row a weighted prompt adds; the CLIP
patching mechanics (which layer, which rows, the object patches on a clone) are :mod:`.clip_patch`'s.

Encoders. One node patches one text encoder with its own SAE, features and threshold, chosen by ``encoder``:
``auto`` is ``clip_l`` when the CLIP has one (SD1.x, SDXL), else its only encoder (SD2.x ``clip_h``, the SDXL
refiner's ``clip_g``, MiniCanvas' ``minicanvas``). For SDXL, chain two nodes on one CLIP: one with ``encoder``
``clip_l`` and its CLIP-L SAE, then one with ``clip_g`` and an OpenCLIP-bigG SAE; each classifies a prompt on its own
encoder, and encoders left unpatched pass through bit-exact. The layer is checked against the one the
conditioning is read from (the last for SD1.x; the penultimate for SDXL's both and SD2's ``clip_h``; CLIP Set Last
Layer moves it). Other CLIPs (T5, Stable Cascade, SD3/Flux families) are refused with a message naming what was
found.

Pooled output. ComfyUI computes a chunk's pooled output after the whole encoder stack (final LayerNorm of the
last layer at the end token, then the projection), so the edited layer output runs on into it: the pooled output
of a flagged prompt comes from the edited run (for ``clip_g``, SDXL's ADM input ``y`` then carries the deactivated
concept too), and that of an unflagged prompt is bit-exact. As in ComfyUI, a multi-chunk prompt's pooled output is
its first chunk's.

Wire the patched CLIP into the positive prompt only: steering the negative prompt would flip the concept in
the unconditional branch too, and classifier-free guidance would then stop pushing away from it.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from sae_core.itd import (
    ItDConcepts,
    ItDPatch,
    ItDSettings,
    ItDTextHost,
    PromptBatch,
    SaeMath,
    choose_layer,
    default_layer,
    hookpoint_layer,
    layer_count,
    run_itd,
    templated,
)
from sae_core.itd.pipeline import POSITIONS
from sae_core.plots import ScoreGroup, calibration_strip, image_tensor
from sae_core.prompts import parse_names, parse_prompts
from sae_core.sae import SparseAutoencoder

from .clip_patch import (
    AUTO_ENCODER,
    ENCODERS,
    ClipLayerPatch,
    TextEncoderSite,
    encoder_width,
    install_layer_patch,
    layer_key,
    output_layer,
    text_encoder_site,
    text_encoder_sites,
)
from .clip_text import first_chunk_tokenizer, tokenizer_of
from .common import SAE_TYPE, Progress, category, inp, node_id, throw_if_interrupted

__all__ = [
    "CONDITIONING_KEY",
    "DEFAULT_TEMPLATES",
    "ENCODER_CHOICES",
    "ItDClassifier",
    "ItDClipPatch",
    "ItDEncodeRecord",
    "ItDPromptClassifier",
    "build_classifier",
    "calibration_plot",
    "calibration_report",
    "comfy_text_host",
    "default_layer",
    "hookpoint_layer",
    "layer_key",
]

log = logging.getLogger("concept_erasure")

NODE_NAME = "ItD Prompt Classifier"

MAX_RECORDS = 64
"""How many encode calls a patch remembers."""

CONDITIONING_KEY = "itd_classifier"
"""Key of the classifier's decision in the conditioning an SD1 ItD CLIP encodes (read by ItD Prompt Gate)."""

DEFAULT_TEMPLATES = "{}"
"""Calibration templates by default: each concept (and retain line) as written."""

ENCODER_CHOICES = (AUTO_ENCODER, *ENCODERS)
"""The ``encoder`` input: ``auto`` (``clip_l`` when the CLIP has one, else its only encoder) or a named one."""


def comfy_text_host(clip: Any, site: TextEncoderSite) -> ItDTextHost:
    """ItD's view of ``clip``'s text encoder at ``site``: ComfyUI's own tokenizer (the path CLIPTextEncode takes;
    first chunk only: 77 tokens padded with EOS for CLIP-L, with id 0 for OpenCLIP-bigG and -H, 16 padded with
    ``<pad>`` for MiniCanvas), the encoder
    run one prompt at a time as ``encode_token_weights`` runs it. A one-chunk unweighted prompt at encode time is
    then exactly the computation calibration scored."""
    tokenize_ids, length = first_chunk_tokenizer(clip, site.token_key, NODE_NAME)

    def tokenize(prompts: list[str]) -> PromptBatch:
        ids, counts = tokenize_ids(prompts)
        return PromptBatch(ids, torch.arange(length)[None, :] < torch.tensor(counts, dtype=torch.int64)[:, None])

    return ItDTextHost(site.encoder, tokenize, run=lambda model, batch: site.run(batch.input_ids),
                       pad_to=length, pad_token=site.pad_token, batch_size=1)


# ---------------------------------------------------------------------------------------------
# the patch
# ---------------------------------------------------------------------------------------------


class ItDEncodeRecord(NamedTuple):
    """What the classifier decided for one encode call."""

    prompts: list[str]
    """One label per classified row (the chunk's text, as tokenized)."""

    scores: Tensor
    """``[rows]`` fp32 scores."""

    detected: Tensor
    """``[rows]`` bool: rows whose concept features were deactivated (``score >= tau``)."""

    tau: float
    """The threshold in force."""


class ItDClipPatch(ClipLayerPatch):
    """ItD's patch on one text-encoder layer: the gated edit of the prompt chunks, every decision logged.

    The decision of every call is kept in ``history``; ``last`` / ``last_scores`` / ``last_detected`` give the
    most recent one.
    """

    def __init__(
        self,
        itd: ItDPatch,
        original_forward: Any,
        original_encode: Any,
        layer: int,
        family: str,
        tokenizer: Any = None,
        encoder_name: str = "clip_l",
        rows_key: Optional[str] = None,
        conditioning_extra: bool = False,
    ) -> None:
        super().__init__(original_forward, original_encode, layer, tokenizer, rows_key)
        self.itd = itd
        self.family = family
        self.encoder_name = encoder_name
        self.conditioning_extra = bool(conditioning_extra)
        """Whether the CLIP hands this encoder's extra outputs on into the conditioning (SD1.x, SD2.x, SDXL
        refiner; not SDXL, whose two encoders' outputs are concatenated into two values)."""
        self.uid = uuid.uuid4().hex
        """Names this classifier in the decisions it puts in a conditioning (ItD Prompt Gate matches them to its CLIP)."""
        self.history: deque[ItDEncodeRecord] = deque(maxlen=MAX_RECORDS)
        self.calls = 0
        """Encode calls classified so far."""

    @property
    def concepts(self) -> ItDConcepts:
        return self.itd.concepts

    @property
    def tau(self) -> float:
        return float(self.itd.gate.tau)

    @property
    def last(self) -> Optional[ItDEncodeRecord]:
        """The most recent encode call's decision (``None`` before the first)."""
        return self.history[-1] if self.history else None

    @property
    def last_scores(self) -> Optional[Tensor]:
        return None if self.last is None else self.last.scores

    @property
    def last_detected(self) -> Optional[Tensor]:
        return None if self.last is None else self.last.detected

    def __repr__(self) -> str:
        return (f"ItDClipPatch({self.family} {self.encoder_name} layer {self.layer}, "
                f"concepts={self.concepts.concept_names}, "
                f"tau={self.tau:.4g}, features={self.concepts.features.numel()})")

    def edit(self, hidden: Tensor, labels: list[str]) -> Optional[Tensor]:
        """The flagged chunks with their concept features deactivated (``None`` when none is flagged)."""
        result = self.itd.apply(hidden)
        self._record(labels, result.scores, result.detected)
        return result.hidden if bool(result.detected.any()) else None

    def encode_token_weights(self, token_weight_pairs: Any) -> Any:
        """Encodes as usual; for SD1.x, SD2.x and the SDXL refiner the decision also travels in the conditioning
        (``CONDITIONING_KEY``: chunk labels, scores, flags, tau, encoder), where ItD Prompt Gate reads it. SDXL's
        encoder keeps two values only, so nothing is added there."""
        start = self.calls
        out = super().encode_token_weights(token_weight_pairs)
        if not self.conditioning_extra or self.calls == start or not isinstance(out, tuple) or len(out) < 2:
            return out
        record = self.history[-1]
        extra = dict(out[2]) if len(out) > 2 else {}
        extra[CONDITIONING_KEY] = {"chunks": list(record.prompts), "scores": record.scores.tolist(),
                                   "flagged": record.detected.tolist(), "tau": record.tau,
                                   "encoder": self.encoder_name, "classifier": self.uid,
                                   "concepts": list(self.concepts.concept_names)}
        return (out[0], out[1], extra)

    def _record(self, labels: list[str], scores: Tensor, detected: Tensor) -> None:
        record = ItDEncodeRecord(list(labels), scores.detach().float().cpu(), detected.detach().cpu(), self.tau)
        self.history.append(record)
        self.calls += 1
        for label, score, hit in zip(record.prompts, record.scores.tolist(), record.detected.tolist()):
            log.info(
                "%s: %r score %.4g %s tau %.4g -> %s", NODE_NAME, label, score, ">=" if hit else "<", self.tau,
                f"concept features deactivated at {self.encoder_name} layer {self.layer}" if hit
                else "passed through unchanged",
            )


# ---------------------------------------------------------------------------------------------
# building the classifier
# ---------------------------------------------------------------------------------------------


class ItDClassifier(NamedTuple):
    """Result of :func:`build_classifier`."""

    clip: Any
    """The patched clone of the input CLIP."""

    patch: ItDClipPatch
    """The patch object installed on the clone (scores of the last encodes, the concepts)."""

    report: str
    """Human-readable calibration report."""


def _check_sae_width(clip: Any, site: TextEncoderSite, math: SaeMath, index: int) -> None:
    """The SAE's width against the chosen encoder's; the error names the encoder of this CLIP that fits it."""
    width = encoder_width(site.encoder)
    if width is None:
        return
    try:
        math.check_width(width, f"the CLIP's {site.name} layer {index} ({site.family})")
    except ValueError as err:
        fits = [s.name for s in text_encoder_sites(clip, NODE_NAME)
                if s.name != site.name and encoder_width(s.encoder) == math.d_in]
        if not fits:
            raise
        raise ValueError(f"{err} This CLIP's {fits[0]} is {math.d_in} wide: set encoder to {fits[0]}.") from None


def build_classifier(clip: Any, sae: SparseAutoencoder, settings: ItDSettings,
                     progress: Optional[Progress] = None, encoder: str = AUTO_ENCODER) -> ItDClassifier:
    """Interpret, calibrate (:func:`sae_core.itd.run_itd`) and install the ItD classifier on ``encoder`` (``auto``,
    ``clip_l``, ``clip_g``, ``clip_h``) of a clone of ``clip`` (the input is not changed)."""
    if sae is None or not all(hasattr(sae, a) for a in ("encoder", "W_dec", "b_dec", "cfg")):
        raise ValueError(f"sae: expected an SAE from Load SAE, got {type(sae).__name__}")
    site = text_encoder_site(clip, NODE_NAME, encoder)
    family, where = site.family, site.name
    num_layers = layer_count(site.encoder)
    index, origin = choose_layer(settings.layer, getattr(sae.cfg, "hookpoint", None), num_layers)
    math = SaeMath(sae)
    _check_sae_width(clip, site, math, index)
    last = output_layer(clip, site.encoder, num_layers)
    if last is not None and index > last:
        raise ValueError(
            f"layer: {where} layer {index} ({origin}) comes after layer {last}, the last one whose output this "
            f"{family} CLIP's conditioning is read from; editing it would leave the token states unchanged (only "
            f"the pooled output would move). Pick a layer <= {last}."
        )

    # Calibrate in the deployment regime, with this CLIP's own weights (its LoRAs included) loaded as for encoding.
    clip.load_model()
    host = comfy_text_host(clip, site)
    throw_if_interrupted()
    if progress is not None:
        progress.update(1)
    try:
        found = run_itd(host, sae, settings).concepts
    except ValueError as err:
        raise ValueError(f"{NODE_NAME}: {err}") from err
    found.extra.update({"family": family, "comfy_tokenizer": True})
    throw_if_interrupted()
    if progress is not None:
        progress.update(2)

    itd = ItDPatch(site.encoder, sae, found, layer=index, on_length_mismatch="warn", check_fingerprint=False)
    patched, patch = install_layer_patch(
        clip, site, index, lambda forward, encode: ItDClipPatch(
            itd, forward, encode, index, family, tokenizer=tokenizer_of(clip, site.token_key),
            encoder_name=where, rows_key=site.rows_key, conditioning_extra=site.conditioning_extra))
    report = calibration_report(found, list(settings.target_prompts), settings.scored_retain, index, origin, family,
                                math, where)
    note = _encoders_note(clip, site)
    return ItDClassifier(patched, patch, f"{report}\n{note}" if note else report)


def _encoders_note(clip: Any, site: TextEncoderSite) -> str:
    """What the report says about the CLIP's other encoders and the pooled output."""
    others = [s.name for s in text_encoder_sites(clip, NODE_NAME) if s.name != site.name]
    patched = {p.encoder_name for p in clip.patcher.object_patches.values() if isinstance(p, ItDClipPatch)}
    lines = []
    if site.name in patched:
        hint = f" (to edit {others[0]} instead, set encoder to {others[0]})" if others else ""
        lines.append(f"{site.name}: already edited by an ItD node upstream; this classifier was calibrated on, and "
                     f"acts on, that node's output{hint}")
    if site.name == "clip_g":
        lines.append("pooled output: from the edited clip_g run for flagged prompts (the UNet's ADM input), "
                     "bit-exact for the others")
    for name in others:
        if name in patched:
            lines.append(f"{name}: classified by the ItD node upstream of this one (its own SAE and threshold)")
        else:
            pooled = " and the pooled output it gives the UNet" if name == "clip_g" else ""
            lines.append(f"{name}{pooled}: not edited; chain another ItD Prompt Classifier with encoder {name} and "
                         f"an SAE of {name} to edit it")
    return "\n".join(lines)


def calibration_report(
    found: ItDConcepts,
    concepts: list[str],
    retain: list[str],
    layer: int,
    origin: str,
    family: str,
    math: SaeMath,
    encoder_name: str = "clip_l",
) -> str:
    """The STRING output: features, the threshold, and every calibration prompt's score (``retain``: the scored
    retain prompts in the order of ``found.retain_scores``, :attr:`ItDSettings.scored_retain`)."""
    cal = found.calibration
    tau = float(found.tau)
    lines = [
        f"{NODE_NAME}: {family} {encoder_name} layer {layer} ({origin}); SAE d_in={math.d_in}, "
        f"{math.num_latents} latents, k={math.k}",
        f"features: {found.features.numel()} in all; "
        + ", ".join(f"{name!r}: {found.concept_features[name].numel()}" for name in found.concept_names)
        + f" (top_n={found.top_n}, scale={found.scale:g})",
        f"threshold tau = {tau:.6g} = {cal.margin:g} x smallest concept score {cal.target_min:.6g}",
    ]
    retain_scores = found.retain_scores
    if retain_scores is not None and retain_scores.numel():
        above = [p for p, s in zip(retain, retain_scores.tolist()) if s >= tau]
        ratio = f", ratio {cal.ratio:.3g}x" if cal.ratio is not None else ""
        lines.append(
            f"margin against the retain prompts: largest retain score {cal.retain_max:.6g}, tau - that = "
            f"{cal.gap:.6g}{ratio}; "
            + (f"{len(above)} of {len(retain)} retain prompts reach tau and would be edited"
               if above else f"all {len(retain)} retain prompts stay below tau and pass through unchanged")
        )
    else:
        lines.append("no retain prompts: their margin cannot be reported, and features every prompt shares were "
                     "not excluded")
    empty = list(found.extra.get("concepts_without_features") or [])
    if empty:
        lines.append(f"no features of their own (every top feature also fires on a retain prompt): {empty}")
    lines.append("concept prompts (score, decision at encode time):")
    target_scores = found.target_scores if found.target_scores is not None else torch.zeros(0)
    for prompt, score in zip(concepts, target_scores.tolist()):
        lines.append(f"  {score:12.6g}  {'EDIT' if score >= tau else 'keep'}  {prompt}")
    if retain_scores is not None and retain_scores.numel():
        lines.append("retain prompts (score, decision at encode time):")
        for prompt, score in zip(retain, retain_scores.tolist()):
            lines.append(f"  {score:12.6g}  {'EDIT' if score >= tau else 'keep'}  {prompt}")
    return "\n".join(lines)


def calibration_plot(found: ItDConcepts, concepts: list[str], retain: list[str], layer: int, family: str,
                     encoder_name: str = "clip_l") -> Tensor:
    """The IMAGE output ``[1, H, W, 3]``: the report's scores as a strip plot (:func:`sae_core.plots.calibration_strip`),
    one row for the concept prompts and one for the retain prompts, ``tau`` as a line, prompts on the wrong side of
    it highlighted and named."""
    cal = found.calibration
    tau = float(found.tau)
    targets = found.target_scores.tolist() if found.target_scores is not None else []
    kept = found.retain_scores.tolist() if found.retain_scores is not None else []
    parts = [f"{family} {encoder_name} layer {layer}"]
    if cal is not None:
        parts.append(f"tau = {cal.margin:g} x smallest concept score {cal.target_min:.4g}")
        if cal.retain_max is not None:
            ratio = f", {cal.ratio:.3g}x below the smallest concept score" if cal.ratio is not None else ""
            parts.append(f"largest retain score {cal.retain_max:.4g}{ratio}")
        else:
            parts.append("no retain prompts")
    groups = [ScoreGroup(f"concept prompts ({len(targets)})", targets, True,
                         concepts if len(concepts) == len(targets) else ()),
              ScoreGroup(f"retain prompts ({len(kept)})", kept, False, retain if len(retain) == len(kept) else ())]
    names = ", ".join(repr(name) for name in found.concept_names)
    if len(found.concept_names) > 1:
        names = f"{len(found.concept_names)} concepts: {names}"
    image = calibration_strip(groups, tau, title=f"{NODE_NAME}: {names}",
                              subtitle="; ".join(parts), axis_label="score: mean squared change the edit makes")
    return image_tensor(image)


# ---------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------


class ItDPromptClassifier:
    """Erase concepts in the text encoder: SAE features deactivated for prompts the zero-shot classifier flags."""

    DESCRIPTION = (
        "ItD (Interpret then Deactivate): finds the SAE features of the concepts at one layer of one text encoder "
        "(minus those of the retain prompts), calibrates a threshold on the concept prompts' scores, and returns a "
        "copy of the CLIP whose text encoding deactivates those features (scales them by 'scale') for every prompt "
        "scoring at or above the threshold; a flagged prompt's pooled output comes from the edited run. Prompts "
        "below it are encoded exactly as by the input CLIP (token states and pooled output). The report lists the "
        "calibration scores; each encoded prompt's score is logged. SD1.x (clip_l), SD2.x (clip_h), SDXL (clip_l "
        "and clip_g: chain two nodes, one per encoder, each with its own SAE), the SDXL refiner (clip_g) and "
        "MiniCanvas. Wire the patched CLIP to the positive prompt only."
    )
    CATEGORY = category("itd")
    RETURN_TYPES = ("CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("clip", "report", "calibration_plot")
    OUTPUT_TOOLTIPS = (
        "A copy of the CLIP whose text-encoder layer deactivates the concept features of prompts the classifier "
        "flags. Use it for the positive prompt only; encode the negative prompt with the original CLIP.",
        "The calibration: feature counts, the threshold, its margin against the retain prompts, and the score "
        "of every concept and retain prompt.",
        "The calibration as a picture (wire it to Preview Image): every concept and retain prompt as a dot at its "
        "score, the threshold tau as a line with its value; prompts on the wrong side of it (a concept prompt "
        "below, a retain prompt at or above) are red and named.",
    )
    FUNCTION = "classify"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": inp("CLIP", "The text encoder (SD1.x, SD2.x, SDXL, SDXL refiner or MiniCanvas); the "
                                    "encoder input says which of its encoders is edited. It is not modified."),
                "sae": inp(SAE_TYPE, "An SAE trained on one layer of the chosen encoder (width 768 for CLIP-L, 1280 "
                                     "for SDXL's clip_g, 1024 for SD2's clip_h, 128 for MiniCanvas: "
                                     "minicanvas/itd_text_sae), from Load SAE."),
                "concepts": inp("STRING", "Concepts to erase, one per line or comma-separated, written as you would "
                                          "prompt them (e.g. 'Van Gogh', 'nudity'). Each is also a calibration "
                                          "prompt: the threshold is set so that all of them are caught.",
                                multiline=True, default="Van Gogh"),
                "retain_prompts": inp("STRING", "Prompts that must stay unchanged, one per line (e.g. other artists). "
                                                "Their features are excluded from the concepts' and their scores show "
                                                "how far below the threshold they stay.",
                                      multiline=True, default="Claude Monet\nPablo Picasso\na photo of a dog"),
                "layer": inp("INT", "Encoder layer the SAE reads (0-based; ItD uses clip_l's 8 of 12). -1 = the "
                                    "layer the SAE was trained on (its hookpoint), else 2/3 of the way up. At most "
                                    "the layer the conditioning is read from (SDXL, SD2: the penultimate).",
                             default=-1, min=-1, max=63, step=1),
                "scale": inp("FLOAT", "Factor applied to the concept features of flagged prompts: -8 (ItD) flips and "
                                      "amplifies them, 0 removes them.",
                             default=-8.0, min=-100.0, max=100.0, step=0.5),
            },
            "optional": {
                "threshold_margin": inp("FLOAT", "The threshold is this fraction of the smallest concept score "
                                                 "(0.99 in ItD). Lower catches more paraphrases and risks editing "
                                                 "other prompts.",
                                        default=0.99, min=0.01, max=1.0, step=0.01),
                "top_n": inp("INT", "How many of each prompt's strongest SAE features are compared (128 for "
                                    "people, 256 for styles in ItD).",
                             default=128, min=1, max=4096, step=1),
                "templates": inp("STRING", "Calibration templates, one per line, {} marking where the name goes: "
                                           "each concept and each retain line is put into every template (ItD uses "
                                           "five per artist, e.g. 'Painting in the style of {}', and five per "
                                           "person, e.g. 'A portrait of {}'). {} alone = the names as written.",
                                 multiline=True, default=DEFAULT_TEMPLATES),
                "positions": inp(list(POSITIONS), "Token positions whose SAE features describe a prompt: content = "
                                                  "BOS to EOS (ItD's unpadded prompts); all = the padding too "
                                                  "(MiniCanvas' bench setting, its SAE was trained on padding).",
                                 default="content"),
                "retain_empty_prompt": inp("BOOLEAN", "Also retain the empty prompt (the unconditional prompt of "
                                                      "classifier-free guidance): features it shares with a concept "
                                                      "are not deactivated. MiniCanvas' bench retains it.",
                                           default=False),
                "encoder": inp(list(ENCODER_CHOICES), "Which text encoder this node edits, with this SAE: auto = "
                                                      "clip_l when the CLIP has one (SD1.x, SDXL), else its only "
                                                      "encoder (SD2.x clip_h, SDXL refiner clip_g, MiniCanvas). For "
                                                      "SDXL's clip_g chain a second node set to clip_g with a clip_g "
                                                      "SAE; encoders no node edits pass through unchanged.",
                               default=AUTO_ENCODER),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def classify(self, clip: Any, sae: SparseAutoencoder, concepts: str, retain_prompts: str = "", layer: int = -1,
                 scale: float = -8.0, threshold_margin: float = 0.99, top_n: int = 128,
                 templates: str = DEFAULT_TEMPLATES, positions: str = "content", retain_empty_prompt: bool = False,
                 encoder: str = AUTO_ENCODER, unique_id: Optional[str] = None) -> dict:
        forms = parse_prompts(templates)
        retain = [p for ps in templated(parse_prompts(retain_prompts), forms).values() for p in ps]
        retain += [""] if retain_empty_prompt else []
        settings = ItDSettings(concepts=templated(parse_names(concepts), forms), retain_prompts=retain,
                               layer=int(layer), scale=float(scale), threshold_margin=float(threshold_margin),
                               top_n=int(top_n), positions=positions)
        with Progress(3, NODE_NAME, node_id=unique_id) as bar:
            result = build_classifier(clip, sae, settings, progress=bar, encoder=encoder)
        log.info("%s installed: %r\n%s", NODE_NAME, result.patch, result.report)
        patch = result.patch
        plot = calibration_plot(patch.concepts, list(settings.target_prompts), settings.scored_retain, patch.layer,
                                patch.family, patch.encoder_name)
        # the report is shown on the node (ui text) as well as returned
        return {"ui": {"text": [result.report]}, "result": (result.clip, result.report, plot)}


NODE_CLASS_MAPPINGS = {node_id("ItDPromptClassifier"): ItDPromptClassifier}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("ItDPromptClassifier"): NODE_NAME}
