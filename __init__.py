"""ComfyUI entry point of the concept-erasure node pack.

ComfyUI imports this file from ``custom_nodes/<pack>/`` and reads ``NODE_CLASS_MAPPINGS``
and ``NODE_DISPLAY_NAME_MAPPINGS`` (the classic V1 node API, which every ComfyUI version
loads; the pack deliberately exports no ``comfy_entrypoint``).

- The pack folder is put on ``sys.path`` so the nodes can ``import sae_core``.
- ``nodes`` is imported relatively: ComfyUI has a top-level ``nodes`` module of its own.
- Outside ComfyUI (e.g. when pytest imports this file as the package of the repository
  root) nothing ComfyUI-specific is imported and the mappings are empty.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    # Appended, not prepended: the pack's folders must not shadow ComfyUI's own modules.
    sys.path.append(_PACK_DIR)


def _inside_comfyui() -> bool:
    """True when ComfyUI's ``folder_paths`` module is importable (or already imported)."""
    if "folder_paths" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


WEB_DIRECTORY = "./web"
"""Front-end extension: shows the reports the ItD nodes return (their ``ui`` text) on the nodes."""

if _inside_comfyui() and __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
