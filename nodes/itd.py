"""ItD (Interpret then Deactivate) node: ItD Prompt Classifier.

**ItD Prompt Classifier** turns a CLIP into one whose text encoding erases concepts, using a sparse
autoencoder (SAE) trained on one CLIP-L layer (``sae_core.itd``, method brief ``methods/itd.md``):

1. *Interpret*: each concept (written as a prompt) and each retain prompt is encoded on its own; the
   concept's features are its top SAE features at the chosen layer minus those of every retain prompt.
2. *Calibrate*: every concept prompt is scored (the mean squared change that flipping its features with
   the strength ``scale`` causes at the layer); the threshold is ``tau = margin x`` the smallest of those
   scores. The retain prompts are scored too, so the report shows how far below ``tau`` they stay.
3. *Deactivate*, at encode time: the clone's ``clip_l`` layer is object-patched. Each 77-token chunk whose
   score reaches ``tau`` continues through the remaining layers with its concept features flipped (the
   SAE reconstruction of the steered code); every other chunk passes through bit-exact (the unpatched
   layer's values; the very same tensor when no chunk is flagged). Every score is logged (logger ``concept_erasure``) and the last ones are
   kept on the patch object (``ItDClipPatch.last``), so a user can see why a prompt was or was not changed.

Padding. ComfyUI pads every chunk to 77 tokens with EOS and the score averages over all 77 positions, so the
threshold only means something in that regime. Calibration therefore tokenizes through this CLIP's own
ComfyUI tokenizer (``clip.tokenize``, the same path CLIPTextEncode takes) and runs ``clip_l`` one prompt at
a time, which is the computation an unweighted one-chunk prompt gets at encode time: the same prompt scores
the same in both.

Which rows are classified. ComfyUI encodes a prompt as one row per 77-token chunk, plus one empty-prompt row
when any token carries a weight other than 1 (it serves as the reference the weights interpolate from).
The patch also wraps ``clip_l.encode_token_weights`` to learn how many rows are real chunks, and never edits
the empty row.

Supported encoders: SD1.x (``SD1ClipModel`` with ``clip_l``) and SDXL (``SDXLClipModel``: only ``clip_l`` is
patched; ``clip_g`` and the pooled output it provides are untouched). Anything else (SD2's OpenCLIP-H, a
``clip_g`` alone, T5 and other families) is refused with a message naming what was found.

Wire the patched CLIP into the positive prompt only: steering the negative prompt would flip the concept in
the unconditional branch too, and classifier-free guidance would then stop pushing away from it.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from sae_core.prompts import parse_names, parse_prompts
from sae_core.itd import ItDConcepts, ItDPatch, PromptBatch, SaeMath, TextLayerSource, build_concepts
from sae_core.sae import SparseAutoencoder

from .common import SAE_TYPE, Progress, category, inp, node_id, throw_if_interrupted

log = logging.getLogger("concept_erasure")

NODE_NAME = "ItD Prompt Classifier"

ENCODER_KEY = "clip_l"
"""Attribute of the CLIP's ``cond_stage_model`` holding the CLIP-L encoder ItD edits."""

LAYERS_PATH = "transformer.text_model.encoder.layers"
"""Where ComfyUI's ``SDClipModel`` keeps its encoder layers."""

ENCODE_KEY = f"{ENCODER_KEY}.encode_token_weights"
"""Object-patch name of the wrapper that tells the layer patch which rows are real prompt chunks."""

MAX_RECORDS = 64
"""How many encode calls a patch remembers."""


def layer_key(index: int) -> str:
    """Object-patch name of the forward of ``clip_l``'s encoder layer ``index``."""
    return f"{ENCODER_KEY}.{LAYERS_PATH}.{int(index)}.forward"


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


_HOOK_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h)\.(\d+)(?:\.|$)")


def hookpoint_layer(hookpoint: Optional[str]) -> Optional[int]:
    """The encoder-layer index a text-encoder SAE's hookpoint names (``text_model.encoder.layers.8`` -> 8,
    ``blocks.8.hook_resid_post`` -> 8), or ``None`` when it names none (or is not a string)."""
    if not isinstance(hookpoint, str):
        return None
    found = _HOOK_LAYER_RE.findall(hookpoint)
    return int(found[-1]) if found else None


