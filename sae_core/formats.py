"""Reading and writing SAE files.

Our layout is the SAeUron / EleutherAI one:

* **folder** – ``<dir>/cfg.json`` (flat :class:`~sae_core.config.SaeConfig` fields) and
  ``<dir>/sae.safetensors`` with ``encoder.weight [n, d]``, ``encoder.bias [n]``,
  ``W_dec [n, d]``, ``b_dec [d]``.
* **file** – a single self-describing ``.safetensors`` (for ComfyUI's ``models/sae/`` dropdown)
  holding the same four tensors; the config is JSON under the header metadata key ``sae_config``.

:func:`load_sae` also converts, on the fly:

* **SAELens** folders – ``cfg.json`` (``d_in``, ``d_sae``, ``hook_name``, ``model_name``, TopK ``k``)
  and ``sae_weights.safetensors`` with ``W_enc [d, n]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]``;
* **ItD** folders – ``config.json`` (``n_dirs_local``, ``d_model``, ``k``, ...) and ``state_dict.pth``
  with ``encoder.weight [n, d]``, ``decoder.weight [d, n]``, ``pre_bias [d]``, ``latent_bias [n]``.
  The ``.pth`` is read only with ``torch.load(weights_only=True)``; nothing is unpickled.
* **sdxl-unbox** folders (the SDXL-Turbo SAEs of "Unpacking SDXL Turbo", Surkov et al. 2024; the ItD
  layout comes from the same code): the same two files in
  ``<diffusers block>_k10_hidden5120_auxk256_bs4096_lr0.0001/final/``, for the blocks
  ``unet.down_blocks.2.attentions.1``, ``unet.mid_block.attentions.0``, ``unet.up_blocks.0.attentions.0``
  and ``unet.up_blocks.0.attentions.1`` (ComfyUI: ``input_blocks.8.1``, ``middle_block.1``,
  ``output_blocks.0.1``, ``output_blocks.1.1``). ``config.json`` holds ``n_dirs_local`` 5120,
  ``d_model`` 1280, ``k`` 10, ``auxk`` 256 and ``dead_steps_threshold``; ``state_dict.pth`` also holds
  a ``stats_last_nonzero`` training counter (ignored). A folder whose block (from ``config.json`` or the
  folder name) is a UNet module is read as sdxl-unbox: ``source_format`` ``sdxl_unbox``, family
  ``SDXL``, and ``extra["source"] = "diff"``, because these SAEs read the block's *update* (output minus
  input, channel-last tokens), not its output. Their code is TopK on ``W_enc (x - pre_bias) +
  latent_bias`` with ReLU applied to the ``k`` kept values, the same code as our ReLU-then-TopK.
  There is no input normalisation: the published hooks encode the raw update; training divides the
  reconstruction loss by the variance of a sample of updates (a loss scale, not an input transform);
  the ``mean.pt`` / ``std.pt`` beside the weights are per-latent activation statistics (``[5120]``, used
  by their demo to size feature interventions), not input statistics, and are not needed to load.

Loading always yields per-token TopK (``batch_topk`` and ``sample_topk`` forced off). Every
problem with a file raises :class:`SaeFormatError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .artefacts import ArtefactError, keep_sae_fingerprint, sae_fingerprint, save_tensors, write_text
from .config import SaeConfig
from .sae import SparseAutoencoder

__all__ = [
    "SaeFormatError",
    "CFG_NAME",
    "WEIGHTS_NAME",
    "METADATA_KEY",
    "detect_layout",
    "load_sae",
    "save_sae",
    "convert_sae",
]

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
METADATA_KEY = "sae_config"
FORMAT_KEY = "format"
FORMAT_VALUE = "sae_core.topk_sae/1"
SAELENS_WEIGHTS = "sae_weights.safetensors"
ITD_CONFIG = "config.json"
ITD_WEIGHTS = "state_dict.pth"

_PARAM_SHAPES = {  # our key -> shape template in terms of (n, d)
    "encoder.weight": ("n", "d"),
    "encoder.bias": ("n",),
    "W_dec": ("n", "d"),
    "b_dec": ("d",),
}


class SaeFormatError(ArtefactError):
    """A file or folder is not a valid SAE in any supported layout."""


def _state_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {
        "encoder.weight": sae.encoder.weight.detach().cpu().contiguous(),
        "encoder.bias": sae.encoder.bias.detach().cpu().contiguous(),
        "W_dec": sae.W_dec.detach().cpu().contiguous(),
        "b_dec": sae.b_dec.detach().cpu().contiguous(),
    }


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, layout: str = "folder") -> str:
    """Write ``sae`` to ``path`` and return the written path.

    ``layout="folder"``: ``path`` is a directory (created if needed) receiving ``cfg.json`` and
    ``sae.safetensors``. ``layout="file"``: ``path`` is one ``.safetensors`` file whose metadata
    holds the config under ``sae_config``. Every file is written to a temp file and renamed into place.
    """
    path = Path(path)
    cfg_json = json.dumps(sae.cfg.to_dict(), indent=2, sort_keys=False)
    tensors = _state_tensors(sae)
    if layout == "folder":
        if path.exists() and not path.is_dir():
            raise ValueError(f"save_sae: {path} exists and is not a folder (use layout='file' for a single file)")
        path.mkdir(parents=True, exist_ok=True)
        # The weights carry their own config too: a save killed between the two files leaves new weights beside
        # the old cfg.json, which the loader then refuses instead of pairing them.
        save_tensors(path / WEIGHTS_NAME, tensors, {FORMAT_KEY: FORMAT_VALUE, METADATA_KEY: cfg_json})
        write_text(path / CFG_NAME, cfg_json + "\n")
    elif layout == "file":
        if path.suffix != ".safetensors":
            raise ValueError(f"save_sae: a single-file SAE must end in .safetensors, got {path}")
        if path.is_dir():
            raise ValueError(f"save_sae: {path} is a folder; layout='file' needs a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {METADATA_KEY: cfg_json, FORMAT_KEY: FORMAT_VALUE}
        save_tensors(path, tensors, metadata)
    else:
        raise ValueError(f"save_sae: unknown layout {layout!r}; expected 'folder' or 'file'")
    return str(path)


# ---------------------------------------------------------------------------------------------
# layout detection
# ---------------------------------------------------------------------------------------------
def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # SafetensorError and OS errors alike
        raise SaeFormatError(path, f"not a readable safetensors file ({exc})") from exc


def _folder_layout(folder: Path) -> str | None:
    if (folder / CFG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        return "folder"
    if (folder / CFG_NAME).is_file() and (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / ITD_CONFIG).is_file() and (folder / ITD_WEIGHTS).is_file():
        return "itd"
    return None


def detect_layout(path: str | os.PathLike) -> tuple[str, Path]:
    """Return ``(layout, folder_or_file)`` with layout one of ``folder``, ``file``, ``saelens``, ``itd``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE path does not exist: {path}")
    if path.is_dir():
        layout = _folder_layout(path)
        if layout is not None:
            return layout, path
        nested = sorted(p.name for p in path.iterdir() if p.is_dir() and _folder_layout(p) is not None)
        hint = f"; it has SAE subfolders {nested} - pass one of them" if nested else ""
        listing = sorted(p.name for p in path.iterdir())[:12]
        raise SaeFormatError(
            path,
            "unknown SAE layout: expected cfg.json + sae.safetensors (SAeUron/EleutherAI), "
            f"cfg.json + sae_weights.safetensors (SAELens) or config.json + state_dict.pth (ItD, sdxl-unbox); "
            f"found {listing}{hint}",
        )
    parent = path.parent
    if path.name == ITD_WEIGHTS and (parent / ITD_CONFIG).is_file():
        return "itd", parent
    if path.suffix == ".safetensors":
        if path.name == WEIGHTS_NAME and (parent / CFG_NAME).is_file():
            return "folder", parent
        if path.name == SAELENS_WEIGHTS and (parent / CFG_NAME).is_file():
            return "saelens", parent
        if METADATA_KEY in _safetensors_metadata(path):
            return "file", path
        raise SaeFormatError(
            path,
            f"safetensors file has no '{METADATA_KEY}' metadata and no {CFG_NAME} beside it, so its SAE config is unknown",
        )
    raise SaeFormatError(path, "unknown SAE file type: expected a .safetensors file, an SAE folder or an ItD state_dict.pth")


