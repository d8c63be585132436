"""The text-encoder side of ItD: which layer is read, how prompts are tokenised, and the residual.

ItD reads the *raw* residual stream that one CLIP encoder layer outputs (before the final
LayerNorm; e.g. ``text_model.encoder.layers.8`` of SD1.x's CLIP-L) at every token position.
Everything ItD measures (SAE features, scores, the threshold) depends on the padding convention
of the deployment path: ComfyUI pads SD1 prompts to 77 tokens with EOS and passes no attention
mask; MiniCanvas pads to its own fixed length. A :class:`TextLayerSource` bundles the model, the
layer and the deployment tokenisation so that interpretation, calibration and SAE training see
exactly what inference will see.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..capture import capture, get_submodule

__all__ = [
    "LAYER_LIST_PATHS",
    "PromptBatch",
    "Residual",
    "TextLayerSource",
    "choose_layer",
    "clip_tokenize_fn",
    "default_layer",
    "hookpoint_layer",
    "layer_count",
    "module_width",
    "resolve_layer",
    "residual_token_batches",
]

LAYER_LIST_PATHS: tuple[str, ...] = (
    "text_model.encoder.layers",  # transformers 4.x CLIPTextModel, CLIPTextModelWithProjection
    "encoder.layers",  # transformers 5.x CLIPTextModel, CLIPTextTransformer
    "transformer.text_model.encoder.layers",  # ComfyUI SDClipModel
)
"""Where the list of encoder layers sits in the text encoders we know, relative to the root."""


class PromptBatch(NamedTuple):
    """Token ids of a batch of prompts, as the deployment path feeds the text encoder."""

    input_ids: Tensor
    """``[B, L]`` int64 token ids (BOS, prompt tokens, EOS, then padding up to ``L``)."""

    content_mask: Tensor
    """``[B, L]`` bool: True from BOS to EOS inclusive, False on padding."""


class Residual(NamedTuple):
    """The hooked layer's output for a batch of prompts."""

    hidden: Tensor
    """``[B, L, d]`` residual stream (float32, on the model's device)."""

    content_mask: Tensor
    """``[B, L]`` bool, True from BOS to EOS inclusive (on the same device as ``hidden``)."""


def resolve_layer(model: nn.Module, layer: int | str) -> tuple[str, nn.Module]:
    """Find an encoder layer: an index into the model's layer list, or a dotted module path.

    Returns ``(dotted_path, module)``. Negative indices count from the end.
    """
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        return layer, get_submodule(model, layer)
    index = int(layer)
    for path in LAYER_LIST_PATHS:
        try:
            layers = get_submodule(model, path)
        except ValueError:
            continue
        if not isinstance(layers, nn.ModuleList):
            continue
        n = len(layers)
        if not -n <= index < n:
            raise ValueError(f"text encoder layer {index} is out of range: '{path}' has {n} layers (0..{n - 1})")
        index %= n
        return f"{path}.{index}", layers[index]
    raise ValueError(
        f"cannot find the encoder layer list in {type(model).__name__}; looked for "
        f"{', '.join(repr(p) for p in LAYER_LIST_PATHS)}. Pass the layer as a dotted module path instead."
    )


def layer_count(model: nn.Module) -> int:
    """Number of encoder layers of ``model`` (found as :func:`resolve_layer` finds them)."""
    for path in LAYER_LIST_PATHS:
        try:
            layers = get_submodule(model, path)
        except ValueError:
            continue
        if isinstance(layers, nn.ModuleList):
            return len(layers)
    raise ValueError(f"cannot find the encoder layer list in {type(model).__name__}; looked for "
                     f"{', '.join(repr(p) for p in LAYER_LIST_PATHS)}")


_HOOK_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h)\.(\d+)(?:\.|$)")


def hookpoint_layer(hookpoint: str | None) -> int | None:
    """The encoder-layer index a text-encoder SAE's hookpoint names (``text_model.encoder.layers.8`` -> 8,
    ``blocks.8.hook_resid_post`` -> 8), or ``None`` when it names none (or is not a string)."""
    if not isinstance(hookpoint, str):
        return None
    found = _HOOK_LAYER_RE.findall(hookpoint)
    return int(found[-1]) if found else None


