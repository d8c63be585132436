"""Patching one layer of a ComfyUI CLIP's text encoder on a clone: finding it, and a chunk-aware patch.

The mechanism, not a method: a method subclasses :class:`ClipLayerPatch` with its own :meth:`~ClipLayerPatch.edit`
of the layer's output, and :func:`install_layer_patch` sets it on a ``clone()`` of the CLIP as two object
patches (the layer's ``forward`` and the ``encode_token_weights`` that receives that encoder's token rows); the
input CLIP is never changed.

Which rows are prompt chunks. ComfyUI encodes a prompt as one row per chunk (77 tokens for CLIP, 16 for
MiniCanvas), plus one empty-prompt row when any token carries a weight other than 1 (the reference the weights
interpolate from). The wrapper of ``encode_token_weights`` notes how many rows are real chunks (and a readable
label of each), so an edit sees only those rows; the empty row always passes through.

Supported encoders, one :class:`TextEncoderSite` each (:func:`text_encoder_sites`; :func:`text_encoder_site` picks
one by name):

* ``SD1``: ``SD1ClipModel`` with ``clip_l``;
* ``SD2``: ``SD2ClipModel`` with ``clip_h`` (OpenCLIP-H);
* ``SDXL``: ``SDXLClipModel`` with ``clip_l`` and ``clip_g`` (OpenCLIP-bigG, whose pooled output is the UNet's
  ADM input);
* ``SDXLRefiner``: ``SDXLRefinerClipModel`` with ``clip_g`` alone;
* ``MiniCanvas``: the pack's MiniCanvas CLIP (``nodes/minicanvas.py``), its text encoder ``minicanvas``.

Anything else is refused with a message naming what was found.

The pooled output. ComfyUI's CLIP encoders compute it after the whole stack (the final LayerNorm of the last
layer's output at the first end token, then the projection), whichever layer the token states are read from. A
patched layer's output is what the layers after it run on, so the pooled output of a chunk comes from the edited
run too, and that of an unedited chunk stays bit-exact; nothing else needs patching.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "AUTO_ENCODER",
    "ENCODERS",
    "ENCODER_KEY",
    "ENCODE_KEY",
    "LAYERS_PATH",
    "ClipLayerPatch",
    "TextEncoderSite",
    "describe_encoder",
    "encoder_width",
    "install_layer_patch",
    "layer_key",
    "output_layer",
    "run_encoder",
    "text_encoder_site",
    "text_encoder_sites",
]

ENCODER_KEY = "clip_l"
"""Attribute of the CLIP's ``cond_stage_model`` holding the CLIP-L encoder (SD1.x, SDXL)."""

LAYERS_PATH = "transformer.text_model.encoder.layers"
"""Where ComfyUI's ``SDClipModel`` keeps its encoder layers."""

ENCODE_KEY = f"{ENCODER_KEY}.encode_token_weights"
"""Object-patch name of the call that receives ``clip_l``'s token rows (SD1.x, SDXL)."""

ENCODERS = ("clip_l", "clip_g", "clip_h")
"""The CLIP text encoders a site can be (attributes of the CLIP's ``cond_stage_model``)."""

AUTO_ENCODER = "auto"
"""Encoder choice: ``clip_l`` when the CLIP has one (SD1.x, SDXL), else its only text encoder (SD2.x ``clip_h``,
the SDXL refiner's ``clip_g``, MiniCanvas)."""


def layer_key(index: int) -> str:
    """Object-patch name of the forward of ``clip_l``'s encoder layer ``index`` (SD1.x, SDXL; any family:
    :meth:`TextEncoderSite.layer_key`)."""
    return f"{ENCODER_KEY}.{LAYERS_PATH}.{int(index)}.forward"


def encoder_width(encoder: Any) -> Optional[int]:
    """Residual width of a ComfyUI text encoder (its token embedding width), or None."""
    for inner in ("transformer", "text_model"):
        try:
            return int(getattr(encoder, inner).get_input_embeddings().weight.shape[-1])
        except (AttributeError, IndexError, TypeError):
            continue
    try:
        return int(encoder.text_model.embeddings.token_embedding.weight.shape[-1])
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


class TextEncoderSite(NamedTuple):
    """Where, in one family's CLIP, a text-encoder layer is patched and how that encoder is fed."""

    family: str
    """``"SD1"``, ``"SD2"``, ``"SDXL"``, ``"SDXLRefiner"`` or ``"MiniCanvas"``."""
    name: str
    """Attribute of the CLIP's ``cond_stage_model`` holding the encoder (``clip_l``, ``clip_g``, ``clip_h``,
    ``minicanvas``)."""
    encoder: Any
    """That module (its encoder layers are found by ``sae_core.itd.text.resolve_layer``)."""
    layers_path: str
    """Its list of encoder layers, relative to it."""
    token_key: str
    """Key of its token rows in ``clip.tokenize(text)`` (``"l"``, ``"g"``, ``"h"``, ``"minicanvas"``)."""
    encode_key: str
    """Object-patch name of the call that receives its token rows (the rows, or the whole token dict)."""
    rows_key: Optional[str]
    """Key of its rows in what that call receives; ``None``: it receives the rows themselves."""
    pad_token: str
    """What pads a chunk after the end token (``"eos"``, ``"id 0"``, ``"<pad>"``)."""
    run: Callable[[Tensor], Any]
    """``run(input_ids [B, L])``: the encoder on token ids, exactly as ``encode_token_weights`` runs it."""
    conditioning_extra: bool = False
    """Whether the CLIP hands this encoder's extra outputs (a third tuple element) on into the conditioning:
    ``SD1ClipModel`` and its subclasses (SD1, SD2, SDXL refiner) do; ``SDXLClipModel`` keeps two values only."""

    def layer_key(self, index: int) -> str:
        """Object-patch name of the forward of encoder layer ``index``."""
        return f"{self.name}.{self.layers_path}.{int(index)}.forward"


