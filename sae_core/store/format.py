"""The activation store's on-disk format: names, dtypes, the manifest reader and the store's errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..artefacts import ArtefactError

FORMAT = "sae_core.activation_store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ACTIVATIONS_KEY = "activations"
_SHARD_NAME = "shard-{:05d}.safetensors"
_SHARD_RE = re.compile(r"^shard-\d{5,}\.safetensors$")
_STAGING_NAME = ".replacing"
"""Staging folder of a run that replaces a complete store (hidden; readers never look inside)."""

_STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_COLUMN_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                  "uint8": torch.uint8, "bool": torch.bool, "float32": torch.float32,
                  "float64": torch.float64, "float16": torch.float16}
# safetensors header dtype codes.
_ST_CODES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.uint8: "U8", torch.bool: "BOOL"}


class StoreFormatError(ArtefactError):
    """An activation store's manifest or shard is malformed (names the file)."""


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class IncompleteStoreError(ValueError):
    """The folder holds an activation store whose writer never finished (crash, abort, or still running)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolve_store_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        name = _dtype_name(dtype)
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _STORE_DTYPES:
        raise ValueError(f"activation store dtype must be one of {sorted(_STORE_DTYPES)}, got {dtype!r}")
    return _STORE_DTYPES[name]


def _resolve_column_dtype(name: str, dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    key = _dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype).removeprefix("torch.")
    if key not in _COLUMN_DTYPES:
        raise ValueError(f"metadata column '{name}': dtype must be one of {sorted(_COLUMN_DTYPES)}, got {dtype!r}")
    return _COLUMN_DTYPES[key]


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreFormatError(path, f"activation store manifest is unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreFormatError(path, f"not an activation store manifest (expected format '{FORMAT}')")
    return manifest
