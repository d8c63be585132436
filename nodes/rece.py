"""RECE / UCE nodes: RECE Edit Model and Save Edit as LoRA.

* **RECE Edit Model** erases concepts from the wired MODEL with the closed-form UCE edit, optionally followed
  by RECE epochs (:func:`sae_core.rece.run_rece`, the pipeline the MiniCanvas bench runs too; method brief
  ``methods/rece.md``); its inputs are the fields of :class:`sae_core.rece.RECESettings`. It reads every
  cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight of the UNet, encodes the concept, anchor and preserve
  prompts with the wired CLIP (the conditioning the UNet sees), solves in float64 and returns a ``clone()`` of
  the model with the edit as LoRA weight patches (the patches the saved LoRA file loads as), plus the edit itself
  (type ``CE_EDIT``: the exact low-rank factors of every weight's delta and a description), the leak probe, the
  concept's conditioning, and each layer's relative weight change as a text table (on the node) and a bar chart
  (the IMAGE output).
* **Save Edit as LoRA** writes a ``CE_EDIT`` as a LoRA file into ``models/loras`` (the stock LoraLoader finds
  it there) and outputs it as ComfyUI's ``LORA_MODEL`` (for LoraModelLoader and Save LoRA Weights).

How the weights are read. A ComfyUI model shares its ``nn.Module`` with every clone; after sampling, the
module holds the weights of whichever clone was loaded last (with that clone's LoRAs applied). The node
therefore never reads the module's current values: it asks the patcher for each key's original weight and
this MODEL's own patches (``get_key_patches``) and applies them with ``comfy.lora.calculate_weight``, so
upstream LoRAs count and other branches of the graph do not. Nothing of the input MODEL is modified.

Token positions (brief section 1.4). UCE aligns the concept and the anchor from their last word token
(last word -> last word, EOS -> EOS, padding -> padding); RECE's epochs use every position of the bare
concept prompt against every position of the anchor. Preserve prompts (always including the empty prompt,
the unconditional branch of classifier-free guidance) contribute every position. Only the first chunk of
each prompt is used: 77 tokens for CLIP, 16 for MiniCanvas (the length comes from the CLIP's tokenizer).

SDXL's pooled text vector. SDXL also reads clip_g's pooled output, through the ADM input: the first layer of
``label_emb`` (``diffusion_model.label_emb.0.0.weight``, ``[time_embed_dim, adm_in]``) takes ``[pooled, size
embeddings]``. A cross-attention edit leaves that path alone, so the concept still reaches the UNet through it. With
``edit_pooled`` (default on) the node also edits the pooled columns of that layer with UCE's closed form
(concept pooled vectors to the anchor's, preserve prompts' kept; ridge ``pooled_lambda`` relative to the vectors'
scale). RECE's epochs act on the cross-attention only (:mod:`sae_core.rece.pooled` says why); the leak probe's
``pooled_output`` is the adversarial pooled vector against the edited layer. The size columns never change. Which
columns are pooled is checked through ComfyUI's own ``encode_adm``; a model whose ADM input is not the prompt's
pooled vector (SD1.x and SD2.x have none; SD2.1 unCLIP's is an image embedding) has nothing to edit there, as the
node's table says.

Supported: SD1.x, SD2.x and SDXL UNets (every ``attn2`` layer; the context width is the CLIP's conditioning
width: 768, 1024 or 2048) and MiniCanvas (the pack's built-in model: 128-wide context, 16-token prompts).
Other model families are refused with a message.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import folder_paths
import torch
from torch import Tensor

from sae_core.amnesia.lora import save_lora
from sae_core.plots import image_tensor, layer_change_chart
from sae_core.prompts import parse_names
from sae_core.rece import METHODS, LowRankDeltas, PooledInput, RECESettings, run_rece

from .clip_text import encode_first_chunks
from .common import Progress, category, comfy_device, inp, node_id, throw_if_interrupted
from .families import MINICANVAS, SD_FAMILIES, require_family

log = logging.getLogger("concept_erasure")

EDIT_TYPE = "CE_EDIT"
"""Socket type of a closed-form weight edit (a :class:`CEEdit`)."""

LORA_MODEL_TYPE = "LORA_MODEL"
"""ComfyUI's type of an in-memory LoRA (``comfy_extras/nodes_train.py``): a dict of tensors."""

DEVICE_CHOICES = ("auto", "cpu")

UNET_PREFIX = "diffusion_model."

