"""Shared pieces of the ComfyUI adapters: naming, the ``sae`` model folder, progress,
interrupts and tooltips.

Everything ComfyUI-specific that more than one node module needs lives here, so the method
modules stay thin. Imports of ``comfy.*`` are deferred to the functions that use them:
importing ``comfy.model_management`` on a machine without a GPU fails unless ComfyUI was
started with ``--cpu``, and this module must stay importable wherever ``folder_paths`` is.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

import folder_paths
from sae_core.artefacts import file_fingerprint

__all__ = [
    "NODE_ID_PREFIX",
    "CATEGORY_ROOT",
    "SAE_FOLDER",
    "FEATURES_FOLDER",
    "FISHER_FOLDER",
    "SAMPLES_FOLDER",
    "SHIPPED_PREFIX",
    "shipped_names",
    "shipped_path",
    "SAE_EXTENSIONS",
    "SAE_TYPE",
    "DTYPE_CHOICES",
    "category",
    "node_id",
    "register_model_folder",
    "register_sae_folder",
    "sae_folder_paths",
    "sae_filenames",
    "sae_full_path",
    "file_fingerprint",
    "forget_file_list",
    "torch_dtype",
    "comfy_device",
    "Progress",
    "throw_if_interrupted",
    "interrupt_requested",
    "inp",
    "missing_tooltips",
]

# -- naming ------------------------------------------------------------------------------------

NODE_ID_PREFIX = "CE_"
"""Every node id of this pack starts with this, so packs cannot overwrite each other's nodes."""

CATEGORY_ROOT = "concept_erasure"
"""Every node category of this pack lives under this menu."""

SAE_TYPE = "SAE"
"""Socket type of a loaded sparse autoencoder (a ``sae_core.sae.SparseAutoencoder``)."""


def category(sub: str = "") -> str:
    """Menu path of a node: ``category("sae")`` is ``"concept_erasure/sae"``."""
    sub = sub.strip("/")
    return f"{CATEGORY_ROOT}/{sub}" if sub else CATEGORY_ROOT


def node_id(name: str) -> str:
    """Pack-unique node id: ``node_id("LoadSAE")`` is ``"CE_LoadSAE"``."""
    return name if name.startswith(NODE_ID_PREFIX) else NODE_ID_PREFIX + name


# -- the ``sae`` model folder -------------------------------------------------------------------

SAE_FOLDER = "sae"
"""Name of the model folder: ``ComfyUI/models/sae`` (and ``output/sae`` for SAEs we train)."""

SAE_EXTENSIONS = frozenset({".safetensors", ".pth"})
"""Files listed in the SAE dropdown. A folder-layout SAE appears as ``<name>/sae.safetensors``
(its ``cfg.json`` sits beside it); a single-file SAE carries its config in the header; a published ItD
SAE appears as ``<name>/state_dict.pth`` (its ``config.json`` beside it; read without unpickling code).
Other ``.pth`` files are not listed."""

ITD_WEIGHTS = "state_dict.pth"
ITD_CONFIG = "config.json"

FEATURES_FOLDER = "sae_features"
"""Model folder of SAeUron concept feature tables: ``ComfyUI/models/sae_features`` (and ``output/sae_features``)."""

FISHER_FOLDER = "sae_fisher"
"""Model folder of Selective Amnesia Fisher files: ``ComfyUI/models/sae_fisher``."""

SAMPLES_FOLDER = "sae_samples"
"""Model folder of Selective Amnesia sample banks (a model's samples with their prompts): ``ComfyUI/models/sae_samples``
(and the samples Compute Fisher made, ``output/selective_amnesia/fisher_samples``)."""


# -- files that ship with the pack (MiniCanvas) ---------------------------------------------------

SHIPPED_PREFIX = "minicanvas/"
"""Dropdown names of the files that ship with MiniCanvas start with this; such a name always means the
shipped file (a user file of the same relative name in a model folder is shadowed)."""

