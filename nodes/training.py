"""Training through a ComfyUI MODEL: the training-loop adapter.

ComfyUI runs models for inference: node outputs are inference tensors, the UNet is shared by every
clone of a ``ModelPatcher``, and weights are cast per call. :class:`TrainingClone` makes a clone
whose chosen weights go through trainable weight wrappers (``add_weight_wrapper``): a
:class:`ComfyLoRA` (LoRA factors applied as ``w -> w + s * B @ A``) or a :class:`GradientProbe`
(``w -> w + 0``, whose gradient is the weight's). Every other weight gets an identity wrapper so
ComfyUI hands each layer a fresh copy of its weight (weights loaded by a node are inference tensors,
which autograd cannot save for backward). Use it under ``torch.inference_mode(False)``; the
wrappers are removed and the clone unloaded on exit, so the input MODEL is never modified. The clone computes in
the precision asked for (fp32 or bf16) whatever dtype the checkpoint's weights were loaded in.

Loading and unloading happen under inference mode, as everywhere else in ComfyUI. On a GPU they move
the weights (``nn.Module.to``), and a parameter made under inference mode -- every weight a loader node
made -- that is moved outside inference mode is left with neither the inference flag nor a version
counter: every later use of it fails ("Inference tensors do not track version counter"), in training,
in sampling, in any other branch of the graph. The trainable tensors (LoRA factors, probes) are the
opposite: they are made and moved outside inference mode, whoever calls.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sae_core.amnesia.config import PRECISIONS
from sae_core.amnesia.lora import LoRADelta, select_targets

__all__ = ["PRECISIONS", "ComfyLoRA", "CopyWeight", "GradientProbe", "TrainingClone", "compute_dtype", "target_modules"]

log = logging.getLogger("concept_erasure")


class CopyWeight:
    """Identity weight wrapper: makes ComfyUI pass the layer a fresh copy of its weight."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class GradientProbe(torch.nn.Module):
    """``w -> w + 0``: the gradient w.r.t. the zero delta is the gradient w.r.t. the base weight."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.delta = torch.nn.Parameter(torch.zeros(shape, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)

    def move_to(self, device: Any = None) -> int:
        with torch.inference_mode(False):  # ComfyUI calls this while loading, under inference mode
            self.to(device=device)
        return self.delta.numel() * self.delta.element_size()


class ComfyLoRA(LoRADelta):
    """A :class:`LoRADelta` with the memory hooks ComfyUI calls on weight functions."""

    def move_to(self, device: Any = None) -> int:
        with torch.inference_mode(False):  # ComfyUI calls this while loading, under inference mode
            self.to(device=device)
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class TrainingClone:
    """A clone of ``model`` whose ``targets`` carry given weight wrappers (identity wrappers elsewhere).

    Use as a context manager inside ``torch.inference_mode(False)``: on entry the clone is
    loaded (full load); on exit the wrappers are removed from the shared modules, the clone is
    unloaded and the base parameters' ``requires_grad`` flags are restored.
    """

    def __init__(self, model: Any, wrappers: dict[str, torch.nn.Module], precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.patcher = model.clone()
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        if precision == "bf16" or compute_dtype(self.patcher) != compute:
            # fp32 on a half-precision checkpoint (ComfyUI loads SD UNets in fp16/bf16 on GPUs): the gradients would
            # otherwise go through fp16 (values below 6e-8 flush to zero, a small LoRA update rounds away in the
            # weight) or bf16; ComfyUI's own LoRA training sets its compute dtype the same way
            self.patcher.set_model_compute_dtype(compute)
        self.functions: list[Any] = []
        copy_fn = CopyWeight()
        for name, module in self.patcher.model.named_modules():
            if not hasattr(module, "weight_function") or getattr(module, "weight", None) is None:
                continue
            key = f"{name}.weight"
            fn = wrappers.get(name, copy_fn)
            self.patcher.add_weight_wrapper(key, fn)
            if getattr(module, "bias", None) is not None:
                self.patcher.add_weight_wrapper(f"{name}.bias", copy_fn)
        self.functions = list(wrappers.values()) + [copy_fn]
        self._flags: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self) -> Any:
        import comfy.model_management as mm

        self._flags = [(p, p.requires_grad) for p in self.patcher.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        with torch.inference_mode():  # see the module docstring: weights move under inference mode only
            mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
        return self.patcher

    def __exit__(self, *exc: object) -> None:
        import comfy.model_management as mm

        mine = {id(f) for f in self.functions}
        for module in self.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                fns = getattr(module, attr, None)
                if isinstance(fns, list) and any(id(f) in mine for f in fns):
                    setattr(module, attr, [f for f in fns if id(f) not in mine])
        try:
            loaded = mm.current_loaded_models
            for i in range(len(loaded) - 1, -1, -1):
                if loaded[i].model is self.patcher:
                    with torch.inference_mode():  # unloading moves the weights back to the offload device
                        loaded[i].model_unload()
                    loaded.pop(i)
        except Exception as err:  # noqa: BLE001 - unloading is best effort; the wrappers are gone already
            log.warning("concept_erasure: could not unload the training clone cleanly: %s", err)
        for p, flag in self._flags:
            try:
                p.requires_grad_(flag)
            except RuntimeError:
                pass


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype ``model`` (a ModelPatcher) computes its UNet in: its manual-cast dtype (an object patch of the
    clone included), else its weights' dtype."""
    cast = model.get_model_object("manual_cast_dtype") if "manual_cast_dtype" in model.object_patches else \
        getattr(model.model, "manual_cast_dtype", None)
    return cast if cast is not None else model.model.get_dtype()


def target_modules(model: Any, targets: str) -> dict[str, torch.nn.Module]:
    """``{name: module}`` of the ``targets`` preset in a MODEL (names as in ``model.model``: ``diffusion_model.*``)."""
    names = select_targets(model.model, targets)
    return {n: model.model.get_submodule(n) for n in names}