SUPPORTED_FAMILIES = (*SD_FAMILIES, MINICANVAS)
"""Model families (:mod:`.families`; subclasses count) whose cross-attention RECE edits: ComfyUI's Stable Diffusion
UNets and the pack's MiniCanvas."""

_REFUSED_SUBCLASSES = ("SD_X4Upscaler", "LotusD")
"""Subclasses of a supported family whose cross-attention does not read the text prompt."""

_KV_RE = re.compile(r"^diffusion_model\..*\.attn2\.to_[kv]\.weight$")

ADM_KEY = "diffusion_model.label_emb.0.0.weight"
"""The first layer of the ADM input (SDXL: ``[pooled text, size embeddings]`` -> time embedding)."""


# ---------------------------------------------------------------------------------------------
# the edit object
# ---------------------------------------------------------------------------------------------


@dataclass
class CEEdit:
    """A closed-form edit of a UNet's weights (the ``CE_EDIT`` socket type).

    Keys are the model's state-dict keys (``diffusion_model.….attn2.to_k.weight``, and on SDXL
    ``diffusion_model.label_emb.0.0.weight`` for the pooled text input).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    """``key -> (up [out, r], down [r, in])`` (float32, CPU): the delta is exactly ``up @ down``; a weight stored
    whole is ``(dW, I)`` (see ``dense``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """What was erased and how (method, concepts, anchor, preserve prompts, settings, model family, pooled edit)."""
    dense: frozenset = frozenset()
    """Keys whose delta is stored whole (as ``(dW, I)``)."""
    probe: Optional[dict[str, Any]] = field(default=None, repr=False)
    """RECE's adversarial rows of each concept against the edit (``rows [k, L, ctx]``) and, when the pooled text
    input was edited, its adversarial pooled vectors (``pooled [k, P]``): what one more epoch would erase."""

    @property
    def deltas(self) -> LowRankDeltas:
        """``key -> dW``, each formed from its factors when read (float32)."""
        return LowRankDeltas(self.factors, self.dense)

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The edit as a LoRA in ComfyUI's native naming, reproducing the deltas exactly (float32).

        Per weight ``<module>.weight``: ``<module>.lora_up.weight`` = up, ``<module>.lora_down.weight`` = down
        and ``<module>.alpha`` = r (ComfyUI scales by ``alpha / r``, here exactly 1). When the factors would
        take at least as much space as the weight itself (rank ``r >= out * in / (out + in)``, e.g. many
        concepts or epochs) the delta is stored whole as ``<module>.diff``, which ComfyUI's LoRA loader
        applies the same way. SDXL's pooled text input is one more module, ``diffusion_model.label_emb.0.0``
        (ComfyUI maps every ``diffusion_model.<module>`` of the UNet's state dict).
        """
        sd: dict[str, Tensor] = {}
        deltas = self.deltas
        for key, (up, down) in self.factors.items():
            if not key.endswith(".weight"):
                raise ValueError(f"CE_EDIT: key {key!r} is not a weight key")
            module = key[: -len(".weight")]
            rank, out, inp_ = int(down.shape[0]), int(up.shape[0]), int(down.shape[1])
            if key in self.dense or rank * (out + inp_) >= out * inp_:
                sd[f"{module}.diff"] = deltas[key].detach().to("cpu", torch.float32).contiguous()
                continue
            sd[f"{module}.lora_up.weight"] = up.detach().to("cpu", torch.float32).contiguous()
            # the weights of one edit share one ``down``: a file holds a copy per module
            sd[f"{module}.lora_down.weight"] = down.detach().to("cpu", torch.float32).clone()
            sd[f"{module}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        return sd

    def __repr__(self) -> str:
        meta = self.metadata
        return (f"CEEdit({meta.get('method', '?')}: {meta.get('concepts', [])}, {len(self.factors)} weights, "
                f"max rank {max((int(d.shape[0]) for _, d in self.factors.values()), default=0)})")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def model_family(model: Any) -> str:
    """The model family name (``SD15``, ``SD20``, ``SDXL``, ``MiniCanvas``, ...) if RECE supports it; ValueError
    otherwise."""
    name = require_family(model, SUPPORTED_FAMILIES, "RECE edits the text cross-attention of")
    if name in _REFUSED_SUBCLASSES:
        raise ValueError(f"model: this model is {name}, whose cross-attention does not read the text prompt; "
                         "RECE does not edit it")
    if not any(_KV_RE.match(k) for k in model.model.state_dict().keys()):
        raise ValueError(f"model: {name} has no cross-attention (attn2.to_k / attn2.to_v) weights to edit")
    return name


def cross_attention_keys(model: Any) -> list[str]:
    """State-dict keys of every ``attn2.to_k`` / ``attn2.to_v`` weight of the UNet, in model order."""
    keys = [k for k in model.model.state_dict().keys() if _KV_RE.match(k)]
    if not keys:
        raise ValueError("model: no cross-attention (attn2.to_k / attn2.to_v) weights found")
    return keys


@torch.no_grad()
def effective_weights(model: Any, keys: list[str], device: torch.device) -> dict[str, Tensor]:
    """This MODEL's weights for ``keys`` (original weight + its own patches, e.g. upstream LoRAs), float32.

    Read through ``get_key_patches`` so that the weights another clone left in the shared module are never
    used; nothing is written to the model.
    """
    import comfy.lora
    import comfy.model_management as mm

    patches = model.get_key_patches(UNET_PREFIX)
    out: dict[str, Tensor] = {}
    for key in keys:
        if key not in patches:
            raise ValueError(f"model: weight {key} is not in the model's state dict")
        (weight, convert), *own = patches[key]
        w = mm.cast_to_device(weight, device, torch.float32, copy=True)
        w = convert(w, inplace=True)
        if own:
            w = comfy.lora.calculate_weight(own, w, key)
        out[key] = w.to(torch.float32)
    return out


class ComfyRECEHost:
    """A ComfyUI MODEL + CLIP as a :class:`sae_core.rece.PooledRECEHost`.

    Texts go through the CLIP's normal encode path (first chunk, :mod:`.clip_text`); the weights are
    the MODEL's effective ``attn2.to_k`` / ``attn2.to_v`` weights on ``device`` (:func:`effective_weights`).
    The pooled text input is the ADM layer's pooled columns when ComfyUI's own ``encode_adm`` puts the CLIP's
    pooled output there (SDXL, SDXL refiner; :func:`pooled_text_input`). Honours ComfyUI's interrupt between
    steps and advances ``progress`` once the inputs are read.
    """

    def __init__(self, model: Any, clip: Any, keys: list[str], device: torch.device,
                 progress: Optional[Progress] = None) -> None:
        self.model, self.clip, self.keys, self.device, self.progress = model, clip, keys, device, progress

    def encode(self, texts: list[str]) -> tuple[Tensor, list[int]]:
        out = encode_first_chunks(self.clip, texts, "RECE")
        throw_if_interrupted()
        return out

    def projection_weights(self) -> dict[str, Tensor]:
        weights = effective_weights(self.model, self.keys, self.device)
        throw_if_interrupted()
        if self.progress is not None:
            self.progress.update(1)
        return weights

    def encode_pooled(self, texts: list[str]) -> Tensor:
        """The CLIP's pooled output ``[n, P]`` of each text (its first chunk's, the one ComfyUI conditions on)."""
        return torch.stack([pooled_output(self.clip, text) for text in texts]).to(self.device)

    def pooled_input(self) -> Optional[PooledInput]:
        """The ADM layer and its pooled columns, or None when the model reads no pooled text vector."""
        if ADM_KEY not in self.model.model.state_dict():
            return None
        return pooled_text_input(self.model, pooled_output(self.clip, ""), self.device)


def pooled_output(clip: Any, text: str) -> Tensor:
    """The pooled output ``[P]`` (float32, CPU) ``clip`` gives ``text``, as CLIPTextEncode conditions on it."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    pooled = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    if not isinstance(pooled, Tensor):
        raise ValueError(f"clip: encoding {text!r} gave no pooled output, but the model reads one; wire the text "
                         "encoder of this checkpoint")
    row = pooled.detach().reshape(pooled.shape[0], -1)[0].to("cpu", torch.float32)
    if not torch.isfinite(row).all():
        raise ValueError(f"clip: the pooled output of {text!r} contains NaN or Inf")
    throw_if_interrupted()
    return row


def pooled_text_input(model: Any, pooled: Tensor, device: torch.device) -> Optional[PooledInput]:
    """Where ``model`` reads the pooled text vector: ``PooledInput(ADM_KEY, W1, P)``, or None.

    ``pooled [P]`` is one pooled output of the CLIP. The model's own ``encode_adm`` builds the ADM input from it;
    the pooled columns are the first ``P`` when they hold that vector unchanged (SDXL's and the refiner's layout).
    A model without ``label_emb``, or whose ADM input does not carry the vector (SD2.1 unCLIP's is an image
    embedding), gives None. A CLIP whose pooled width does not fit the ADM input is an error.
    """
    if ADM_KEY not in model.model.state_dict():
        return None
    vec = pooled.reshape(1, -1).to("cpu", torch.float32)
    with torch.no_grad():
        adm = model.model.encode_adm(pooled_output=vec, device=torch.device("cpu"), width=1024, height=1024,
                                     prompt_type="positive")
    if not isinstance(adm, Tensor) or adm.dim() != 2:
        return None
    weight = effective_weights(model, [ADM_KEY], device)[ADM_KEY]
    width = int(vec.shape[1])
    if adm.shape[1] != weight.shape[1]:
        raise ValueError(f"clip: its pooled output is {width} wide, which makes a {adm.shape[1]}-wide ADM input, "
                         f"but the model's label_emb reads {weight.shape[1]}; use the text encoder that belongs to "
                         "this model")
    if not torch.allclose(adm[0, :width].float(), vec[0], rtol=1e-6, atol=1e-6):
        return None
    return PooledInput(ADM_KEY, weight, width)


# ---------------------------------------------------------------------------------------------
# the edit
# ---------------------------------------------------------------------------------------------


def compute_edit(model: Any, clip: Any, settings: RECESettings, device: torch.device,
                 progress: Optional[Progress] = None, probe: bool = False) -> CEEdit:
    """The closed-form edit of ``model``'s cross-attention (and, per ``settings.edit_pooled``, its pooled text
    input) for ``settings``, not applied: :func:`run_rece`. ``probe``: also RECE's adversarial rows against the
    edit (:attr:`CEEdit.probe`)."""
    if clip is None:
        raise ValueError("clip: no CLIP is wired (the checkpoint has no text encoder?); RECE needs it to encode "
                         "the concepts")
    family = model_family(model)
    keys = cross_attention_keys(model)
    # weights an earlier edit or LoRA already patches: this edit is computed on top of them and holds only its own change
    stacked = sum(1 for k in keys if getattr(model, "patches", {}).get(k))
    t0 = time.perf_counter()
    run = run_rece(ComfyRECEHost(model, clip, keys, device, progress), settings, progress=True, probe=probe)
    throw_if_interrupted()
    if progress is not None:
        progress.update(1)

    def cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32)

    factors = {k: (cpu(u), cpu(d)) for k, (u, d) in run.result.factors.items()}
    dense = {k for k in factors if run.result.deltas.is_dense(k)}
    changes = dict(run.changes)
    pooled_meta = None
    probe_out: Optional[dict[str, Any]] = None
    if probe:
        probe_out = {"rows": torch.stack([cpu(r) for r in run.probe]), "pooled": None}
    if run.pooled is not None:
        pooled = run.pooled
        factors.update({k: (cpu(u), cpu(d)) for k, (u, d) in pooled.result.factors.items()})
        changes[pooled.key] = pooled.relative_change
        pooled_meta = {"key": pooled.key, "columns": pooled.columns, "relative_change": pooled.relative_change,
                       "ridge": pooled.ridge}
        if probe:
            probe_out["pooled"] = torch.cat([cpu(r) for r in pooled.result.probe])
    metadata = {
        "method": settings.method, "concepts": run.concept_texts, "anchor": run.anchor,
        "preserve": run.preserve_texts, "epochs": run.epochs, "lambda_reg": settings.lambda_reg,
        "erase_scale": settings.erase_scale, "uce_preserve_scale": run.uce_preserve_scale,
        "uce_lambda": settings.uce_lambda, "preserve_scale": settings.preserve_scale, "lam": settings.lam,
        "model_family": family, "context_dim": run.context_dim, "num_weights": len(factors),
        "relative_change": run.relative_change, "layer_changes": changes, "edit_pooled": settings.edit_pooled,
        "pooled_lambda": settings.pooled_lambda, "pooled": pooled_meta, "pooled_note": run.pooled_note,
        "seconds": time.perf_counter() - t0, "stacked_on": stacked,
    }
    if stacked:
        log.warning("RECE Edit Model: %d of the %d cross-attention weights already carry patches (an earlier edit or "
                    "LoRA); the edit is computed on top of them, and its LoRA holds only this change", stacked, len(keys))
    return CEEdit(factors, metadata, frozenset(dense), probe_out)


