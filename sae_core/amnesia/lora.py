"""LoRA (nn.Linear) and LoCon (nn.Conv2d) adapters for Selective Amnesia.

Each adapted layer computes ``W = W0 + s * B @ A`` with ``s = alpha / rank``:

* ``down`` (A) has shape ``[r, in]`` for Linear and ``[r, in, kh, kw]`` for Conv2d
  (it uses the base conv's stride, padding and dilation);
* ``up`` (B) has shape ``[out, r]`` for Linear and ``[out, r, 1, 1]`` for Conv2d;
* B starts at zero, so a freshly injected model computes exactly what the base does.

The frozen base module is kept inside the wrapper and *is* theta*, the weights the
EWC penalty anchors to (``sae_core.ewc``), so no copy of the base weights is needed.

Module names follow the LDM / ComfyUI UNet naming
(``input_blocks.1.1.transformer_blocks.0.attn2.to_k``). Target presets mirror the
reference ``train_method`` values:

``xattn``    cross-attention projections: ``attn2.to_q/to_k/to_v/to_out.0``.
``noxattn``  every Linear/Conv2d except names containing ``attn2`` or ``time_embed`` and
             the output head ``out.*`` -- i.e. attn1, ff, proj_in/proj_out, ResBlock convs
             and their ``emb_layers``, the input conv, skip and down/upsampler convs.
             This is the reference rule, so it covers the same weights as its ``noxattn``.
``full``     every Linear and Conv2d.

``inject_lora`` edits the module tree in place: callers pass a model they own (a copy,
never a model shared with other users, e.g. a ComfyUI graph's cached model).

Exported files use ComfyUI's native LoRA keys (checked against ComfyUI 0.3.64,
``comfy/lora.py`` ``load_lora``/``model_lora_keys_unet`` and
``comfy/weight_adapter/lora.py``)::

    diffusion_model.<module>.lora_up.weight    B, [out, r] or [out, r, 1, 1]
    diffusion_model.<module>.lora_down.weight  A, [r, in] or [r, in, kh, kw]
    diffusion_model.<module>.alpha             scalar; ComfyUI scales by alpha / lora_down.shape[0]

ComfyUI materialises ``up.flatten(1) @ down.flatten(1)`` reshaped to the weight's shape,
which is exactly :meth:`LoRALayer.delta_weight`; the stock LoraLoader therefore
reproduces the trained weights.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..artefacts import ArtefactError, load_tensors, read_metadata, save_tensors

__all__ = [
    "TARGET_PRESETS",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv2d",
    "LoRADelta",
    "module_kind",
    "preset_matches",
    "unet_relative_name",
    "select_targets",
    "inject_lora",
    "find_lora_layers",
    "remove_lora",
    "merge_lora",
    "lora_state_dict",
    "save_lora",
    "load_lora_state_dict",
    "load_lora_metadata",
    "apply_lora_state_dict",
]

#: Names accepted as ``targets`` presets.
TARGET_PRESETS = ("xattn", "noxattn", "full")

#: Prefix of UNet weights inside a ComfyUI/CompVis model (``model.diffusion_model`` in ComfyUI).
UNET_PREFIX = "diffusion_model."

_XATTN_RE = re.compile(r"(?:^|\.)attn2\.(?:to_q|to_k|to_v|to_out\.0)$")

Targets = Union[str, Iterable[str]]


# --------------------------------------------------------------------------- layers


def _set_rank_alpha(layer: nn.Module, rank: int, alpha: Optional[float]) -> None:
    """Check and set ``rank``, ``alpha`` (default: the rank), ``scale = alpha / rank`` and ``strength = 1``."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
    layer.rank = rank
    layer.alpha = alpha
    layer.scale = alpha / rank
    layer.strength = 1.0


