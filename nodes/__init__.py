"""ComfyUI adapters of the concept-erasure pack (classic V1 node API).

Each module in ``NODE_MODULES`` defines ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; this package merges them. To add a method, write
``nodes/<method>.py`` and append its name to ``NODE_MODULES``.

This package is always imported relatively (as ``<pack>.nodes``): ComfyUI has a top-level
module called ``nodes`` of its own.

A module that fails to import is logged and recorded in ``FAILED_MODULES`` (name ->
error text) so the rest of the pack still loads; the tests require it to be empty.
"""

from __future__ import annotations

import importlib
import logging
import traceback

from . import common

log = logging.getLogger("concept_erasure")

NODE_MODULES: list[str] = [
    "sae_nodes",
    "sae_tools",
    "amnesia",
    "rece",
    "itd",
    "itd_gate",
    "text_sae",
    "saeuron",
    "minicanvas",
    "report",
    "probe",
]
"""Node modules of this package, in menu order."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
FAILED_MODULES: dict[str, str] = {}

common.register_sae_folder()

for _name in NODE_MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except Exception as _err:  # keep the other methods usable; the error is reported below
        FAILED_MODULES[_name] = "".join(traceback.format_exception(_err))
        log.error("concept_erasure: could not import nodes.%s, its nodes are unavailable:\n%s", _name, FAILED_MODULES[_name])
        continue
    for _node_id, _cls in _module.NODE_CLASS_MAPPINGS.items():
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node id {_node_id!r} is defined twice (second time in nodes.{_name})")
        if not _node_id.startswith(common.NODE_ID_PREFIX):
            raise RuntimeError(f"node id {_node_id!r} in nodes.{_name} lacks the {common.NODE_ID_PREFIX!r} prefix")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "FAILED_MODULES", "NODE_MODULES"]