SHIPPED_FILES: dict[str, dict[str, str]] = {
    SAE_FOLDER: {
        "saeuron_style.safetensors": "saeuron_sae_style.safetensors",
        "saeuron_object.safetensors": "saeuron_sae_object.safetensors",
        "itd_text.safetensors": "itd_text_sae.safetensors",
    },
    FEATURES_FOLDER: {
        "saeuron_style.safetensors": "saeuron_stats_style.safetensors",
        "saeuron_object.safetensors": "saeuron_stats_object.safetensors",
    },
    FISHER_FOLDER: {
        "amnesia_fisher_xattn.safetensors": "amnesia_fisher_xattn_k16_308b8c7d875facf2.safetensors",
    },
    SAMPLES_FOLDER: {
        "amnesia_bank.safetensors": "amnesia_bank_1000-1001_20.safetensors",
    },
}
"""Per model folder: dropdown name (after :data:`SHIPPED_PREFIX`) -> file in the MiniCanvas weights folder.
The SAeUron style SAE (``output_blocks.3.1``) and object SAE (``output_blocks.2.1``) with their concept
statistics, ItD's text-encoder SAE, and the data of ``python -m sae_core bench --method amnesia``: the Fisher of
the cross-attention weights and the sample bank (every MiniCanvas prompt, seeds 1000 and 1001, 20 DDIM steps,
cfg 7), the files its plug-in finds for the shipped model. The model and the judges are not listed."""


def _shipped_dir() -> str:
    from sae_core.minicanvas.files import WEIGHTS_DIR

    return str(WEIGHTS_DIR)


def shipped_names(folder: str) -> list[str]:
    """Dropdown names of the shipped files of model folder ``folder`` that are present (``minicanvas/...``)."""
    root = _shipped_dir()
    return [SHIPPED_PREFIX + name for name, file in SHIPPED_FILES.get(folder, {}).items()
            if os.path.isfile(os.path.join(root, file))]


def shipped_path(folder: str, name: str) -> str | None:
    """Absolute path of the shipped file listed as ``name`` in ``folder``'s dropdown; None for other names."""
    text = (name or "").replace("\\", "/")
    if not text.startswith(SHIPPED_PREFIX):
        return None
    file = SHIPPED_FILES.get(folder, {}).get(text[len(SHIPPED_PREFIX):])
    if file is None:
        return None
    path = os.path.join(_shipped_dir(), file)
    return path if os.path.isfile(path) else None


def forget_file_list(folder_name: str) -> None:
    """Drop ComfyUI's cached file list of a model folder, so a file just written shows up."""
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(folder_name, None)


def register_model_folder(folder: str, defaults: list[str], extensions: set[str]) -> list[str]:
    """Register model folder ``folder`` with ComfyUI's ``folder_paths``: its known paths plus ``defaults``, its
    extensions plus ``extensions``. Idempotent: if the folder is already known (e.g. from
    ``extra_model_paths.yaml``, which registers folders without extensions), its paths are kept, ours are appended
    and the extension sets are united; ComfyUI's cached file list is dropped only when that changes something.
    Returns the registered paths."""
    table = folder_paths.folder_names_and_paths
    paths, exts = table.get(folder, ([], set()))
    new_paths = list(paths) + [p for p in defaults if p not in paths]
    new_exts = set(exts) | set(extensions)
    if folder not in table or new_paths != list(paths) or new_exts != set(exts):
        table[folder] = (new_paths, new_exts)
        forget_file_list(folder)  # a list cached before was built from the old paths/extensions
    return new_paths


def register_sae_folder() -> list[str]:
    """Register ``models/sae`` and ``output/sae`` (SAE files) with ComfyUI's ``folder_paths``
    (:func:`register_model_folder`)."""
    return register_model_folder(SAE_FOLDER, [os.path.join(folder_paths.models_dir, SAE_FOLDER),
                                              os.path.join(folder_paths.get_output_directory(), SAE_FOLDER)],
                                 set(SAE_EXTENSIONS))


def sae_folder_paths() -> list[str]:
    """Folders searched for SAE files, in priority order."""
    register_sae_folder()
    return list(folder_paths.get_folder_paths(SAE_FOLDER))


def _listed(name: str, folders: list[str]) -> bool:
    if not name.endswith(".pth"):
        return True
    if os.path.basename(name) != ITD_WEIGHTS:
        return False
    return any(os.path.isfile(os.path.join(root, os.path.dirname(name), ITD_CONFIG)) for root in folders)