def apply_edit(model: Any, edit: CEEdit, strength: float = 1.0) -> Any:
    """A clone of ``model`` with ``edit`` as weight patches: the patches ComfyUI's LoRA loader makes of
    :meth:`CEEdit.lora_state_dict` (low-rank where the file is, ``diff`` where it stores the delta whole), so the
    patched model and the saved LoRA loaded by LoraLoader compute the same weights.

    Raises ValueError if the model does not accept every key (ComfyUI drops unknown keys silently).
    """
    import comfy.lora

    patched = model.clone()
    modules = {k[: -len(".weight")]: k for k in edit.factors}
    patches = comfy.lora.load_lora(edit.lora_state_dict(), modules)
    accepted = set(patched.add_patches(patches, strength))
    missing = sorted(set(edit.factors) - accepted)
    if missing:
        raise ValueError(f"model: {len(missing)} edited weights were not accepted as patches, e.g. {missing[:3]}")
    return patched


# ---------------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------------


class RECEEditModel:
    """Erase concepts from a model's cross-attention in closed form (UCE, then RECE epochs)."""

    DESCRIPTION = (
        "Erases concepts (a style, an object, nudity, ...) from the model in seconds, without training: the "
        "cross-attention key/value weights are edited in closed form so the concept reads like the anchor "
        "prompt, while the preserve prompts keep their meaning (UCE), then RECE's epochs also erase the "
        "embeddings that would still bring the concept back. Returns a patched copy of the model (the input "
        "is not changed) and the edit, which Save Edit as LoRA can write as a LoRA file. On SDXL the pooled text "
        "vector (clip_g's, read through the ADM input) gets UCE's edit too unless edit_pooled is off. "
        "SD1.x, SD2.x, SDXL and MiniCanvas."
    )
    CATEGORY = category("rece")
    RETURN_TYPES = ("MODEL", EDIT_TYPE, "CONDITIONING", "CONDITIONING", "IMAGE")
    RETURN_NAMES = ("model", "edit", "leak_probe", "concept_conditioning", "change_plot")
    OUTPUT_TOOLTIPS = (
        "A copy of the model with the edit applied as weight patches on every cross-attention key/value layer (and "
        "on SDXL's pooled text input, label_emb.0.0).",
        "The edit (weight deltas and their exact low-rank factors); wire it to Save Edit as LoRA.",
        "Leak probe: RECE's adversarial embedding of the first concept against the edited weights (what one more "
        "epoch would erase): the text embedding that makes the edited model see what the original saw for the "
        "concept. Sample the edited model with it (Erasure Report's probe) to see how much of the concept is "
        "still reachable.",
        "The first concept's own conditioning (its prompt encoded by the CLIP, as CLIP Text Encode does).",
        "The per-layer table as a picture (wire it to Preview Image): the relative weight change ||dW|| / ||W|| of "
        "every cross-attention layer's to_k and to_v as bars, in UNet order (input, middle, output blocks), and "
        "SDXL's pooled text input as its own row.",
    )
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": inp("MODEL", "The diffusion model to edit (SD1.x, SD2.x, SDXL or MiniCanvas). It is not modified."),
                "clip": inp("CLIP", "The text encoder of the same checkpoint; it encodes the concepts, anchor and "
                                    "preserve prompts exactly as for sampling (a CLIP Set Last Layer applies)."),
                "concepts": inp("STRING", "Concepts to erase, one per line or comma-separated, written as you would "
                                          "prompt them (e.g. 'Van Gogh style', 'church', 'nudity'). All are "
                                          "erased together.", multiline=True, default="Van Gogh style"),
                "anchor": inp("STRING", "What the concepts should turn into. Empty (default) means the "
                                        "unconditional prompt; 'art' is the usual anchor for an artist's style.",
                              default=""),
                "preserve": inp("STRING", "Prompts whose meaning must not change, one per line or "
                                          "comma-separated (e.g. other artists). The empty prompt is always "
                                          "preserved.", multiline=True, default=""),
                "method": inp(list(METHODS), "uce: the UCE closed-form edit only. rece: UCE followed by RECE's "
                                             "epochs, which also erase the concept's adversarial embeddings "
                                             "(more robust to prompt attacks).", default="rece"),
                "epochs": inp("INT", "RECE epochs after the UCE edit (1 for styles and objects, 2-3 for nudity). "
                                     "Ignored by uce.", default=1, min=0, max=20, step=1),
                "lambda_reg": inp("FLOAT", "Ridge of RECE's adversarial embedding: 0.001 for styles and hard "
                                           "objects, 0.1 for nudity and easy objects. Smaller erases more.",
                                  default=0.001, min=0.0, max=100.0, step=0.0001, round=False),
            },
            "optional": {
                "erase_scale": inp("FLOAT", "Advanced: weight of the erase term in every edit.", default=1.0,
                                   min=0.0, max=100.0, step=0.01),
                "uce_preserve_scale": inp("FLOAT", "Advanced: weight of the preserve term in the UCE edit; -1 = "
                                                   "max(0.1, 1 / number of preserve prompts).", default=-1.0,
                                          min=-1.0, max=100.0, step=0.01),
                "uce_lambda": inp("FLOAT", "Advanced: how strongly the UCE edit stays close to the model's "
                                           "weights.", default=0.5, min=0.0, max=100.0, step=0.01),
                "preserve_scale": inp("FLOAT", "Advanced: weight of the preserve term in each RECE epoch.",
                                      default=0.1, min=0.0, max=100.0, step=0.01),
                "lam": inp("FLOAT", "Advanced: how strongly each RECE epoch stays close to the weights it starts "
                                    "from.", default=0.1, min=0.0, max=100.0, step=0.01),
                "device": inp(list(DEVICE_CHOICES), "Where to solve: auto = ComfyUI's device; cpu = system "
                                                    "memory (always float64).", default="auto"),
                "edit_pooled": inp("BOOLEAN", "SDXL: also edit the pooled text vector (clip_g's), which reaches "
                                              "the UNet through the ADM input (label_emb), not the cross-attention: "
                                              "UCE's closed form on that layer's pooled columns maps the concepts' "
                                              "pooled vectors to the anchor's and keeps the preserve prompts' (for "
                                              "rece too: the epochs act on the cross-attention only). Models "
                                              "without a pooled text input (SD1.x, SD2.x, MiniCanvas) have nothing "
                                              "to edit there; the node's table says so.", default=True),
                "pooled_lambda": inp("FLOAT", "Advanced, SDXL: ridge of the pooled edit, as a fraction of the "
                                              "pooled vectors' mean squared norm. Smaller maps the concept's "
                                              "pooled vector closer to the anchor's and moves other prompts' "
                                              "more.", default=0.001, min=0.000001, max=100.0, step=0.0001,
                                     round=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def edit(self, model: Any, clip: Any, concepts: str, anchor: str = "", preserve: str = "", method: str = "rece",
             epochs: int = 1, lambda_reg: float = 1e-3, erase_scale: float = 1.0, uce_preserve_scale: float = -1.0,
             uce_lambda: float = 0.5, preserve_scale: float = 0.1, lam: float = 0.1,
             device: str = "auto", edit_pooled: bool = True, pooled_lambda: float = 1e-3,
             unique_id: Optional[str] = None, *, probe: bool = False) -> tuple[Any, CEEdit]:
        """The patched clone and the edit; ``probe`` also computes :attr:`CEEdit.probe` (for :meth:`run`)."""
        auto_scale = float(uce_preserve_scale)
        if auto_scale < 0 and auto_scale != -1:
            raise ValueError(f"uce_preserve_scale: -1 (automatic) or a number >= 0, got {uce_preserve_scale}")
        settings = RECESettings(
            concepts=parse_names(concepts), anchor=(anchor or "").strip(), preserve=[""] + parse_names(preserve),
            method=method, epochs=int(epochs), lambda_reg=float(lambda_reg), erase_scale=float(erase_scale),
            uce_preserve_scale=None if auto_scale == -1 else auto_scale,
            uce_lambda=float(uce_lambda), preserve_scale=float(preserve_scale), lam=float(lam),
            edit_pooled=bool(edit_pooled), pooled_lambda=float(pooled_lambda))
        with Progress(3, "RECE edit", node_id=unique_id) as bar:
            edit = compute_edit(model, clip, settings, comfy_device(device), progress=bar, probe=probe)
            patched = apply_edit(model, edit)
            bar.update(1)
        meta = edit.metadata
        log.info("RECE Edit Model: %s erased %s from %d %s weights in %.2fs (relative change %.3g)%s",
                 meta["method"], meta["concepts"], meta["num_weights"], meta["model_family"], meta["seconds"],
                 meta["relative_change"], "" if meta["pooled"] is None else
                 f"; pooled text input {meta['pooled']['relative_change']:.3g}")
        return (patched, edit)

    def run(self, model: Any, clip: Any, concepts: str, anchor: str = "", preserve: str = "", method: str = "rece",
            epochs: int = 1, lambda_reg: float = 1e-3, erase_scale: float = 1.0, uce_preserve_scale: float = -1.0,
            uce_lambda: float = 0.5, preserve_scale: float = 0.1, lam: float = 0.1,
            device: str = "auto", edit_pooled: bool = True, pooled_lambda: float = 1e-3,
            unique_id: Optional[str] = None) -> dict:
        """The node: :meth:`edit`, then the leak probe, the concept's conditioning and the per-layer table (as text
        and as a chart)."""
        patched, edit = self.edit(model, clip, concepts, anchor, preserve, method, epochs, lambda_reg, erase_scale,
                                  uce_preserve_scale, uce_lambda, preserve_scale, lam, device, edit_pooled,
                                  pooled_lambda, unique_id, probe=True)
        probe, concept_cond = leak_outputs(clip, edit)
        table = change_table(edit)
        return {"ui": {"text": [table]}, "result": (patched, edit, probe, concept_cond, change_chart(edit))}


def leak_outputs(clip: Any, edit: CEEdit) -> tuple[list, list]:
    """``(leak probe CONDITIONING, concept CONDITIONING)`` of an edit computed with ``probe=True``.

    Both conditionings keep the concept encoding's extra keys. The probe replaces the first chunk's token rows by
    RECE's adversarial rows of the first concept against the edit (:attr:`CEEdit.probe`, equal to
    :func:`sae_core.rece.leak_probe` of them; the rest of a longer prompt is dropped, as RECE only reads the first
    chunk) and, when the pooled text input was edited (SDXL), ``pooled_output`` by the adversarial pooled vector;
    otherwise the concept's own pooled vector stays, which the edit did not change.
    """
    if edit.probe is None:
        raise ValueError("edit: computed without its probe (compute_edit(..., probe=True))")
    text = edit.metadata["concepts"][0]
    concept_cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    cond0, extra = concept_cond[0][0], dict(concept_cond[0][1])
    rows = edit.probe["rows"][:1]
    pooled = edit.probe.get("pooled")
    if pooled is not None:
        old = extra.get("pooled_output")
        extra["pooled_output"] = pooled[:1].to(old.device if isinstance(old, Tensor) else "cpu",
                                               old.dtype if isinstance(old, Tensor) else torch.float32)
    probe = [[rows.to(cond0.device, cond0.dtype), extra]]
    return probe, concept_cond


def change_table(edit: CEEdit) -> str:
    """The per-layer relative weight change ``||dW|| / ||W||`` of ``to_k`` and ``to_v`` as a text table, and of the
    pooled text input's columns on SDXL (or why it was not edited)."""
    meta = edit.metadata
    changes = dict(meta.get("layer_changes") or {})
    pooled = meta.get("pooled")
    layers: dict[str, dict[str, float]] = {}
    for key, value in changes.items():
        if pooled is not None and key == pooled["key"]:
            continue
        layer, _, proj = key.removeprefix(UNET_PREFIX).rpartition(".to_")
        layers.setdefault(layer, {})[proj.split(".")[0]] = value
    width = max((len(k) for k in layers), default=5)
    head = (f"{meta['method']} erased {meta['concepts']}: {meta['num_weights']} weights, relative change "
            f"{meta['relative_change']:.4g} overall")
    if pooled is None and meta.get("pooled_note"):
        head += f"; pooled text input: {meta['pooled_note']}"
    if meta.get("stacked_on"):
        head += (f"\nthe input MODEL already patched {meta['stacked_on']} of these weights (an earlier edit or LoRA): "
                 "this edit is the change on top of them, and its saved LoRA reproduces it only on top of the same "
                 "patches")
    lines = [head, f"{'layer':<{width}}  {'to_k':>9}  {'to_v':>9}"]
    for layer, row in layers.items():
        lines.append(f"{layer:<{width}}  {row.get('k', float('nan')):9.4g}  {row.get('v', float('nan')):9.4g}")
    if pooled is not None:
        name = pooled["key"].removeprefix(UNET_PREFIX).removesuffix(".weight")
        lines.append(f"pooled text input {name} (first {pooled['columns']} columns): relative change "
                     f"{pooled['relative_change']:.4g}")
    return "\n".join(lines)


def change_chart(edit: CEEdit) -> Tensor:
    """The IMAGE output ``[1, H, W, 3]``: :func:`change_table` as a bar chart
    (:func:`sae_core.plots.layer_change_chart`), one row per cross-attention layer with its ``to_k`` and ``to_v``
    bars, and SDXL's pooled text input as its own row."""
    meta = edit.metadata
    changes = dict(meta.get("layer_changes") or {})
    pooled = meta.get("pooled")
    row = None
    if pooled is not None:
        changes.pop(pooled["key"], None)
        row = (pooled["key"].removeprefix(UNET_PREFIX).removesuffix(".weight"), pooled["relative_change"])
    concepts = ", ".join(repr(c) for c in meta["concepts"])
    if len(meta["concepts"]) > 1:
        concepts = f"{len(meta['concepts'])} concepts: {concepts}"
    notes = [f"{meta['model_family']}: ||dW|| / ||W|| of each cross-attention layer; {meta['num_weights']} weights, "
             f"relative change {meta['relative_change']:.4g} overall"]
    if pooled is not None:
        notes.append(f"pooled text input: first {pooled['columns']} columns of {row[0]}")
    elif meta.get("pooled_note"):
        notes.append(f"pooled text input: {meta['pooled_note']}")
    image = layer_change_chart(changes, pooled=row, title=f"{meta['method'].upper()} erased {concepts}",
                               subtitle="\n".join(notes))
    return image_tensor(image)


DEFAULT_PREFIX = "rece/erased"
"""Save Edit as LoRA's default file name (a prefix ending in ``/`` is a folder: the files get its last part there)."""

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-/%]*$")


def _check_prefix(prefix: str) -> str:
    prefix = (prefix or "").strip().replace("\\", "/")
    if prefix.endswith("/"):  # a folder alone, as ComfyUI's save nodes take it: the files get the default name there
        prefix += DEFAULT_PREFIX.rpartition("/")[2]
    if prefix.endswith(".safetensors"):
        prefix = prefix[: -len(".safetensors")]
    parts = [p for p in prefix.split("/") if p]
    if not parts or not _PREFIX_RE.match(prefix) or any(p in (".", "..") for p in parts):
        raise ValueError(f"filename_prefix: {prefix!r} is not a usable name (letters, digits, space, _ . - and / "
                         "for sub-folders of models/loras)")
    return "/".join(parts)


def save_edit_lora(edit: CEEdit, filename_prefix: str) -> tuple[str, dict[str, Tensor]]:
    """Write ``edit`` as ``models/loras/<prefix>_NNNNN_.safetensors`` (atomically).

    Returns the file name relative to the loras folder (as LoraLoader lists it) and the LoRA state dict.
    """
    if not isinstance(edit, CEEdit):
        raise ValueError(f"edit: expected a CE_EDIT from RECE Edit Model, got {type(edit).__name__}")
    prefix = _check_prefix(filename_prefix)
    root = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(root, exist_ok=True)
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, os.path.abspath(root))
    name = f"{filename}_{counter:05}_.safetensors"
    path = os.path.join(folder, name)
    sd = edit.lora_state_dict()
    meta = {"concept_erasure_method": edit.metadata.get("method", "rece"),
            "concept_erasure_edit": {k: v for k, v in edit.metadata.items()}}
    save_lora(path, sd, metadata=meta)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
    rel = os.path.join(subfolder, name) if subfolder else name
    return rel.replace(os.sep, "/"), sd


