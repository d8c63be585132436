"""The pack loads through ComfyUI's own loader and describes its nodes the way /object_info does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest



def _object_info(nodes, node_id: str) -> dict:
    """The V1 fields ComfyUI's /object_info serves for one node (server-free)."""
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    return {
        "input": spec,
        "input_order": {section: list(entries) for section, entries in spec.items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": node_id,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "output_tooltips": getattr(cls, "OUTPUT_TOOLTIPS", None),
    }


def test_pack_registers_its_nodes(comfy):
    assert comfy.nodes_pkg.FAILED_MODULES == {}, "\n".join(comfy.nodes_pkg.FAILED_MODULES.values())
    for node_id in comfy.node_ids:
        assert node_id in comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
    # Every node the pack exports went to ComfyUI, and the pack uses only the V1 API.
    assert set(comfy.pack.NODE_CLASS_MAPPINGS) <= set(comfy.nodes.NODE_CLASS_MAPPINGS)
    assert not hasattr(comfy.pack, "comfy_entrypoint")


def test_loading_keeps_comfyui_modules_intact(comfy):
    # The pack's ``nodes`` folder must not have replaced ComfyUI's top-level ``nodes``.
    assert Path(sys.modules["nodes"].__file__).resolve() == comfy.comfy_root / "nodes.py"
    assert "CheckpointLoaderSimple" in comfy.nodes.NODE_CLASS_MAPPINGS


def test_object_info_for_every_pack_node(comfy):
    for node_id, cls in comfy.pack.NODE_CLASS_MAPPINGS.items():
        info = _object_info(comfy.nodes, node_id)
        json.dumps(info)  # what the server sends must be JSON
        assert info["category"].startswith("concept_erasure/")
        assert info["display_name"] != node_id
        assert info["description"]
        assert len(info["output_tooltips"]) == len(info["output"])
        for section, names in info["input_order"].items():
            if section == "hidden":
                continue
            for name in names:
                io_type, options = info["input"][section][name]
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if isinstance(io_type, list):
                    assert all(isinstance(choice, str) for choice in io_type), f"{node_id}.{name} combo"
                    if "default" in options:
                        assert options["default"] in io_type, f"{node_id}.{name} default not a choice"


def test_sae_folder_in_comfyui(comfy):
    paths, extensions = comfy.folder_paths.folder_names_and_paths["sae"]
    assert str(comfy.base / "models" / "sae") in paths
    assert os.path.join(comfy.folder_paths.get_output_directory(), "sae") in paths
    assert ".safetensors" in extensions
    listed = comfy.nodes_pkg.common.sae_filenames()  # .pth files only as ItD folders (state_dict.pth + config.json)
    assert all(name.endswith(".safetensors") or name.endswith("/state_dict.pth") for name in listed)


def test_server_start_loads_pack(comfy, tmp_path):
    """``main.py --quick-test-for-ci`` loads every node as a real start does, then exits."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-concept-erasure").symlink_to(comfy.repo_root, target_is_directory=True)
    cmd = [
        sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--disable-auto-launch",
        "--disable-api-nodes", "--base-directory", str(base),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=comfy.comfy_root, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    pack_lines = [line for line in log.splitlines() if "comfyui-concept-erasure" in line]
    assert pack_lines, f"the pack was not among the loaded custom nodes:\n{log[-4000:]}"
    assert not any("IMPORT FAILED" in line for line in pack_lines), "\n".join(pack_lines)
    assert "could not import nodes." not in log, log[-4000:]


def test_progress_and_interrupt_adapters(comfy, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    common = comfy.nodes_pkg.common
    seen = []
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append((value, total)))
    with common.Progress(3, desc="steps") as bar:
        for _ in range(4):  # one step too many is clamped
            bar.update(1)
    assert seen == [(1, 3), (2, 3), (3, 3), (3, 3)]

    assert not common.interrupt_requested()
    common.throw_if_interrupted()
    comfy.nodes.interrupt_processing(True)
    try:
        assert common.interrupt_requested()
        with pytest.raises(mm.InterruptProcessingException):
            common.throw_if_interrupted()
    finally:
        comfy.nodes.interrupt_processing(False)