def default_layer(num_layers: int) -> int:
    """The layer used when neither the node nor the SAE names one: two thirds of the way up the encoder,
    which is ItD's layer 8 of CLIP-L's 12."""
    return max(0, min(num_layers - 1, (2 * num_layers) // 3))


def _encoder_width(encoder: Any) -> Optional[int]:
    try:
        return int(encoder.transformer.get_input_embeddings().weight.shape[-1])
    except (AttributeError, IndexError, TypeError):
        return None


def describe_encoder(clip: Any) -> str:
    """``"SD2ClipModel with clip_h (width 1024)"``: the text encoder class and its sub-encoders."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None:
        return f"{type(clip).__name__} without a text encoder"
    parts = []
    for name, child in model.named_children():
        width = _encoder_width(child)
        parts.append(f"{name} (width {width})" if width is not None else name)
    inner = f" with {', '.join(parts)}" if parts else ""
    return f"{type(model).__name__}{inner}"


def supported_clip_l(clip: Any) -> tuple[Any, str]:
    """``(clip_l module, family)`` for an SD1.x or SDXL CLIP; a ValueError naming the encoder otherwise."""
    import comfy.clip_model
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if clip is None or not hasattr(clip, "cond_stage_model") or not hasattr(clip, "patcher"):
        raise ValueError(f"clip: {NODE_NAME} needs a CLIP (got {type(clip).__name__}; does the checkpoint have a "
                         "text encoder?)")
    model = clip.cond_stage_model
    if isinstance(model, comfy.sdxl_clip.SDXLClipModel):
        family = "SDXL"
    elif isinstance(model, comfy.sd1_clip.SD1ClipModel) and getattr(model, "clip", None) == ENCODER_KEY:
        family = "SD1"
    else:
        raise ValueError(
            f"clip: {NODE_NAME} edits a CLIP-L text encoder (SD1.x clip_l, or SDXL's clip_l); this CLIP is "
            f"{describe_encoder(clip)}, which is not supported"
        )
    encoder = getattr(model, ENCODER_KEY, None)
    transformer = getattr(encoder, "transformer", None)
    if not isinstance(transformer, comfy.clip_model.CLIPTextModel):
        raise ValueError(
            f"clip: {NODE_NAME} needs clip_l to be ComfyUI's CLIP transformer; this CLIP ({describe_encoder(clip)}) "
            f"has {type(transformer).__name__}"
        )
    return encoder, family


def output_layer(clip: Any, encoder: Any, num_layers: int) -> Optional[int]:
    """Index of the last ``clip_l`` layer whose output reaches the conditioning (``None``: every layer can).

    SD1 outputs the last layer; SDXL's clip_l the penultimate one; CLIP Set Last Layer (``clip.layer_idx``)
    overrides both as ComfyUI does at encode time.
    """
    default = getattr(encoder, "options_default", None) or (getattr(encoder, "layer", "last"),
                                                             getattr(encoder, "layer_idx", None))
    layer, layer_idx = default[0], default[1]
    if getattr(clip, "layer_idx", None) is not None and layer != "all":
        idx = int(clip.layer_idx)
        layer, layer_idx = ("last", None) if abs(idx) > num_layers else ("hidden", idx)
    if layer == "last":
        return num_layers - 1
    if layer == "hidden" and layer_idx is not None:
        return int(layer_idx) % num_layers if int(layer_idx) < 0 else int(layer_idx)
    return None


def choose_layer(layer: int, sae: SparseAutoencoder, num_layers: int) -> tuple[int, str]:
    """``(layer index, where it came from)``; ``layer = -1`` means the SAE's hookpoint, else ItD's default."""
    layer = int(layer)
    if layer >= 0:
        origin = "set on the node"
    else:
        hooked = hookpoint_layer(getattr(sae.cfg, "hookpoint", None))
        if hooked is not None:
            layer, origin = hooked, f"the SAE's hookpoint {sae.cfg.hookpoint!r}"
        else:
            layer, origin = default_layer(num_layers), "default (the SAE records no layer)"
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer: clip_l layer {layer} ({origin}) is out of range; this CLIP's clip_l has "
                         f"{num_layers} layers (0..{num_layers - 1})")
    return layer, origin


# ---------------------------------------------------------------------------------------------
# calibration through ComfyUI's tokenizer
# ---------------------------------------------------------------------------------------------


def _tokenizer_of(clip: Any) -> Any:
    return getattr(clip.tokenizer, ENCODER_KEY, None)


def comfy_tokenize_fn(clip: Any) -> tuple[Callable[[Sequence[str]], PromptBatch], int]:
    """``(tokenize, padded length)``: ComfyUI's own tokenization of ``clip_l`` (``clip.tokenize(text)["l"]``).

    Only the first 77-token chunk of a prompt is used (a warning names longer prompts); prompts with a
    textual-inversion embedding are refused, calibration needs plain token ids.
    """
    end = getattr(_tokenizer_of(clip), "end_token", None)
    end = int(end) if isinstance(end, int) else 49407
    length = len(clip.tokenize("")["l"][0])

    def first_chunk(prompt: str) -> list[int]:
        chunks = clip.tokenize(prompt)["l"]
        if len(chunks) > 1:
            log.warning("%s: prompt %r is longer than one 77-token chunk; only its first chunk is used for "
                        "calibration", NODE_NAME, prompt)
        ids = []
        for item in chunks[0]:
            token = item[0]
            if not isinstance(token, int):
                raise ValueError(f"{NODE_NAME}: prompt {prompt!r} contains a textual-inversion embedding; concept "
                                 "and retain prompts must be plain text")
            ids.append(int(token))
        if len(ids) != length:
            raise ValueError(f"{NODE_NAME}: prompt {prompt!r} tokenized to {len(ids)} tokens, expected {length}")
        return ids

    def tokenize(prompts: Sequence[str]) -> PromptBatch:
        rows = [first_chunk(p) for p in prompts]
        ids = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for r, row in enumerate(rows):
            stop = next((i for i in range(1, len(row)) if row[i] == end), len(row) - 1)
            mask[r, : stop + 1] = True
        return PromptBatch(ids, mask)

    return tokenize, length


def _run_clip_l(encoder: Any, batch: PromptBatch) -> Any:
    """``clip_l`` on token ids, exactly as ``encode_token_weights`` runs it."""
    return encoder([[int(t) for t in row] for row in batch.input_ids.tolist()])


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


class _EncodeContext(NamedTuple):
    sections: int
    labels: list[str]


class ItDClipPatch:
    """The object patch on one ``clip_l`` encoder layer's ``forward`` (and on ``clip_l.encode_token_weights``).

    Called as the layer's forward: runs the original forward, then the gated ItD edit on its output. The
    decision of every call is logged and kept in ``history``; ``last`` / ``last_scores`` / ``last_detected``
    give the most recent one. Not an ``nn.Module`` on purpose: ComfyUI sets it as an attribute of the layer,
    and a module there would join the CLIP's state dict.
    """

    def __init__(
        self,
        itd: ItDPatch,
        original_forward: Callable[..., Any],
        original_encode: Callable[..., Any],
        layer: int,
        family: str,
        tokenizer: Any = None,
    ) -> None:
        self.itd = itd
        self.original_forward = original_forward
        self.original_encode = original_encode
        self.layer = int(layer)
        self.family = family
        self.tokenizer = tokenizer
        self.history: deque[ItDEncodeRecord] = deque(maxlen=MAX_RECORDS)
        self._context: Optional[_EncodeContext] = None

    # -- what the user sees -------------------------------------------------------------------
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
        return (f"ItDClipPatch({self.family} clip_l layer {self.layer}, concepts={self.concepts.concept_names}, "
                f"tau={self.tau:.4g}, features={self.concepts.features.numel()})")

    # -- labels -------------------------------------------------------------------------------
    def _label(self, row: Sequence[Any]) -> str:
        tok = self.tokenizer
        inv = getattr(tok, "inv_vocab", None) or {}
        start, end = getattr(tok, "start_token", None), getattr(tok, "end_token", None)
        words = []
        for item in row:
            token = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(token, int):
                words.append("<embedding> ")
                continue
            if token == start and not words:
                continue
            if token == end:
                break
            words.append(str(inv.get(token, f"<{token}>")).replace("</w>", " "))
        return "".join(words).strip()

    # -- the two patched callables ------------------------------------------------------------
    def encode_token_weights(self, token_weight_pairs: Any) -> Any:
        """Stands in for ``clip_l.encode_token_weights``: notes the real chunks, then encodes as usual."""
        sections = len(token_weight_pairs)
        labels = [self._label(row) for row in token_weight_pairs]
        if sections > 1:
            labels = [f"{text} [chunk {i + 1}/{sections}]" for i, text in enumerate(labels)]
        outer = self._context
        self._context = _EncodeContext(sections, labels)
        try:
            return self.original_encode(token_weight_pairs)
        finally:
            self._context = outer

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.gate(self.original_forward(x, *args, **kwargs))

    @torch.no_grad()
    def gate(self, hidden: Tensor) -> Tensor:
        """The gated edit of one layer output ``[rows, 77, d]``; the empty row of a weighted prompt is kept."""
        rows = int(hidden.shape[0])
        ctx = self._context
        real = rows if ctx is None else max(0, min(ctx.sections, rows))
        if real == 0:
            return hidden
        part = hidden if real == rows else hidden[:real]
        result = self.itd.apply(part)
        labels = ctx.labels[:real] if ctx is not None else [f"row {i}" for i in range(real)]
        self._record(labels, result.scores, result.detected)
        if not bool(result.detected.any()):
            return hidden  # nothing detected: the layer's own output continues, untouched
        if real == rows:
            return result.hidden
        return torch.cat([result.hidden, hidden[real:]], dim=0)

    def _record(self, labels: list[str], scores: Tensor, detected: Tensor) -> None:
        record = ItDEncodeRecord(list(labels), scores.detach().float().cpu(), detected.detach().cpu(), self.tau)
        self.history.append(record)
        for label, score, hit in zip(record.prompts, record.scores.tolist(), record.detected.tolist()):
            log.info(
                "%s: %r score %.4g %s tau %.4g -> %s", NODE_NAME, label, score, ">=" if hit else "<", self.tau,
                f"concept features deactivated at clip_l layer {self.layer}" if hit else "passed through unchanged",
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


def build_classifier(
    clip: Any,
    sae: SparseAutoencoder,
    concepts: list[str],
    retain: list[str],
    layer: int = -1,
    scale: float = -8.0,
    margin: float = 0.99,
    top_n: int = 128,
    progress: Optional[Progress] = None,
) -> ItDClassifier:
    """Interpret, calibrate and install the ItD classifier on a clone of ``clip`` (the input is not changed)."""
    if not concepts:
        raise ValueError("concepts: the concept list is empty (write one concept per line or comma-separated)")
    if sae is None or not all(hasattr(sae, a) for a in ("encoder", "W_dec", "b_dec", "cfg")):
        raise ValueError(f"sae: expected an SAE from Load SAE, got {type(sae).__name__}")
    if not 0 < float(margin) <= 1:
        raise ValueError(f"threshold_margin: must be in (0, 1], got {margin}")
    if int(top_n) < 1:
        raise ValueError(f"top_n: must be at least 1, got {top_n}")
    if float(scale) == 1.0:
        raise ValueError("scale: 1 leaves the concept features unchanged; use a negative strength such as -8")
    encoder, family = supported_clip_l(clip)
    layers = encoder.transformer.text_model.encoder.layers
    num_layers = len(layers)
    index, origin = choose_layer(layer, sae, num_layers)
    width = _encoder_width(encoder)
    math = SaeMath(sae)
    if width is not None:
        math.check_width(width, f"the CLIP's clip_l layer {index} ({family})")
    last = output_layer(clip, encoder, num_layers)
    if last is not None and index > last:
        raise ValueError(
            f"layer: clip_l layer {index} ({origin}) comes after layer {last}, the last one whose output this "
            f"{family} CLIP uses; editing it would change nothing. Pick a layer <= {last}."
        )
    retain = [p for p in retain if p not in set(concepts)]

    # Calibrate in the deployment regime: ComfyUI's tokenizer, 77 tokens, clip_l run one prompt at a time,
    # with this CLIP's own weights (its LoRAs included) loaded as for encoding.
    clip.load_model()
    tokenize, length = comfy_tokenize_fn(clip)
    source = TextLayerSource(encoder, index, tokenize, run=_run_clip_l, pad_to=length, batch_size=1)
    throw_if_interrupted()
    if progress is not None:
        progress.update(1)
    try:
        found = build_concepts(
            sae, source, {c: [c] for c in concepts}, retain, top_n=int(top_n), scale=float(scale),
            margin=float(margin), positions="content", pad_token="eos", score_retain=True,
        )
    except ValueError as err:
        raise ValueError(f"{NODE_NAME}: {err}") from err
    found.extra.update({"family": family, "layer_origin": origin, "comfy_tokenizer": True})
    throw_if_interrupted()
    if progress is not None:
        progress.update(2)

    itd = ItDPatch(encoder, sae, found, layer=index, on_length_mismatch="warn", check_fingerprint=False)
    patched = clip.clone()
    key = layer_key(index)
    patch = ItDClipPatch(
        itd,
        patched.patcher.get_model_object(key),
        patched.patcher.get_model_object(ENCODE_KEY),
        index,
        family,
        tokenizer=_tokenizer_of(clip),
    )
    patched.patcher.add_object_patch(key, patch)
    patched.patcher.add_object_patch(ENCODE_KEY, patch.encode_token_weights)
    report = calibration_report(found, concepts, retain, index, origin, family, math)
    return ItDClassifier(patched, patch, report)


def calibration_report(
    found: ItDConcepts,
    concepts: list[str],
    retain: list[str],
    layer: int,
    origin: str,
    family: str,
    math: SaeMath,
) -> str:
    """The STRING output: features, the threshold, and every calibration prompt's score."""
    cal = found.calibration
    tau = float(found.tau)
    lines = [
        f"{NODE_NAME}: {family} clip_l layer {layer} ({origin}); SAE d_in={math.d_in}, "
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


# ---------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------


class ItDPromptClassifier:
    """Erase concepts in the text encoder: SAE features deactivated for prompts the zero-shot classifier flags."""

    DESCRIPTION = (
        "ItD (Interpret then Deactivate): finds the SAE features of the concepts at one CLIP-L layer (minus those "
        "of the retain prompts), calibrates a threshold on the concept prompts' scores, and returns a copy of the "
        "CLIP whose text encoding deactivates those features (scales them by 'scale') for every prompt scoring "
        "at or above the threshold. Prompts below it are encoded exactly as by the input CLIP. The report lists "
        "the calibration scores; each encoded prompt's score is logged. SD1.x and SDXL (clip_l only). "
        "Wire the patched CLIP to the positive prompt only."
    )
    CATEGORY = category("itd")
    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "report")
    OUTPUT_TOOLTIPS = (
        "A copy of the CLIP whose clip_l layer deactivates the concept features of prompts the classifier "
        "flags. Use it for the positive prompt only; encode the negative prompt with the original CLIP.",
        "The calibration: feature counts, the threshold, its margin against the retain prompts, and the score "
        "of every concept and retain prompt.",
    )
    FUNCTION = "classify"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": inp("CLIP", "The text encoder (SD1.x, or SDXL whose clip_l is edited). It is not modified."),
                "sae": inp(SAE_TYPE, "An SAE trained on one layer of this CLIP-L text encoder (width 768 for the "
                                     "real CLIP-L), from Load SAE."),
                "concepts": inp("STRING", "Concepts to erase, one per line or comma-separated, written as you would "
                                          "prompt them (e.g. 'Van Gogh', 'nudity'). Each is also a calibration "
                                          "prompt: the threshold is set so that all of them are caught.",
                                multiline=True, default="Van Gogh"),
                "retain_prompts": inp("STRING", "Prompts that must stay unchanged, one per line (e.g. other artists). "
                                                "Their features are excluded from the concepts' and their scores show "
                                                "how far below the threshold they stay.",
                                      multiline=True, default="Claude Monet\nPablo Picasso\na photo of a dog"),
                "layer": inp("INT", "clip_l encoder layer the SAE reads (0-based; ItD uses 8 of 12). -1 = the "
                                    "layer the SAE was trained on (its hookpoint), else 2/3 of the way up.",
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
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def classify(self, clip: Any, sae: SparseAutoencoder, concepts: str, retain_prompts: str = "", layer: int = -1,
                 scale: float = -8.0, threshold_margin: float = 0.99, top_n: int = 128,
                 unique_id: Optional[str] = None) -> tuple[Any, str]:
        names = parse_names(concepts)
        if not names:
            raise ValueError("concepts: the concept list is empty (write one concept per line or comma-separated)")
        with Progress(3, NODE_NAME, node_id=unique_id) as bar:
            result = build_classifier(clip, sae, names, parse_prompts(retain_prompts), int(layer), float(scale),
                                      float(threshold_margin), int(top_n), progress=bar)
        log.info("%s installed: %r\n%s", NODE_NAME, result.patch, result.report)
        return (result.clip, result.report)


NODE_CLASS_MAPPINGS = {node_id("ItDPromptClassifier"): ItDPromptClassifier}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("ItDPromptClassifier"): NODE_NAME}