# ---------------------------------------------------------------------------------------------
# reading helpers
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeFormatError(path, f"cannot read JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise SaeFormatError(path, f"config must be a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:
        raise SaeFormatError(path, f"not a readable safetensors file, possibly truncated or corrupt ({exc})") from exc
    return tensors, metadata


def _require(path: Path, tensors: dict[str, Any], keys: list[str], layout: str) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise SaeFormatError(path, f"{layout} SAE is missing tensor(s) {missing}; found {sorted(tensors)[:12]}")


def _int_field(path: Path, data: dict[str, Any], key: str) -> int | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or int(value) != value):
        raise SaeFormatError(path, f"config field {key!r} must be an integer, got {value!r}")
    return int(value)


def _make_config(cfg_path: Path, data: dict[str, Any], weights_path: Path, tensors: dict[str, Tensor],
                 check_tensors: bool = True) -> SaeConfig:
    """SaeConfig from a flat cfg dict, checked against the tensors (unless ``check_tensors`` is off: they were
    checked against another config already); d_in is inferred when absent."""
    data = dict(data)
    for key in ("d_in", "num_latents", "k", "expansion_factor"):
        _int_field(cfg_path, data, key)
    for key in ("hookpoint", "hook_name"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SaeFormatError(cfg_path, f"config field {key!r} must be a module name (text), got {data[key]!r}")
    n, d = tensors["encoder.weight"].shape if tensors["encoder.weight"].dim() == 2 else (None, None)
    if data.get("d_in") is None:
        if d is None:
            raise SaeFormatError(weights_path, f"encoder.weight must be 2-D [n, d], got shape {tuple(tensors['encoder.weight'].shape)}")
        data["d_in"] = d
    if data.get("input_unit_norm"):
        raise SaeFormatError(
            cfg_path,
            "input_unit_norm is true: this SAE expects inputs normalised to unit norm, which is not supported "
            "(SAeUron's released SAEs have it off)",
        )
    data["batch_topk"] = False  # inference always uses per-token TopK
    data["sample_topk"] = False
    try:
        cfg = SaeConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise SaeFormatError(cfg_path, f"invalid SAE config ({exc})") from exc
    if check_tensors:
        _check_tensors(weights_path, cfg, tensors, cfg_path)
    return cfg


def _check_tensors(path: Path, cfg: SaeConfig, tensors: dict[str, Tensor], cfg_path: Path | None = None) -> None:
    _require(path, tensors, list(_PARAM_SHAPES), "SAE")
    sizes = {"n": cfg.num_latents, "d": cfg.d_in}
    where = f" ({cfg_path.name})" if cfg_path is not None else ""
    for key, template in _PARAM_SHAPES.items():
        tensor = tensors[key]
        want = tuple(sizes[s] for s in template)
        got = tuple(tensor.shape)
        if got == want:
            continue
        if len(got) != len(want):
            raise SaeFormatError(path, f"tensor {key} should have shape {want} [{', '.join(template)}], got {got}")
        for axis, (symbol, g, w) in enumerate(zip(template, got, want)):
            if g != w:
                name = "d_in" if symbol == "d" else "num_latents"
                raise SaeFormatError(
                    path,
                    f"{name} mismatch: config{where} says {name}={w} but tensor {key} has shape {got} "
                    f"(axis {axis} should be {w})",
                )
    for key in _PARAM_SHAPES:
        tensor = tensors[key]
        if not tensor.is_floating_point():
            raise SaeFormatError(path, f"tensor {key} has non-float dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SaeFormatError(path, f"tensor {key} has {bad} non-finite value(s) (NaN/Inf)")


def _build(cfg: SaeConfig, tensors: dict[str, Tensor], device: str | torch.device, dtype: torch.dtype | None) -> SparseAutoencoder:
    dtype = dtype or tensors["encoder.weight"].dtype
    sae = SparseAutoencoder(cfg, device=device, dtype=dtype, init=False)
    with torch.no_grad():
        sae.encoder.weight.copy_(tensors["encoder.weight"])
        sae.encoder.bias.copy_(tensors["encoder.bias"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
    return sae


# ---------------------------------------------------------------------------------------------
# per-layout readers
# ---------------------------------------------------------------------------------------------
def _load_ours_folder(folder: Path, device, dtype) -> SparseAutoencoder:
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    data = _read_json(cfg_path)
    tensors, metadata = _read_safetensors(weights_path)
    _require(weights_path, tensors, list(_PARAM_SHAPES), "SAeUron/EleutherAI")
    cfg = _make_config(cfg_path, data, weights_path, tensors)
    if METADATA_KEY in metadata:  # written by save_sae: the weights' own config must agree with cfg.json
        try:
            own = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise SaeFormatError(weights_path, f"metadata '{METADATA_KEY}' is not valid JSON ({exc})") from exc
        if not isinstance(own, dict):
            raise SaeFormatError(weights_path, f"metadata '{METADATA_KEY}' must be a JSON object")
        saved = _make_config(weights_path, own, weights_path, tensors, check_tensors=False)
        diff = [f"{f} {getattr(cfg, f)} (cfg.json) vs {getattr(saved, f)} (weights)" for f in ("k", "d_in", "num_latents")
                if getattr(cfg, f) != getattr(saved, f)]
        if diff:
            raise SaeFormatError(cfg_path, f"{CFG_NAME} disagrees with the config saved inside {WEIGHTS_NAME}: {'; '.join(diff)} "
                                           "(a save was interrupted, or cfg.json was edited); save the SAE again or restore "
                                           f"{CFG_NAME}")
    return _build(cfg, tensors, device, dtype)


def _load_single_file(path: Path, device, dtype) -> SparseAutoencoder:
    tensors, metadata = _read_safetensors(path)
    try:
        data = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise SaeFormatError(path, f"metadata '{METADATA_KEY}' is missing or not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SaeFormatError(path, f"metadata '{METADATA_KEY}' must be a JSON object")
    _require(path, tensors, list(_PARAM_SHAPES), "single-file")
    cfg = _make_config(path, data, path, tensors)
    return _build(cfg, tensors, device, dtype)


def _saelens_k(cfg_path: Path, data: dict[str, Any]) -> int:
    kwargs = data.get("activation_fn_kwargs") or {}
    k = data.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    arch = str(data.get("architecture", "") or "").lower()
    act = str(data.get("activation_fn", data.get("activation_fn_str", "")) or "").lower()
    if k is None or (arch and arch != "topk") or (act and act != "topk"):
        kind = arch or act or "unknown"
        raise SaeFormatError(
            cfg_path,
            f"SAELens SAE with architecture/activation {kind!r} is not a TopK SAE; only TopK SAEs (with 'k') can be loaded",
        )
    return _int_field(cfg_path, {"k": k}, "k")  # type: ignore[return-value]


def _load_saelens(folder: Path, device, dtype) -> SparseAutoencoder:
    cfg_path, weights_path = folder / CFG_NAME, folder / SAELENS_WEIGHTS
    data = _read_json(cfg_path)
    for key in ("d_in", "d_sae"):
        if _int_field(cfg_path, data, key) is None:
            raise SaeFormatError(cfg_path, f"SAELens config lacks {key!r}")
    k = _saelens_k(cfg_path, data)
    norm = data.get("normalize_activations")
    if norm not in (None, "none", False):
        raise SaeFormatError(cfg_path, f"SAELens normalize_activations={norm!r} is not supported (only 'none')")
    tensors, _ = _read_safetensors(weights_path)
    _require(weights_path, tensors, ["W_enc", "b_enc", "W_dec", "b_dec"], "SAELens")
    w_enc = tensors["W_enc"]
    if w_enc.dim() != 2:
        raise SaeFormatError(weights_path, f"tensor W_enc should be 2-D [d_in, d_sae], got shape {tuple(w_enc.shape)}")
    d_in, d_sae = int(data["d_in"]), int(data["d_sae"])
    if tuple(w_enc.shape) != (d_in, d_sae):
        raise SaeFormatError(
            weights_path,
            f"d_in/d_sae mismatch: {cfg_path.name} says d_in={d_in}, d_sae={d_sae} but W_enc has shape {tuple(w_enc.shape)}",
        )
    b_dec = tensors["b_dec"]
    b_enc = tensors["b_enc"]
    if data.get("apply_b_dec_to_input", True) is False and b_dec.shape == (d_in,) and b_enc.shape == (d_sae,):
        # pre = x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = (b_enc.double() + b_dec.double() @ w_enc.double()).to(b_enc.dtype)
    ours = {
        "encoder.weight": w_enc.t().contiguous(),
        "encoder.bias": b_enc,
        "W_dec": tensors["W_dec"],
        "b_dec": b_dec,
    }
    model_name = data.get("model_name")
    cfg_dict: dict[str, Any] = {
        "d_in": d_in,
        "num_latents": d_sae,
        "k": k,
        "expansion_factor": max(d_sae // d_in, 1),
        "normalize_decoder": True,
        "hookpoint": data.get("hook_name"),
        "model_family": data.get("model_family", model_name),
        "source_format": "saelens",
    }
    if model_name is not None:
        cfg_dict["model_name"] = model_name
    cfg = _make_config(cfg_path, cfg_dict, weights_path, ours)
    return _build(cfg, ours, device, dtype)


_ITD_RUN_NAME = re.compile(r"^(?P<block>.+?)_k\d+_hidden\d+")


def _itd_hookpoint(folder: Path, data: dict[str, Any]) -> str | None:
    for key in ("hookpoint", "block", "hook_point"):
        if isinstance(data.get(key), str):
            return data[key]
    for name in (folder.name, folder.parent.name):
        match = _ITD_RUN_NAME.match(name)
        if match:
            return match.group("block")
    return None


_UNET_MODULES = ("unet.", "down_blocks.", "mid_block.", "up_blocks.")
"""Module paths of a diffusers UNet: a folder of the ItD layout whose block starts so is an sdxl-unbox SAE."""


def _load_itd(folder: Path, device, dtype) -> SparseAutoencoder:
    cfg_path, weights_path = folder / ITD_CONFIG, folder / ITD_WEIGHTS
    data = _read_json(cfg_path)
    for key in ("n_dirs_local", "d_model", "k"):
        if _int_field(cfg_path, data, key) is None:
            raise SaeFormatError(cfg_path, f"ItD config lacks {key!r}")
    try:
        state = torch.load(weights_path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise SaeFormatError(weights_path, f"cannot read ItD state dict with torch.load(weights_only=True) ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SaeFormatError(weights_path, "ItD file must hold a dict of tensors (optionally under 'state_dict')")
    _require(weights_path, state, ["encoder.weight", "decoder.weight", "pre_bias", "latent_bias"], "ItD")
    dec = state["decoder.weight"]
    if dec.dim() != 2:
        raise SaeFormatError(weights_path, f"tensor decoder.weight should be 2-D [d_model, n], got shape {tuple(dec.shape)}")
    n, d = int(data["n_dirs_local"]), int(data["d_model"])
    if tuple(dec.shape) != (d, n):
        raise SaeFormatError(
            weights_path,
            f"d_in/num_latents mismatch: {cfg_path.name} says d_model={d}, n_dirs_local={n} but decoder.weight has "
            f"shape {tuple(dec.shape)} (expected [d_model, n_dirs_local])",
        )
    ours = {
        "encoder.weight": state["encoder.weight"].contiguous(),
        "encoder.bias": state["latent_bias"].contiguous(),
        "W_dec": dec.t().contiguous(),
        "b_dec": state["pre_bias"].contiguous(),
    }
    known = {"n_dirs_local", "d_model", "k", "hookpoint", "block", "hook_point", "model_family"}
    hookpoint = _itd_hookpoint(folder, data)
    unbox = hookpoint is not None and hookpoint.startswith(_UNET_MODULES)
    cfg_dict: dict[str, Any] = {
        "d_in": d,
        "num_latents": n,
        "k": int(data["k"]),
        "expansion_factor": max(n // d, 1),
        "normalize_decoder": True,
        "hookpoint": hookpoint,
        "model_family": data.get("model_family") or ("SDXL" if unbox else None),
        "source_format": "sdxl_unbox" if unbox else "itd",
    }
    if unbox:  # trained on the block's update (output - input)
        cfg_dict["source"] = data.get("source", "diff")
        known.add("source")
    prefix = "unbox_" if unbox else "itd_"
    for key, value in data.items():
        if key not in known:
            cfg_dict[f"{prefix}{key}"] = value
    cfg = _make_config(cfg_path, cfg_dict, weights_path, ours)
    return _build(cfg, ours, device, dtype)


_READERS = {"folder": _load_ours_folder, "file": _load_single_file, "saelens": _load_saelens, "itd": _load_itd}


def load_sae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SparseAutoencoder:
    """Load an SAE from any supported layout (see the module docstring).

    ``path`` may be a folder, the ``sae.safetensors`` / ``sae_weights.safetensors`` / ``state_dict.pth``
    inside one, or a single self-describing ``.safetensors``. ``dtype=None`` keeps the file's dtype.
    The returned SAE is in eval mode and uses per-token TopK.
    """
    layout, where = detect_layout(path)
    if dtype == torch.bfloat16:  # bfloat16 rounds the weights away from the fingerprint files built with the SAE record
        sae = _READERS[layout](where, device, None)
        fingerprint = sae_fingerprint(sae)
        sae = sae.to(dtype)
        keep_sae_fingerprint(sae, fingerprint)
    else:
        sae = _READERS[layout](where, device, dtype)
    if dtype is not None:  # the file's values are finite (checked on read); a narrower dtype can overflow them
        for name, t in (("encoder.weight", sae.encoder.weight), ("encoder.bias", sae.encoder.bias),
                        ("W_dec", sae.W_dec), ("b_dec", sae.b_dec)):
            if not bool(torch.isfinite(t).all()):
                raise SaeFormatError(where, f"tensor {name} overflows {str(dtype).removeprefix('torch.')} "
                                            "(values beyond its range); load it in float32 or bfloat16")
    return sae.eval()


def convert_sae(src: str | os.PathLike, dst: str | os.PathLike, layout: str = "file") -> str:
    """Convert any readable SAE to our layout (``folder`` or single ``file``); returns ``dst``."""
    return save_sae(load_sae(src), dst, layout=layout)
