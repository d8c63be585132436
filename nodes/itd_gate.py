"""ItD Prompt Gate: the ItD zero-shot classifier alone, as a yes/no a graph can branch on.

It takes the CLIP that the ItD Prompt Classifier returns (its calibrated classifier rides on that CLIP's patch)
and either a prompt (STRING) or a conditioning that CLIP encoded (CONDITIONING; SD1.x, SD2.x and the SDXL refiner:
the classifier's decision travels in the conditioning), and outputs whether any 77-token chunk of the prompt
reaches the threshold, the highest chunk score and the threshold. A graph can then block, rewrite or reroute a
flagged prompt (e.g. with a switch node) instead of, or besides, encoding it with the concept features deactivated.

Several encoders. When ItD Prompt Classifier nodes are chained on one CLIP (SDXL: one on ``clip_l``, one on
``clip_g``), every classifier is asked: the prompt is flagged when any encoder flags it, and ``score`` and
``threshold`` are those of the encoder whose score is the largest fraction of its own threshold (so ``flagged`` is
``score >= threshold``). Each encoder's chunks are shown on the node.

A STRING is classified exactly as CLIPTextEncode would classify it: it is tokenized and encoded by the ItD CLIP
(ComfyUI's own tokenizer, weights and chunking; the empty row of a weighted prompt is not classified), and the
patch's decision for that encode call is read back. The per-chunk scores and decisions are shown on the node.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .common import category, inp, node_id
from .itd import CONDITIONING_KEY, ItDClipPatch

NODE_NAME = "ItD Prompt Gate"

__all__ = ["ItDPromptGate", "find_itd_patch", "find_itd_patches", "gate_decision"]


def find_itd_patches(clip: Any) -> list[ItDClipPatch]:
    """The ItD patches on a CLIP from ItD Prompt Classifier (one per chained node), in the order they were added;
    a ValueError naming the input when there is none."""
    patches = getattr(getattr(clip, "patcher", None), "object_patches", None) or {}
    found = [p for p in patches.values() if isinstance(p, ItDClipPatch)]
    if not found:
        raise ValueError(f"clip: {NODE_NAME} needs the CLIP output of the ItD Prompt Classifier (this CLIP carries "
                         "no ItD classifier)")
    return found


def find_itd_patch(clip: Any) -> ItDClipPatch:
    """The ItD patch added last on a CLIP from ItD Prompt Classifier; a ValueError naming the input otherwise."""
    return find_itd_patches(clip)[-1]


def _decision(parts: list[dict]) -> dict:
    """One decision from each encoder's ``{"encoder", "chunks", "scores", "flagged", "tau"}``: chunk lists joined
    (labelled by encoder when there are several), ``score``/``tau`` of the encoder closest to (or furthest past)
    its threshold."""
    several = len({p["encoder"] for p in parts}) > 1

    def ratio(part: dict) -> float:
        top = max(part["scores"]) if part["scores"] else 0.0
        return top / part["tau"] if part["tau"] > 0 else (float("inf") if top > 0 else 0.0)

    deciding = max(parts, key=ratio)
    return {
        "chunks": [f"{p['encoder']}: {c}" if several else c for p in parts for c in p["chunks"]],
        "scores": [float(s) for p in parts for s in p["scores"]],
        "flagged": [bool(f) for p in parts for f in p["flagged"]],
        "taus": [float(p["tau"]) for p in parts for _ in p["scores"]],
        "score": max(deciding["scores"]) if deciding["scores"] else 0.0,
        "tau": float(deciding["tau"]),
    }


def _from_conditioning(conditioning: Any, patches: list[ItDClipPatch]) -> dict:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("conditioning: expected a CONDITIONING from CLIP Text Encode")
    decisions = [c[1].get(CONDITIONING_KEY) for c in conditioning if len(c) > 1 and isinstance(c[1], dict)]
    decisions = [d for d in decisions if d]
    if not decisions:
        raise ValueError(f"conditioning: it carries no ItD decision; encode the prompt with the CLIP of the ItD "
                         f"Prompt Classifier (SD1.x, SD2.x, SDXL refiner; SDXL's conditioning keeps none), or wire "
                         f"the prompt text into {NODE_NAME} instead")
    ours = {p.uid for p in patches}
    foreign = [d for d in decisions if d.get("classifier", next(iter(ours))) not in ours]
    if foreign:
        raise ValueError(f"conditioning: it was encoded by the CLIP of another ItD Prompt Classifier (concepts "
                         f"{foreign[0].get('concepts', '?')}) than the one wired to clip (concepts "
                         f"{[n for p in patches for n in p.concepts.concept_names]}); wire the CLIP that encoded it, "
                         "or the prompt text")
    return _decision([{"encoder": d.get("encoder", "clip_l"), "chunks": list(d["chunks"]), "scores": d["scores"],
                       "flagged": d["flagged"], "tau": float(d["tau"])} for d in decisions])


def gate_decision(clip: Any, text: str = "", conditioning: Any = None) -> dict:
    """``{"chunks", "scores", "flagged", "taus", "score", "tau"}`` of a prompt (or of a conditioning the ItD CLIP
    encoded): one entry per chunk and classified encoder in the lists, the deciding ``score`` and ``tau``."""
    patches = find_itd_patches(clip)
    if conditioning is not None:
        return _from_conditioning(conditioning, patches)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text: {NODE_NAME} needs a prompt (or a conditioning wired in)")
    starts = [patch.calls for patch in patches]
    with torch.no_grad():
        clip.encode_from_tokens(clip.tokenize(text))
    missed = [p.encoder_name for p, start in zip(patches, starts) if p.calls == start]
    if missed:
        raise RuntimeError(f"{NODE_NAME}: encoding the prompt did not reach the ItD classifier's layer of "
                           f"{', '.join(missed)}")
    parts = []
    for patch in patches:
        record = patch.history[-1]
        parts.append({"encoder": patch.encoder_name, "chunks": list(record.prompts), "scores": record.scores.tolist(),
                      "flagged": record.detected.tolist(), "tau": float(record.tau)})
    return _decision(parts)


class ItDPromptGate:
    """Is this prompt flagged by the ItD classifier? BOOLEAN + score, for branching a graph."""

    DESCRIPTION = (
        "The ItD zero-shot classifier as a switch: given the CLIP from ItD Prompt Classifier and a prompt (or a "
        "conditioning that CLIP encoded, SD1.x/SD2.x), outputs whether the prompt is flagged (any 77-token chunk "
        "scoring at or above the threshold, on any encoder an ItD node edits), its highest chunk score and the "
        "threshold, so a graph can block, rewrite or reroute flagged prompts. The per-chunk scores and decisions "
        "are shown on the node."
    )
    CATEGORY = category("itd")
    OUTPUT_NODE = True  # runs (and shows its decision) even when nothing is wired to its outputs
    RETURN_TYPES = ("BOOLEAN", "FLOAT", "FLOAT")
    RETURN_NAMES = ("flagged", "score", "threshold")
    OUTPUT_TOOLTIPS = (
        "True when the classifier flags the prompt (its concept features would be deactivated).",
        ("The prompt's classifier score (the highest over its chunks; with several classified encoders, that of "
         "the encoder whose score is the largest fraction of its threshold)."),
        "The calibrated threshold tau the score is compared with (of that same encoder).",
    )
    FUNCTION = "gate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": inp("CLIP", "The CLIP output of ItD Prompt Classifier (its classifier is used; nothing is "
                                    "modified)."),
                "text": inp("STRING", "The prompt to classify (ignored when a conditioning is wired in).",
                            multiline=True, default=""),
            },
            "optional": {
                "conditioning": inp("CONDITIONING", "A conditioning encoded by the ItD Prompt Classifier's CLIP "
                                                    "(SD1.x, SD2.x, SDXL refiner; SDXL's keeps no decision: wire the "
                                                    "text); its recorded decision is used instead of the text."),
            },
        }

    def gate(self, clip: Any, text: str = "", conditioning: Optional[Any] = None) -> dict:
        d = gate_decision(clip, text, conditioning)
        flagged = any(d["flagged"])
        score = d["score"]
        lines = [f"{'FLAGGED' if flagged else 'passed'}: score {score:.6g} {'>=' if flagged else '<'} tau {d['tau']:.6g}"]
        several = len(set(d["taus"])) > 1
        lines += [f"  {s:12.6g}  {'EDIT' if f else 'keep'}  {c}" + (f"  (tau {t:.6g})" if several else "")
                  for c, s, f, t in zip(d["chunks"], d["scores"], d["flagged"], d["taus"])]
        return {"ui": {"text": ["\n".join(lines)]}, "result": (bool(flagged), float(score), float(d["tau"]))}


NODE_CLASS_MAPPINGS = {node_id("ItDPromptGate"): ItDPromptGate}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("ItDPromptGate"): NODE_NAME}