def sae_filenames() -> list[str]:
    """Relative names of the SAE files ComfyUI can see (the dropdown's contents): the SAEs shipped with
    MiniCanvas (``minicanvas/saeuron_style.safetensors`` ...), then safetensors SAEs and ItD folders
    (``state_dict.pth`` beside a ``config.json``) of the model folders."""
    register_sae_folder()
    folders = sae_folder_paths()
    shipped = shipped_names(SAE_FOLDER)
    found = [name for name in folder_paths.get_filename_list(SAE_FOLDER) if _listed(name, folders)]
    return shipped + [name for name in found if name not in shipped]


def sae_full_path(name: str) -> str:
    """Absolute path of the SAE file ``name`` from the dropdown.

    Raises ``FileNotFoundError`` naming the file and the folders searched.
    """
    register_sae_folder()
    path = shipped_path(SAE_FOLDER, name) or folder_paths.get_full_path(SAE_FOLDER, name)
    if path is None:
        searched = ", ".join(sae_folder_paths()) or "(no folder registered)"
        raise FileNotFoundError(f"SAE file '{name}' was not found in the sae model folders: {searched}")
    return path


# -- devices and dtypes -------------------------------------------------------------------------

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
"""Names offered by dtype combos, in menu order (the first is the default)."""


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; a clear ``ValueError`` for anything else."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return getattr(torch, name)


def comfy_device(choice: str = "auto") -> torch.device:
    """Resolve a device combo: ``"cpu"``, or ``"auto"`` for the device ComfyUI runs models on.

    Outside a running ComfyUI (no ``comfy.model_management``) ``"auto"`` means CPU.
    """
    if choice == "cpu":
        return torch.device("cpu")
    if choice != "auto":
        raise ValueError(f"device must be 'auto' or 'cpu', got {choice!r}")
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cpu")
    return torch.device(mm.get_torch_device())


# -- progress and interrupts --------------------------------------------------------------------


class Progress:
    """Progress reporting that works inside and outside a ComfyUI server.

    Inside ComfyUI this drives ``comfy.utils.ProgressBar`` (the bar on the node in the UI;
    a no-op when no server is attached). With ``console=True`` a tqdm bar is shown as well,
    which is also the only bar when ComfyUI is absent.
    """

    def __init__(self, total: int, desc: str = "", node_id: str | None = None, console: bool = False) -> None:
        self.total = int(total)
        self.current = 0
        self._bar = None
        self._tqdm = None
        try:
            import comfy.utils

            self._bar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        except (ImportError, AttributeError, TypeError):
            self._bar = None
        if console or self._bar is None:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm(total=self.total, desc=desc or None, leave=False, disable=not console)
            except ImportError:
                self._tqdm = None

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.update_absolute(self.current + n)

    def update_absolute(self, value: int) -> None:
        """Set the number of finished steps."""
        value = max(0, min(int(value), self.total))
        delta = value - self.current
        self.current = value
        if self._bar is not None:
            self._bar.update_absolute(value, self.total)
        if self._tqdm is not None and delta:
            self._tqdm.update(delta)

    def close(self) -> None:
        """Close the console bar, if any."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def interrupt_requested() -> bool:
    """True when the user pressed Cancel in ComfyUI (always False outside ComfyUI).

    Suitable as the ``should_stop`` callable of long ``sae_core`` loops.
    """
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    return bool(mm.processing_interrupted())


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user cancelled; no-op outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


# -- inputs and tooltips ------------------------------------------------------------------------


def inp(io_type: Any, tooltip: str, **options: Any) -> tuple:
    """One ``INPUT_TYPES`` entry with a mandatory tooltip.

    ``inp("INT", "Steps to train.", default=100, min=1)`` is
    ``("INT", {"tooltip": "Steps to train.", "default": 100, "min": 1})``. ``io_type`` may be a
    list of strings for a combo.
    """
    if not tooltip or not tooltip.strip():
        raise ValueError("every node input needs a non-empty tooltip")
    return (io_type, {"tooltip": tooltip, **options})


def sampler_choices() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (``["euler"], ["normal"]`` outside ComfyUI, for pack inspection)."""
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return ["euler"], ["normal"]


def missing_tooltips(node_cls: type) -> list[str]:
    """Names of visible inputs of a V1 node class that lack a tooltip (empty list when all have one)."""
    spec: Mapping[str, Mapping[str, Any]] = node_cls.INPUT_TYPES()
    missing = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            opts = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 else {}
            if not isinstance(opts, Mapping) or not str(opts.get("tooltip", "")).strip():
                missing.append(name)
    return missing