def default_layer(num_layers: int) -> int:
    """The layer used when neither the settings nor the SAE name one: two thirds of the way up the encoder,
    which is ItD's layer 8 of CLIP-L's 12."""
    return max(0, min(num_layers - 1, (2 * num_layers) // 3))


_UNET_HOOK_RE = re.compile(r"(?:^|\.)(?:unet|diffusion_model|(?:up|down)_blocks|mid_block|input_blocks|output_blocks|"
                           r"middle_block)(?:\.|$)")


def choose_layer(layer: int, hookpoint: str | None, num_layers: int) -> tuple[int, str]:
    """``(layer index, where it came from)``; ``layer = -1`` means the SAE's ``hookpoint``, else ItD's default.

    An SAE reads the activations of the layer it was trained on only: a ``layer`` other than the one its hookpoint
    names, and an SAE trained on a UNet block (SAeUron's), are refused with a ValueError naming the input.
    """
    layer = int(layer)
    hooked = hookpoint_layer(hookpoint)
    if hooked is None and isinstance(hookpoint, str) and _UNET_HOOK_RE.search(hookpoint):
        raise ValueError(f"sae: it was trained on {hookpoint!r}, a UNet block (an SAeUron SAE), not a text-encoder "
                         "layer; ItD needs an SAE trained on one layer of the text encoder it edits")
    if layer >= 0:
        origin = "as set"
    else:
        if hooked is not None:
            layer, origin = hooked, f"the SAE's hookpoint {hookpoint!r}"
        else:
            layer, origin = default_layer(num_layers), "default (the SAE records no layer)"
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer: encoder layer {layer} ({origin}) is out of range; this text encoder has "
                         f"{num_layers} layers (0..{num_layers - 1})")
    if hooked is not None and layer != hooked:
        raise ValueError(f"layer: {layer} is set, but the SAE was trained on layer {hooked} (its hookpoint "
                         f"{hookpoint!r}) and only reads that layer's activations; set layer to {hooked} or -1 (the "
                         "SAE's own)")
    return layer, origin


def module_width(module: nn.Module, model: nn.Module | None = None) -> int | None:
    """Residual width of an encoder layer, when it can be read off the module (else ``None``)."""
    for attr in ("embed_dim", "hidden_size", "d_model"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    for child in module.children():
        if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
            return int(child.normalized_shape[0])
    config = getattr(model, "config", None)
    value = getattr(config, "hidden_size", None)
    return int(value) if isinstance(value, int) else None


def clip_tokenize_fn(
    tokenizer: Any,
    pad_to: int | None = 77,
    pad_token_id: int | None = None,
) -> Callable[[Sequence[str]], PromptBatch]:
    """A tokenisation function for an HF CLIP tokenizer (or anything called like one).

    ``tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=pad_to)`` must return
    a mapping with ``"input_ids"`` (lists of ids starting with BOS and ending with EOS).
    Sequences are padded to ``pad_to`` (``None``: to the longest in the batch) with
    ``pad_token_id``, by default the tokenizer's EOS id, which is what ComfyUI and SD1.x do.
    """
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None)
        if pad_token_id is None:
            raise ValueError("clip_tokenize_fn: the tokenizer has no eos_token_id; pass pad_token_id")

    def tokenize(prompts: Sequence[str]) -> PromptBatch:
        kwargs: dict[str, Any] = {"add_special_tokens": True}
        if pad_to is not None:
            kwargs.update(truncation=True, max_length=pad_to)
        ids = tokenizer(list(prompts), **kwargs)["input_ids"]
        length = pad_to if pad_to is not None else max(len(row) for row in ids)
        input_ids = torch.full((len(ids), length), int(pad_token_id), dtype=torch.int64)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for row, seq in enumerate(ids):
            seq = list(seq)[:length]
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = True
        return PromptBatch(input_ids, mask)

    return tokenize


def _default_run(model: nn.Module, batch: PromptBatch) -> Any:
    """SD convention: token ids only, causal mask only (no attention mask for the padding)."""
    device = next(model.parameters()).device
    return model(input_ids=batch.input_ids.to(device))


class TextLayerSource:
    """A text encoder, the layer ItD reads, and the deployment tokenisation.

    Args:
        model: the text encoder (e.g. a transformers ``CLIPTextModel``).
        layer: index into its encoder layers or a dotted module path.
        tokenize: ``tokenize(prompts) -> PromptBatch`` in the deployment padding convention.
        run: ``run(model, batch)`` runs the encoder on a batch (default: ``model(input_ids=...)``
            without an attention mask, as SD does).
        pad_to: the fixed padded length of ``tokenize`` (``None`` if it pads to the longest prompt);
            recorded with the concepts so inference can check it sees the same convention.
        batch_size: prompts per encoder call. With ``pad_to=None`` prompts are encoded one at a
            time, because padding to the batch's longest prompt would change their statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int | str,
        tokenize: Callable[[Sequence[str]], PromptBatch],
        *,
        run: Callable[[nn.Module, PromptBatch], Any] | None = None,
        pad_to: int | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.layer_path, self.layer_module = resolve_layer(model, layer)
        self.layer_index = int(layer) if isinstance(layer, int) or str(layer).lstrip("-").isdigit() else None
        if self.layer_index is not None and self.layer_index < 0:
            self.layer_index = int(self.layer_path.rsplit(".", 1)[1])
        self.tokenize = tokenize
        self.run = run or _default_run
        self.pad_to = pad_to
        self.batch_size = max(1, int(batch_size))
        self.width = module_width(self.layer_module, model)

    def __repr__(self) -> str:
        return f"TextLayerSource(layer={self.layer_path!r}, width={self.width}, pad_to={self.pad_to})"

    @torch.no_grad()
    def _encode_batch(self, prompts: Sequence[str]) -> Residual:
        batch = self.tokenize(prompts)
        with capture(self.model, self.layer_path) as record:
            self.run(self.model, batch)
        if record.calls != 1:
            raise RuntimeError(
                f"the text encoder ran layer '{self.layer_path}' {record.calls} times for one batch; expected once"
            )
        hidden = record.tensors[0].float()
        if hidden.dim() != 3 or hidden.shape[:2] != batch.input_ids.shape:
            raise ValueError(
                f"layer '{self.layer_path}' output has shape {tuple(hidden.shape)}; expected "
                f"[batch, tokens, width] matching the token ids {tuple(batch.input_ids.shape)}"
            )
        if not torch.isfinite(hidden).all():
            raise ValueError(f"NaN/inf activations at '{self.layer_path}' for prompts {list(prompts)[:3]}...")
        return Residual(hidden, batch.content_mask.to(hidden.device))

    def residual_batches(self, prompts: Sequence[str]) -> Iterator[Residual]:
        """Residuals of ``prompts`` in order, in chunks (one prompt per chunk with ``pad_to=None``)."""
        prompts = list(prompts)
        step = self.batch_size if self.pad_to is not None else 1
        for start in range(0, len(prompts), step):
            yield self._encode_batch(prompts[start : start + step])

    def residual(self, prompts: Sequence[str]) -> Residual:
        """Residual of all ``prompts`` at once (requires a fixed ``pad_to`` for more than one prompt)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("residual: the prompt list is empty")
        if self.pad_to is None and len(prompts) > 1:
            raise ValueError("residual: prompts of different lengths need a fixed pad_to; use residual_batches()")
        parts = list(self.residual_batches(prompts))
        return Residual(torch.cat([p.hidden for p in parts]), torch.cat([p.content_mask for p in parts]))


def residual_token_batches(
    source: TextLayerSource,
    prompts: Sequence[str],
    *,
    prompts_per_step: int = 64,
    seed: int = 0,
    positions: str = "all",
    epochs: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[Tensor]:
    """Activations for SAE training, computed on the fly from a prompt list.

    Each epoch shuffles the prompts (deterministically from ``seed`` and the epoch number), runs
    the encoder on ``prompts_per_step`` of them at a time and yields the hooked layer's output
    flattened to ``[tokens, d]`` rows. ``positions="all"`` keeps every position (BOS, content,
    EOS and padding, as the ItD reference trains); ``"content"`` keeps BOS..EOS only.
    ``epochs=None`` repeats forever (the trainer stops after its step count). Re-creating the
    iterator with the same arguments reproduces the same stream, so a resumed run can skip the
    rows it has already consumed.
    """
    if positions not in ("all", "content"):
        raise ValueError(f"positions must be 'all' or 'content', got {positions!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("residual_token_batches: the prompt list is empty")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        shuffled = [prompts[i] for i in order.tolist()]
        for start in range(0, len(shuffled), prompts_per_step):
            chunk = shuffled[start : start + prompts_per_step]
            for res in (source.residual_batches(chunk) if source.pad_to is None else [source.residual(chunk)]):
                rows = res.hidden if positions == "all" else res.hidden[res.content_mask]
                rows = rows.reshape(-1, rows.shape[-1])
                yield rows if device is None else rows.to(device)
        epoch += 1
