"""ItD Prompt Gate: the ItD zero-shot classifier alone, as a yes/no a graph can branch on.

It takes the CLIP that the ItD Prompt Classifier returns (its calibrated classifier rides on that CLIP's patch)
and either a prompt (STRING) or a conditioning that CLIP encoded (CONDITIONING; SD1.x: the classifier's decision
travels in the conditioning), and outputs whether any 77-token chunk of the prompt reaches the threshold, the
highest chunk score and the threshold. A graph can then block, rewrite or reroute a flagged prompt (e.g. with a
switch node) instead of, or besides, encoding it with the concept features deactivated.

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

__all__ = ["ItDPromptGate", "find_itd_patch", "gate_decision"]


def find_itd_patch(clip: Any) -> ItDClipPatch:
    """The ItD patch on a CLIP from ItD Prompt Classifier; a ValueError naming the input otherwise."""
    patches = getattr(getattr(clip, "patcher", None), "object_patches", None) or {}
    found = [p for p in patches.values() if isinstance(p, ItDClipPatch)]
    if not found:
        raise ValueError(f"clip: {NODE_NAME} needs the CLIP output of the ItD Prompt Classifier (this CLIP carries "
                         "no ItD classifier)")
    return found[-1]


def _from_conditioning(conditioning: Any) -> dict:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("conditioning: expected a CONDITIONING from CLIP Text Encode")
    decisions = [c[1].get(CONDITIONING_KEY) for c in conditioning if len(c) > 1 and isinstance(c[1], dict)]
    decisions = [d for d in decisions if d]
    if not decisions:
        raise ValueError(f"conditioning: it carries no ItD decision; encode the prompt with the CLIP of the ItD "
                         f"Prompt Classifier (SD1.x), or wire the prompt text into {NODE_NAME} instead")
    chunks = [c for d in decisions for c in d["chunks"]]
    scores = [float(s) for d in decisions for s in d["scores"]]
    flagged = [bool(f) for d in decisions for f in d["flagged"]]
    return {"chunks": chunks, "scores": scores, "flagged": flagged, "tau": float(decisions[0]["tau"])}


def gate_decision(clip: Any, text: str = "", conditioning: Any = None) -> dict:
    """``{"chunks", "scores", "flagged", "tau"}`` of a prompt (or of a conditioning the ItD CLIP encoded)."""
    patch = find_itd_patch(clip)
    if conditioning is not None:
        return _from_conditioning(conditioning)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text: {NODE_NAME} needs a prompt (or a conditioning wired in)")
    start = patch.calls
    with torch.no_grad():
        clip.encode_from_tokens(clip.tokenize(text))
    if patch.calls == start:
        raise RuntimeError(f"{NODE_NAME}: encoding the prompt did not reach the ItD classifier's layer")
    record = patch.history[-1]
    return {"chunks": list(record.prompts), "scores": record.scores.tolist(), "flagged": record.detected.tolist(),
            "tau": float(record.tau)}


class ItDPromptGate:
    """Is this prompt flagged by the ItD classifier? BOOLEAN + score, for branching a graph."""

    DESCRIPTION = (
        "The ItD zero-shot classifier as a switch: given the CLIP from ItD Prompt Classifier and a prompt (or a "
        "conditioning that CLIP encoded, SD1.x), outputs whether the prompt is flagged (any 77-token chunk scoring at "
        "or above the threshold), its highest chunk score and the threshold, so a graph can block, rewrite or reroute "
        "flagged prompts. The per-chunk scores and decisions are shown on the node."
    )
    CATEGORY = category("itd")
    OUTPUT_NODE = True  # runs (and shows its decision) even when nothing is wired to its outputs
    RETURN_TYPES = ("BOOLEAN", "FLOAT", "FLOAT")
    RETURN_NAMES = ("flagged", "score", "threshold")
    OUTPUT_TOOLTIPS = (
        "True when the classifier flags the prompt (its concept features would be deactivated).",
        "The prompt's classifier score (the highest over its chunks).",
        "The calibrated threshold tau the score is compared with.",
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
                "conditioning": inp("CONDITIONING", "A conditioning encoded by the ItD Prompt Classifier's CLIP (SD1.x); "
                                                    "its recorded decision is used instead of the text."),
            },
        }

    def gate(self, clip: Any, text: str = "", conditioning: Optional[Any] = None) -> dict:
        d = gate_decision(clip, text, conditioning)
        flagged = any(d["flagged"])
        score = max(d["scores"]) if d["scores"] else 0.0
        lines = [f"{'FLAGGED' if flagged else 'passed'}: score {score:.6g} {'>=' if flagged else '<'} tau {d['tau']:.6g}"]
        lines += [f"  {s:12.6g}  {'EDIT' if f else 'keep'}  {c}" for c, s, f in zip(d["chunks"], d["scores"], d["flagged"])]
        return {"ui": {"text": ["\n".join(lines)]}, "result": (bool(flagged), float(score), float(d["tau"]))}


NODE_CLASS_MAPPINGS = {node_id("ItDPromptGate"): ItDPromptGate}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("ItDPromptGate"): NODE_NAME}