class SaveEditAsLoRA:
    """Write a RECE/UCE edit as a LoRA file that the stock LoraLoader loads."""

    DESCRIPTION = (
        "Saves the edit from RECE Edit Model as a LoRA file in models/loras, so the stock Load LoRA node (or "
        "any LoRA-aware tool) reproduces the edited model. The LoRA is exact and stored in float32: its rank "
        "is the number of erased token rows (a layer whose factors would outweigh the weight is stored as a "
        "plain weight difference instead). Also outputs the LoRA for LoraModelLoader / Save LoRA Weights."
    )
    CATEGORY = category("rece")
    RETURN_TYPES = (LORA_MODEL_TYPE, "STRING")
    RETURN_NAMES = ("lora", "lora_name")
    OUTPUT_TOOLTIPS = (
        "The edit as an in-memory LoRA (ComfyUI's LORA_MODEL: diffusion_model.* lora_up/lora_down/alpha).",
        "The saved file's name as Load LoRA lists it.",
    )
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "edit": inp(EDIT_TYPE, "The edit from RECE Edit Model."),
                "filename_prefix": inp("STRING", "File name inside models/loras (sub-folders allowed); a counter "
                                                 "and .safetensors are appended.", default=DEFAULT_PREFIX),
            }
        }

    def save(self, edit: CEEdit, filename_prefix: str = DEFAULT_PREFIX) -> dict:
        name, sd = save_edit_lora(edit, filename_prefix)
        log.info("Save Edit as LoRA: wrote %s (%d weights)", name, len(edit.factors))
        return {"ui": {"text": [name]}, "result": (sd, name)}


NODE_CLASS_MAPPINGS = {
    node_id("RECEEditModel"): RECEEditModel,
    node_id("SaveEditAsLoRA"): SaveEditAsLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("RECEEditModel"): "RECE Edit Model",
    node_id("SaveEditAsLoRA"): "Save Edit as LoRA",
}