def _pad_description(tokenizer: Any) -> str:
    pad, end = getattr(tokenizer, "pad_token", None), getattr(tokenizer, "end_token", None)
    return "eos" if pad is None or pad == end else f"id {pad}"


def _clip_encoders(model: Any) -> tuple[str, tuple[str, ...], bool] | None:
    """``(family, encoder names, conditioning_extra)`` of a supported ComfyUI CLIP model, else ``None``."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip

    if isinstance(model, comfy.sdxl_clip.SDXLClipModel):
        return "SDXL", ("clip_l", "clip_g"), False
    if isinstance(model, comfy.sdxl_clip.SDXLRefinerClipModel) and getattr(model, "clip", None) == "clip_g":
        return "SDXLRefiner", ("clip_g",), True
    if isinstance(model, comfy.text_encoders.sd2_clip.SD2ClipModel) and getattr(model, "clip", None) == "clip_h":
        return "SD2", ("clip_h",), True
    if isinstance(model, comfy.sd1_clip.SD1ClipModel) and getattr(model, "clip", None) == ENCODER_KEY:
        return "SD1", (ENCODER_KEY,), True
    return None


def text_encoder_sites(clip: Any, who: str) -> list[TextEncoderSite]:
    """Every text encoder of an SD1.x, SD2.x, SDXL, SDXL refiner or MiniCanvas CLIP that a layer patch can go on
    (SDXL: ``clip_l`` then ``clip_g``); a ValueError naming the encoder (and ``who``) for any other CLIP."""
    import comfy.clip_model

    from .clip_text import tokenizer_of
    from .minicanvas import FAMILY as MINICANVAS, TOKEN_KEY as MINICANVAS_KEY, MiniCanvasTextModel

    if clip is None or not hasattr(clip, "cond_stage_model") or not hasattr(clip, "patcher"):
        raise ValueError(f"clip: {who} needs a CLIP (got {type(clip).__name__}; does the checkpoint have a "
                         "text encoder?)")
    model = clip.cond_stage_model
    if isinstance(model, MiniCanvasTextModel):
        encoder = model.minicanvas

        def run_minicanvas(input_ids: Tensor) -> Any:
            return encoder(input_ids.to(next(encoder.parameters()).device))

        return [TextEncoderSite(MINICANVAS, MINICANVAS_KEY, encoder, "text_model.encoder.layers", MINICANVAS_KEY,
                                "encode_token_weights", MINICANVAS_KEY, "<pad>", run_minicanvas)]
    found = _clip_encoders(model)
    if found is None:
        raise ValueError(
            f"clip: {who} edits the CLIP text encoders of SD1.x (clip_l), SD2.x (clip_h), SDXL (clip_l, clip_g), "
            f"the SDXL refiner (clip_g) or MiniCanvas' text encoder; this CLIP is {describe_encoder(clip)}, which "
            "is not supported"
        )
    family, names, extra = found
    sites = []
    for name in names:
        encoder = getattr(model, name, None)
        transformer = getattr(encoder, "transformer", None)
        if not isinstance(transformer, comfy.clip_model.CLIPTextModel):
            raise ValueError(
                f"clip: {who} needs {name} to be ComfyUI's CLIP transformer; this CLIP ({describe_encoder(clip)}) "
                f"has {type(transformer).__name__}"
            )
        key = name.split("_", 1)[1]
        sites.append(TextEncoderSite(family, name, encoder, LAYERS_PATH, key, f"{name}.encode_token_weights", None,
                                     _pad_description(tokenizer_of(clip, key)),
                                     lambda input_ids, encoder=encoder: run_encoder(encoder, input_ids), extra))
    return sites


def text_encoder_site(clip: Any, who: str, encoder: str = AUTO_ENCODER) -> TextEncoderSite:
    """The :class:`TextEncoderSite` of ``clip``'s text encoder ``encoder`` (``clip_l``, ``clip_g``, ``clip_h``, or
    ``auto``: ``clip_l`` when the CLIP has one, else its only encoder); a ValueError naming the encoder (and
    ``who``) for an unsupported CLIP or an encoder this CLIP does not have."""
    if encoder != AUTO_ENCODER and encoder not in ENCODERS:
        raise ValueError(f"encoder: expected one of {', '.join((AUTO_ENCODER, *ENCODERS))}, got {encoder!r}")
    sites = text_encoder_sites(clip, who)
    names = [site.name for site in sites]
    if encoder == AUTO_ENCODER:
        return sites[names.index(ENCODER_KEY)] if ENCODER_KEY in names else sites[0]
    if encoder not in names:
        raise ValueError(
            f"encoder: this {sites[0].family} CLIP has no {encoder}; its text encoder"
            f"{'s are' if len(names) > 1 else ' is'} {', '.join(names)} (pick one of them, or {AUTO_ENCODER})"
        )
    return sites[names.index(encoder)]


def output_layer(clip: Any, encoder: Any, num_layers: int) -> Optional[int]:
    """Index of the last layer of ``encoder`` whose output reaches the token states of the conditioning (``None``:
    every layer can).

    SD1's clip_l outputs the last layer; SDXL's clip_l and clip_g, SD2's clip_h the penultimate one
    (``comfy/sdxl_clip.py``, ``comfy/text_encoders/sd2_clip.py``); CLIP Set Last Layer (``clip.layer_idx``)
    overrides them as ComfyUI does at encode time. Layers after it only reach the pooled output.
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
    """A ComfyUI CLIP encoder (``clip_l``, ``clip_g``, ``clip_h``) on token ids ``[B, L]``, exactly as
    ``encode_token_weights`` runs it."""
    return encoder([[int(t) for t in row] for row in input_ids.tolist()])


