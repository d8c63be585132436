"""Patching one layer of a ComfyUI CLIP's ``clip_l`` encoder on a clone: finding it, and a chunk-aware patch.

The mechanism, not a method: a method subclasses :class:`ClipLayerPatch` with its own :meth:`~ClipLayerPatch.edit`
of the layer's output, and :func:`install_layer_patch` sets it on a ``clone()`` of the CLIP as two object
patches (the layer's ``forward`` and ``clip_l.encode_token_weights``); the input CLIP is never changed.

Which rows are prompt chunks. ComfyUI encodes a prompt as one row per 77-token chunk, plus one empty-prompt
row when any token carries a weight other than 1 (the reference the weights interpolate from). The wrapper of
``encode_token_weights`` notes how many rows are real chunks (and a readable label of each), so an edit sees
only those rows; the empty row always passes through.

Supported encoders: SD1.x (``SD1ClipModel`` with ``clip_l``) and SDXL (``SDXLClipModel``: its ``clip_l``;
``clip_g`` and the pooled output it provides are untouched). Anything else is refused with a message naming
what was found.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "ENCODER_KEY",
    "ENCODE_KEY",
    "LAYERS_PATH",
    "ClipLayerPatch",
    "clip_l_encoder",
    "describe_encoder",
    "encoder_width",
    "install_layer_patch",
    "layer_key",
    "output_layer",
    "run_encoder",
]

ENCODER_KEY = "clip_l"
"""Attribute of the CLIP's ``cond_stage_model`` holding the CLIP-L encoder."""

LAYERS_PATH = "transformer.text_model.encoder.layers"
"""Where ComfyUI's ``SDClipModel`` keeps its encoder layers."""

ENCODE_KEY = f"{ENCODER_KEY}.encode_token_weights"
"""Object-patch name of the wrapper that tells the layer patch which rows are real prompt chunks."""


def layer_key(index: int) -> str:
    """Object-patch name of the forward of ``clip_l``'s encoder layer ``index``."""
    return f"{ENCODER_KEY}.{LAYERS_PATH}.{int(index)}.forward"


def encoder_width(encoder: Any) -> Optional[int]:
    """Residual width of a ComfyUI text encoder (its token embedding width), or None."""
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
        width = encoder_width(child)
        parts.append(f"{name} (width {width})" if width is not None else name)
    inner = f" with {', '.join(parts)}" if parts else ""
    return f"{type(model).__name__}{inner}"


def clip_l_encoder(clip: Any, who: str) -> tuple[Any, str]:
    """``(clip_l module, family)`` for an SD1.x or SDXL CLIP; a ValueError naming the encoder (and ``who``)
    otherwise."""
    import comfy.clip_model
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if clip is None or not hasattr(clip, "cond_stage_model") or not hasattr(clip, "patcher"):
        raise ValueError(f"clip: {who} needs a CLIP (got {type(clip).__name__}; does the checkpoint have a "
                         "text encoder?)")
    model = clip.cond_stage_model
    if isinstance(model, comfy.sdxl_clip.SDXLClipModel):
        family = "SDXL"
    elif isinstance(model, comfy.sd1_clip.SD1ClipModel) and getattr(model, "clip", None) == ENCODER_KEY:
        family = "SD1"
    else:
        raise ValueError(
            f"clip: {who} edits a CLIP-L text encoder (SD1.x clip_l, or SDXL's clip_l); this CLIP is "
            f"{describe_encoder(clip)}, which is not supported"
        )
    encoder = getattr(model, ENCODER_KEY, None)
    transformer = getattr(encoder, "transformer", None)
    if not isinstance(transformer, comfy.clip_model.CLIPTextModel):
        raise ValueError(
            f"clip: {who} needs clip_l to be ComfyUI's CLIP transformer; this CLIP ({describe_encoder(clip)}) "
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


def run_encoder(encoder: Any, input_ids: Tensor) -> Any:
    """``clip_l`` on token ids ``[B, L]``, exactly as ``encode_token_weights`` runs it."""
    return encoder([[int(t) for t in row] for row in input_ids.tolist()])


class _EncodeContext(NamedTuple):
    sections: int
    labels: list[str]


class ClipLayerPatch:
    """The object patch on one ``clip_l`` encoder layer's ``forward`` (and on ``clip_l.encode_token_weights``).

    Called as the layer's forward: runs the original forward, then :meth:`edit` on the rows that are prompt
    chunks. Not an ``nn.Module`` on purpose: ComfyUI sets it as an attribute of the layer, and a module there
    would join the CLIP's state dict.
    """

    def __init__(self, original_forward: Callable[..., Any], original_encode: Callable[..., Any], layer: int,
                 tokenizer: Any = None) -> None:
        self.original_forward = original_forward
        self.original_encode = original_encode
        self.layer = int(layer)
        self.tokenizer = tokenizer
        self._context: Optional[_EncodeContext] = None

    def edit(self, hidden: Tensor, labels: list[str]) -> Optional[Tensor]:
        """The edited layer output of the prompt-chunk rows ``[rows, 77, d]`` (``labels``: one text per row),
        or ``None`` to leave them as they are."""
        raise NotImplementedError

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
        """The layer output ``[rows, 77, d]`` with :meth:`edit` applied to the prompt-chunk rows; the same
        tensor when nothing is edited."""
        rows = int(hidden.shape[0])
        ctx = self._context
        real = rows if ctx is None else max(0, min(ctx.sections, rows))
        if real == 0:
            return hidden
        part = hidden if real == rows else hidden[:real]
        labels = ctx.labels[:real] if ctx is not None else [f"row {i}" for i in range(real)]
        edited = self.edit(part, labels)
        if edited is None:
            return hidden  # the layer's own output continues, untouched
        if real == rows:
            return edited
        return torch.cat([edited, hidden[real:]], dim=0)


def install_layer_patch(clip: Any, layer: int, make: Callable[[Callable[..., Any], Callable[..., Any]],
                                                              ClipLayerPatch]) -> tuple[Any, ClipLayerPatch]:
    """``(patched clone of clip, the patch)``: ``make(original_forward, original_encode)`` builds the patch
    for ``clip_l`` layer ``layer``; the input CLIP is not changed."""
    patched = clip.clone()
    key = layer_key(layer)
    patch = make(patched.patcher.get_model_object(key), patched.patcher.get_model_object(ENCODE_KEY))
    patched.patcher.add_object_patch(key, patch)
    patched.patcher.add_object_patch(ENCODE_KEY, patch.encode_token_weights)
    return patched, patch