class LoRALayer(nn.Module):
    """Common part of :class:`LoRALinear` and :class:`LoRAConv2d`.

    Attributes:
        base: the wrapped, frozen module (theta*).
        down: A, trainable.
        up: B, trainable, zero at initialisation.
        rank: r.
        alpha: LoRA alpha; ``scale = alpha / rank``.
        strength: multiplier used in ``forward`` only (1.0 = trained strength, 0.0 = base model).
            ``delta_weight`` and the EWC penalty ignore it: the penalty assumes strength 1.
    """

    base: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: Optional[float]) -> None:
        super().__init__()
        _set_rank_alpha(self, rank, alpha)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    # The wrapped layer's weight/bias stay reachable under the usual names.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def _init_factors(self, generator: Optional[torch.Generator]) -> None:
        # A like nn.Linear's default init (uniform, fan_in); B = 0 so dW = 0 at start. A is drawn on
        # the CPU (in fp32) and copied over, so a CPU generator works for a model on any device and
        # the initialisation does not depend on the device.
        down = torch.empty(self.down.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.down.copy_(down)
        nn.init.zeros_(self.up)

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The exact materialised ``dW = scale * B @ A`` in the base weight's shape.

        Args:
            dtype: compute (and return) in this dtype; default: the factors' dtype.
        """
        up, down = self.up, self.down
        if dtype is not None:
            up, down = up.to(dtype), down.to(dtype)
        dw = up.flatten(1) @ down.flatten(1)
        return (self.scale * dw).reshape(self.base.weight.shape)

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.strength == 0.0:
            return y
        h = self._lora_branch(x.to(self.down.dtype))
        return y + (self.scale * self.strength) * h.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear``: ``y = base(x) + scale * (x A^T) B^T``."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: Optional[float] = None,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base, rank, alpha)
        dev = base.weight.device
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.up = nn.Parameter(torch.empty(base.out_features, rank, device=dev, dtype=dtype))
        self._init_factors(generator)

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)


class LoRAConv2d(LoRALayer):
    """LoCon around an ``nn.Conv2d``: a k x k down conv (base geometry) then a 1x1 up conv."""

    def __init__(
        self,
        base: nn.Conv2d,
        rank: int,
        alpha: Optional[float] = None,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d supports groups=1 convolutions only, got groups={base.groups}")
        super().__init__(base, rank, alpha)
        dev = base.weight.device
        kh, kw = base.kernel_size
        self.down = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=dev, dtype=dtype))
        self.up = nn.Parameter(torch.empty(base.out_channels, rank, 1, 1, device=dev, dtype=dtype))
        self._init_factors(generator)

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        # _conv_forward applies the base's stride/padding/dilation/padding_mode to A.
        h = self.base._conv_forward(x, self.down, None)
        return F.conv2d(h, self.up)


class LoRADelta(nn.Module):
    """LoRA factors applied as a function of a weight: ``w -> w + strength * scale * B @ A``.

    For hosts that patch weights through weight functions instead of wrapping modules (ComfyUI's
    ``ModelPatcher.add_weight_wrapper``): the model's modules stay untouched and shared, and
    the same factors, ``delta_weight`` and exported keys as :class:`LoRALinear` /
    :class:`LoRAConv2d` apply. Factor shapes: ``down`` [r, in] or [r, in, kh, kw], ``up``
    [out, r] or [out, r, 1, 1]. The EWC penalty (``sae_core.ewc``) accepts it like a LoRA layer
    (it reads :attr:`weight_shape`).

    Attributes:
        weight_shape: shape of the adapted weight (2-D Linear or 4-D Conv2d).
        up, down, rank, alpha, scale, strength: as in :class:`LoRALayer`.
    """

    def __init__(
        self,
        weight_shape: Iterable[int],
        rank: int,
        alpha: Optional[float] = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(d) for d in weight_shape)
        if len(shape) not in (2, 4):
            raise ValueError(f"LoRADelta adapts 2-D (Linear) or 4-D (Conv2d) weights, got shape {shape}")
        _set_rank_alpha(self, rank, alpha)
        self.weight_shape = shape
        out_dim, in_shape = shape[0], shape[1:]
        up_shape = (out_dim, rank) if len(shape) == 2 else (out_dim, rank, 1, 1)
        # A is created on the CPU so that its initialisation does not depend on the device.
        down = torch.empty(rank, *in_shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(up_shape, device=device, dtype=dtype))

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The exact ``dW = scale * B @ A`` in :attr:`weight_shape` (strength not applied)."""
        up, down = self.up, self.down
        if dtype is not None:
            up, down = up.to(dtype), down.to(dtype)
        return (self.scale * (up.flatten(1) @ down.flatten(1))).reshape(self.weight_shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + strength * dW``, computed in fp32 and returned in the weight's dtype and device."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"LoRADelta for shape {self.weight_shape} applied to a weight of shape {tuple(weight.shape)}")
        if self.strength == 0.0:
            return weight
        dw = self.delta_weight(torch.float32).to(weight.device)
        return (weight.float() + self.strength * dw).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


# --------------------------------------------------------------------------- selection


def module_kind(module: nn.Module) -> Optional[str]:
    """``"linear"`` / ``"conv2d"`` for adaptable layers (LoRA wrappers report their base), else None."""
    if isinstance(module, LoRALayer):
        module = module.base
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def unet_relative_name(name: str) -> str:
    """Strip everything up to and including ``diffusion_model.`` (BaseModel -> UNet naming)."""
    i = name.find(UNET_PREFIX)
    if i == 0 or (i > 0 and name[i - 1] == "."):
        return name[i + len(UNET_PREFIX):]
    return name


def preset_matches(preset: str, name: str, kind: str) -> bool:
    """Whether the layer ``name`` (UNet-relative LDM name) of ``kind`` belongs to ``preset``."""
    if kind not in ("linear", "conv2d"):
        return False
    if preset == "full":
        return True
    if preset == "xattn":
        return kind == "linear" and _XATTN_RE.search(name) is not None
    if preset == "noxattn":
        return not ("attn2" in name or "time_embed" in name or name == "out" or name.startswith("out."))
    raise ValueError(f"unknown LoRA target preset {preset!r}; expected one of {', '.join(TARGET_PRESETS)} or a list of module names")


def _adaptable_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv2d layers of ``root`` by name; LoRA wrappers count as one layer (their base is hidden)."""
    out: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, mod in root.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(mod, LoRALayer):
            wrapped.append(name)
        if name and module_kind(mod) is not None:
            out[name] = mod
    return out


def select_targets(root: nn.Module, targets: Targets) -> list[str]:
    """Names (relative to ``root``) of the layers chosen by a preset or an explicit name list.

    Presets look at UNet-relative names. When ``root`` has a ``diffusion_model`` child
    (a ComfyUI/CompVis BaseModel), presets only consider layers under it.
    An explicit list must name Linear/Conv2d modules; a name may omit a leading
    ``diffusion_model.`` when ``root`` is a BaseModel.

    Raises:
        ValueError: unknown preset, unknown or non-adaptable module name, or an empty selection.
    """
    layers = _adaptable_modules(root)
    if isinstance(targets, str):
        preset = targets
        if preset not in TARGET_PRESETS:
            raise ValueError(
                f"unknown LoRA target preset {preset!r}; expected one of {', '.join(TARGET_PRESETS)} "
                "or a list of module names"
            )
        scoped = isinstance(getattr(root, "diffusion_model", None), nn.Module)
        names = [
            n for n, m in layers.items()
            if (not scoped or n.startswith(UNET_PREFIX))
            and preset_matches(preset, unet_relative_name(n), module_kind(m))  # type: ignore[arg-type]
        ]
        if not names:
            raise ValueError(f"LoRA target preset {preset!r} selects no Linear/Conv2d layer in {type(root).__name__}")
        return names

    names = []
    for raw in targets:
        if not isinstance(raw, str):
            raise TypeError(f"LoRA target names must be strings, got {raw!r}")
        name = raw
        if name not in layers and (UNET_PREFIX + name) in layers:
            name = UNET_PREFIX + name
        if name not in layers:
            try:
                mod = root.get_submodule(name)
            except AttributeError:
                raise ValueError(f"LoRA target {raw!r}: no such module in {type(root).__name__}") from None
            raise ValueError(f"LoRA target {raw!r} is a {type(mod).__name__}; only nn.Linear and nn.Conv2d can be adapted")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("LoRA targets: the list of module names is empty")
    return names


# --------------------------------------------------------------------------- injection


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def inject_lora(
    root: nn.Module,
    targets: Targets,
    rank: int,
    alpha: Optional[float] = None,
    *,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    freeze: bool = True,
) -> dict[str, LoRALayer]:
    """Wrap the target layers of ``root`` in LoRA/LoCon adapters, in place.

    ``root`` is modified: pass a model you own (a copy), never a shared one.
    The wrapped base weights are always frozen; with ``freeze`` (default) every other
    parameter of ``root`` is frozen too, so only the LoRA ``up``/``down`` factors train.

    Args:
        root: the UNet (LDM names) or a module holding it as ``diffusion_model``.
        targets: a preset from :data:`TARGET_PRESETS` or a list of module names.
        rank: LoRA rank r.
        alpha: LoRA alpha (default: ``rank``, i.e. scale 1).
        dtype: dtype of the trainable factors (fp32 by default, whatever the base dtype).
        generator: RNG for A's initialisation (reproducible runs).
        freeze: set ``requires_grad=False`` on all parameters of ``root`` first (factors of
            LoRA layers already present are left alone).

    Returns:
        ``{module name relative to root: LoRA layer}`` in module order.
    """
    names = select_targets(root, targets)
    already = [n for n in names if isinstance(root.get_submodule(n), LoRALayer)]
    if already:
        raise ValueError(f"modules already carry a LoRA (call remove_lora or merge_lora first): {already[:5]}")
    if freeze:
        keep = {id(p) for m in root.modules() if isinstance(m, LoRALayer) for p in (m.up, m.down)}
        for p in root.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    out: dict[str, LoRALayer] = {}
    for name in names:
        base = root.get_submodule(name)
        cls = LoRALinear if module_kind(base) == "linear" else LoRAConv2d
        layer = cls(base, rank, alpha, dtype=dtype, generator=generator)
        _set_submodule(root, name, layer)
        out[name] = layer
    return out


def find_lora_layers(root: nn.Module) -> dict[str, LoRALayer]:
    """All LoRA layers currently injected in ``root``, by name."""
    return {n: m for n, m in root.named_modules() if isinstance(m, LoRALayer)}


def remove_lora(root: nn.Module, merge: bool = False) -> dict[str, LoRALayer]:
    """Put the base modules back in place of every LoRA layer of ``root``.

    Args:
        merge: add ``strength * dW`` into the base weight first (computed in fp32).

    Returns:
        The removed LoRA layers by name (their factors stay usable, e.g. for export).
    """
    layers = find_lora_layers(root)
    for name, layer in layers.items():
        if merge:
            with torch.no_grad():
                w = layer.base.weight
                dw = layer.delta_weight(torch.float32).to(w.device) * layer.strength
                w.copy_((w.float() + dw).to(w.dtype))
        _set_submodule(root, name, layer.base)
    return layers


def merge_lora(root: nn.Module) -> dict[str, LoRALayer]:
    """Fold every LoRA delta into its base weight and remove the wrappers."""
    return remove_lora(root, merge=True)


# --------------------------------------------------------------------------- files


def _prefixed(name: str, prefix: str) -> str:
    return name if (not prefix or name.startswith(prefix)) else prefix + name


def lora_state_dict(
    loras: Mapping[str, LoRALayer],
    prefix: str = UNET_PREFIX,
    dtype: Optional[torch.dtype] = None,
) -> dict[str, torch.Tensor]:
    """ComfyUI-format LoRA tensors (``<prefix><module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``).

    Args:
        loras: ``{module name: LoRA layer}`` as returned by :func:`inject_lora`.
        prefix: prepended to module names that do not already start with it.
        dtype: cast the factors (default: keep their dtype); alpha is always fp32.
    """
    sd: dict[str, torch.Tensor] = {}
    for name, layer in loras.items():
        key = _prefixed(name, prefix)
        up = layer.up.detach().to("cpu", dtype or layer.up.dtype).contiguous()
        down = layer.down.detach().to("cpu", dtype or layer.down.dtype).contiguous()
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return sd


def save_lora(path: Union[str, os.PathLike], state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, object]] = None) -> None:
    """Write a LoRA state dict as safetensors, atomically (temp file + ``os.replace``).

    Non-string metadata values are stored as JSON.
    """
    save_tensors(path, state_dict, dict(metadata or {}))


def _factor_problem(up: torch.Tensor, down: torch.Tensor, alpha: Optional[torch.Tensor]) -> Optional[str]:
    """What is wrong with one LoRA factor pair (matrices of rank >= 1, finite floats, one finite alpha), or None."""
    if up.dim() < 2 or down.dim() < 2 or down.shape[0] == 0:
        return f"up {tuple(up.shape)} and down {tuple(down.shape)} must be matrices of rank >= 1"
    if not (up.is_floating_point() and down.is_floating_point()) or not (
            bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        return "the factors hold NaN/Inf values"
    if alpha is not None and (alpha.numel() != 1 or not alpha.is_floating_point()
                              or not math.isfinite(float(alpha.reshape(-1)[0]))):
        return f"alpha must be one finite number, got {tuple(alpha.shape)} values"
    return None


def load_lora_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a LoRA safetensors file onto the CPU; every factor pair is checked (2-D or more, matching rank >= 1,
    finite values, one finite alpha), so a damaged file raises :class:`~sae_core.artefacts.ArtefactError` naming it."""
    tensors = load_tensors(path, what="LoRA file")
    ups = [k[: -len(".lora_up.weight")] for k in tensors if k.endswith(".lora_up.weight")]
    problems = []
    for x in ups:
        up, down, alpha = tensors[f"{x}.lora_up.weight"], tensors.get(f"{x}.lora_down.weight"), tensors.get(f"{x}.alpha")
        problem = "no lora_down" if down is None else _factor_problem(up, down, alpha)
        if problem is None and up.shape[1] != down.shape[0]:
            problem = f"up {tuple(up.shape)} and down {tuple(down.shape)} have different ranks"
        if problem is not None:
            problems.append(f"{x}: {problem}")
    if problems:
        raise ArtefactError(path, "malformed LoRA: " + "; ".join(problems[:3]))
    return tensors


def load_lora_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    """The string metadata stored in a LoRA safetensors file."""
    return read_metadata(path, "LoRA file")


def _resolve_module(root: nn.Module, key: str, prefix: str) -> Optional[nn.Module]:
    candidates = [key]
    if prefix and key.startswith(prefix):
        candidates.append(key[len(prefix):])
    for c in candidates:
        try:
            return root.get_submodule(c)
        except AttributeError:
            continue
    return None


def apply_lora_state_dict(
    root: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strength: float = 1.0,
    prefix: str = UNET_PREFIX,
) -> list[str]:
    """Add ``strength * alpha/r * up @ down`` to the matching weights of ``root``, in place.

    Same arithmetic as ComfyUI's LoRA loader (fp32, missing alpha means scale 1), but
    strict: every ``lora_up`` key must find its ``lora_down`` and a Linear/Conv2d module
    with the right shape, otherwise a ValueError names the offending key.
    Injected LoRA layers are looked through (their base weight is edited).

    Returns:
        The module keys (as written in the state dict) that were patched.
    """
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
    ups = sorted(k[: -len(".lora_up.weight")] for k in state_dict if k.endswith(".lora_up.weight"))
    known = {f"{x}.{s}" for x in ups for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    stray = sorted(k for k in state_dict if k not in known)
    if stray:
        raise ValueError(f"LoRA state dict: keys not understood (expected .lora_up.weight/.lora_down.weight/.alpha): {stray[:5]}")
    if not ups:
        raise ValueError("LoRA state dict has no '.lora_up.weight' entries")
    patched = []
    for x in ups:
        down_key = f"{x}.lora_down.weight"
        if down_key not in state_dict:
            raise ValueError(f"LoRA state dict: {x}.lora_up.weight has no matching {down_key}")
        mod = _resolve_module(root, x, prefix)
        if mod is None or module_kind(mod) is None:
            raise ValueError(f"LoRA key {x!r}: no Linear/Conv2d module of that name in {type(root).__name__}")
        if isinstance(mod, LoRALayer):
            mod = mod.base
        up = state_dict[f"{x}.lora_up.weight"].float()
        down = state_dict[down_key].float()
        alpha_t = state_dict.get(f"{x}.alpha")
        problem = _factor_problem(up, down, alpha_t.float() if alpha_t is not None else None)
        if problem is not None:
            raise ValueError(f"LoRA key {x!r}: {problem}")
        scale = float(alpha_t.reshape(-1)[0]) / down.shape[0] if alpha_t is not None else 1.0
        w = mod.weight
        if up.shape[1] != down.shape[0] or up.shape[0] * down.flatten(1).shape[1] != w.numel():
            raise ValueError(
                f"LoRA key {x!r}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit weight {tuple(w.shape)}"
            )
        dw = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        with torch.no_grad():
            w.copy_((w.float() + (strength * scale) * dw.to(w.device)).to(w.dtype))
        patched.append(x)
    return patched