class _EncodeContext(NamedTuple):
    sections: int
    labels: list[str]


class ClipLayerPatch:
    """The object patch on one text-encoder layer's ``forward`` (and on the ``encode_token_weights`` that
    receives that encoder's token rows, e.g. ``clip_l.encode_token_weights``).

    Called as the layer's forward: runs the original forward, then :meth:`edit` on the rows that are prompt
    chunks. Not an ``nn.Module`` on purpose: ComfyUI sets it as an attribute of the layer, and a module there
    would join the CLIP's state dict. ``rows_key``: when the wrapped ``encode_token_weights`` receives the whole
    token dict (MiniCanvas), the key of this encoder's rows in it.
    """

    def __init__(self, original_forward: Callable[..., Any], original_encode: Callable[..., Any], layer: int,
                 tokenizer: Any = None, rows_key: Optional[str] = None) -> None:
        self.original_forward = original_forward
        self.original_encode = original_encode
        self.layer = int(layer)
        self.tokenizer = tokenizer
        self.rows_key = rows_key
        self._context: Optional[_EncodeContext] = None

    def edit(self, hidden: Tensor, labels: list[str]) -> Optional[Tensor]:
        """The edited layer output of the prompt-chunk rows ``[rows, length, d]`` (``labels``: one text per row),
        or ``None`` to leave them as they are."""
        raise NotImplementedError

    def _label(self, row: Sequence[Any]) -> str:
        tok = self.tokenizer
        inv = getattr(tok, "inv_vocab", None) or {}
        start, end = getattr(tok, "start_token", None), getattr(tok, "end_token", None)
        end_of_word = getattr(tok, "end_of_word", "</w>")  # "": every token is a whole word
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
            piece = str(inv.get(token, f"<{token}>"))
            words.append(piece.replace(end_of_word, " ") if end_of_word else piece + " ")
        return "".join(words).strip()

    def encode_token_weights(self, token_weight_pairs: Any) -> Any:
        """Stands in for the wrapped ``encode_token_weights``: notes the real chunks, then encodes as usual."""
        rows = token_weight_pairs
        if self.rows_key is not None and isinstance(token_weight_pairs, dict):
            rows = token_weight_pairs[self.rows_key]
        sections = len(rows)
        labels = [self._label(row) for row in rows]
        if sections > 1:
            labels = [f"{text} [chunk {i + 1}/{sections}]" for i, text in enumerate(labels)]
        outer = self._context
        self._context = _EncodeContext(sections, labels)
        try:
            return self.original_encode(token_weight_pairs)
        finally:
            self._context = outer

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.original_forward(x, *args, **kwargs)
        if isinstance(out, tuple):  # layers that return (hidden, ...) (transformers 4.x)
            return (self.gate(out[0]), *out[1:])
        return self.gate(out)

    @torch.no_grad()
    def gate(self, hidden: Tensor) -> Tensor:
        """The layer output ``[rows, length, d]`` with :meth:`edit` applied to the prompt-chunk rows; the same
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


def install_layer_patch(clip: Any, site: TextEncoderSite, layer: int,
                        make: Callable[[Callable[..., Any], Callable[..., Any]], ClipLayerPatch]
                        ) -> tuple[Any, ClipLayerPatch]:
    """``(patched clone of clip, the patch)``: ``make(original_forward, original_encode)`` builds the patch
    for layer ``layer`` of ``site``'s encoder; the input CLIP is not changed."""
    patched = clip.clone()
    key = site.layer_key(layer)
    patch = make(patched.patcher.get_model_object(key), patched.patcher.get_model_object(site.encode_key))
    patched.patcher.add_object_patch(key, patch)
    patched.patcher.add_object_patch(site.encode_key, patch.encode_token_weights)
    return patched, patch
