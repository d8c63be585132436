"""Folders and names of what the SAE and SAeUron nodes write: user-typed names made safe, the
activation stores in ``output/sae_activations``, SAE training checkpoints in ``output/sae_training``,
trained SAEs in ``models/sae`` and concept feature tables in ``models/sae_features``; and the prompt
lists the nodes read from ``models/prompts``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

import folder_paths
from sae_core.artefacts import ArtefactDecision, decide_artefact
from sae_core.store import ActivationReader, IncompleteStoreError

from .common import FEATURES_FOLDER, SAE_FOLDER, forget_file_list, register_model_folder, shipped_names, shipped_path

__all__ = [
    "ACTIVATIONS_FOLDER",
    "FEATURES_FOLDER",
    "NO_FILE",
    "PROMPTS_FOLDER",
    "TRAINING_FOLDER",
    "dataset_folder",
    "dropdown_names",
    "feature_filenames",
    "features_full_path",
    "features_path_for",
    "forget_file_list",
    "prompt_filenames",
    "prompt_file_path",
    "register_features_folder",
    "resolve_dataset",
    "safe_name",
    "store_settings",
    "sae_output_folder",
    "training_folder",
]

ACTIVATIONS_FOLDER = "sae_activations"
"""Sub-folder of ComfyUI's output folder holding collected activation stores."""

TRAINING_FOLDER = "sae_training"
"""Sub-folder of ComfyUI's output folder holding SAE training checkpoints (resume after Cancel)."""

PROMPTS_FOLDER = "prompts"
"""Model folder of prompt lists (one prompt per line, ``.txt`` or ``.txt.gz``): ``ComfyUI/models/prompts``."""

PROMPT_EXTENSIONS = {".txt", ".gz"}

NO_FILE = "none"
"""Choice of the feature-file combo meaning 'use the features input'."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-/]*$")


def dropdown_names(folder: str) -> list[str]:
    """A file input's choices for model folder ``folder`` (registered): ``none``, the files shipped with MiniCanvas
    (``minicanvas/...``), then the folder's own files."""
    shipped = shipped_names(folder)
    return [NO_FILE] + shipped + [n for n in folder_paths.get_filename_list(folder) if n not in shipped]


def register_features_folder() -> list[str]:
    """Register ``models/sae_features`` and ``output/sae_features`` (``.safetensors``); idempotent."""
    return register_model_folder(FEATURES_FOLDER, [os.path.join(folder_paths.models_dir, FEATURES_FOLDER),
                                                   os.path.join(folder_paths.get_output_directory(), FEATURES_FOLDER)],
                                 {".safetensors"})


def feature_filenames() -> list[str]:
    """``none``, the SAeUron statistics shipped with MiniCanvas (``minicanvas/saeuron_style.safetensors`` ...)
    and the feature tables of the model folders."""
    register_features_folder()
    return dropdown_names(FEATURES_FOLDER)


def features_full_path(name: str) -> str:
    """Absolute path of the feature table ``name`` from the dropdown; FileNotFoundError naming the folders."""
    register_features_folder()
    path = shipped_path(FEATURES_FOLDER, name) or folder_paths.get_full_path(FEATURES_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"features_file: '{name}' was not found in "
                                f"{', '.join(folder_paths.get_folder_paths(FEATURES_FOLDER))}")
    return path


def safe_name(name: str, what: str) -> str:
    """A relative name (sub-folders allowed) without traversal; ValueError naming the input otherwise."""
    name = (name or "").strip().replace("\\", "/")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    parts = [p for p in name.split("/") if p]
    if not parts or not _NAME_RE.match(name) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{what}: {name!r} is not a usable name (letters, digits, space, _ . - and / for sub-folders)")
    return "/".join(parts)


def dataset_folder(name: str) -> Path:
    """``output/sae_activations/<name>``."""
    return Path(folder_paths.get_output_directory()) / ACTIVATIONS_FOLDER / safe_name(name, "dataset_name")


def resolve_dataset(path_or_name: str) -> Path:
    """An activation store folder from an absolute path or a name under ``output/sae_activations``."""
    text = (path_or_name or "").strip()
    if not text:
        raise ValueError("dataset_path is empty: wire the output of Collect SAE Activations (or type its folder)")
    p = Path(text)
    folder = p if p.is_absolute() else dataset_folder(text)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_path: no activation store at {folder}")
    return folder


def sae_output_folder(name: str) -> Path:
    """``models/sae/<name>`` (the folder layout: ``cfg.json`` + ``sae.safetensors``)."""
    return Path(folder_paths.models_dir) / SAE_FOLDER / safe_name(name, "filename")


def training_folder(name: str) -> Path:
    """``output/sae_training/<name>``: the checkpoints of an SAE training run (one sub-folder per data and settings)."""
    return Path(folder_paths.get_output_directory()) / TRAINING_FOLDER / safe_name(name, "filename")


def features_path_for(name: str) -> Path:
    """``models/sae_features/<name>.safetensors``; a ValueError for the name of a table that ships with MiniCanvas
    (the features_file list always means the shipped one, so a table saved under its name could not be picked)."""
    clean = safe_name(name, "filename")
    if shipped_path(FEATURES_FOLDER, f"{clean}.safetensors") is not None:
        raise ValueError(f"filename: '{clean}' is the name of a feature table that ships with MiniCanvas; the "
                         "features_file list would always give the shipped one, so choose another name")
    return Path(folder_paths.models_dir) / FEATURES_FOLDER / f"{clean}.safetensors"


def register_prompts_folder() -> list[str]:
    """Register ``models/prompts`` (``.txt``, ``.gz``) with ``folder_paths``; idempotent."""
    return register_model_folder(PROMPTS_FOLDER, [os.path.join(folder_paths.models_dir, PROMPTS_FOLDER)],
                                 PROMPT_EXTENSIONS)


def prompt_filenames() -> list[str]:
    """The prompt files ComfyUI can see in ``models/prompts``."""
    register_prompts_folder()
    return [n for n in folder_paths.get_filename_list(PROMPTS_FOLDER) if n.endswith((".txt", ".txt.gz"))]


def prompt_file_path(name: str) -> Path:
    """Absolute path of a prompt file from the dropdown; FileNotFoundError naming the folders otherwise."""
    register_prompts_folder()
    path = folder_paths.get_full_path(PROMPTS_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"prompt file '{name}' was not found in {', '.join(register_prompts_folder())}")
    return Path(path)


def decide_store(what: str, folder: Path, settings: dict, overwrite: bool,
                 normalise: Optional[Callable[[dict], dict]] = None) -> ArtefactDecision:
    """The activation-store policy of the collect nodes: a complete store of the same ``settings`` is reused (even
    with ``overwrite`` on), one of other settings is refused unless ``overwrite`` is on. ``normalise`` maps the
    settings a store records to today's form before they are compared."""
    found = store_settings(folder)
    if found is not None and normalise is not None:
        found = normalise(found)
    return decide_artefact(what, folder, settings, found, overwrite=bool(overwrite) and found != settings)


def store_settings(folder: Path) -> Optional[dict]:
    """The settings a complete activation store in ``folder`` was collected with; None when there is none (or it
    is unfinished or broken: a new collection then replaces it)."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        return dict(ActivationReader(folder).attrs.get("settings") or {})
    except (IncompleteStoreError, ValueError, FileNotFoundError):
        return None
