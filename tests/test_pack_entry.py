"""The pack's ComfyUI entry point, checked without a ComfyUI checkout.

The root ``__init__.py`` is imported from its path under a made-up module name, as
ComfyUI's loader does. When ComfyUI's ``folder_paths``/``comfy`` are not importable,
minimal stand-ins are put into ``sys.modules`` for the duration of each test.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ID_PREFIX = "CE_"
CATEGORY_ROOT = "concept_erasure/"


def _real_module_available(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _fake_folder_paths(base: Path) -> types.ModuleType:
    """The few ``folder_paths`` members the pack uses, with ComfyUI's semantics."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(base / "models")
    fp.folder_names_and_paths = {}
    fp.filename_list_cache = {}

    def get_output_directory() -> str:
        return str(base / "output")

    def get_folder_paths(name: str) -> list[str]:
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name: str) -> list[str]:
        paths, extensions = fp.folder_names_and_paths[name]
        found = set()
        for root in paths:
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    if not extensions or os.path.splitext(f)[1].lower() in extensions:
                        found.add(os.path.relpath(os.path.join(dirpath, f), root))
        return sorted(found)

    def get_full_path(name: str, filename: str) -> str | None:
        if name not in fp.folder_names_and_paths:
            return None
        for root in fp.folder_names_and_paths[name][0]:
            path = os.path.join(root, filename)
            if os.path.isfile(path):
                return path
        return None

    fp.get_output_directory = get_output_directory
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    return fp


def _fake_comfy() -> dict[str, types.ModuleType]:
    """``comfy`` with a CPU-only ``model_management`` and a recording ``utils.ProgressBar``."""
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so ``import comfy.x`` looks in sys.modules
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.processing_interrupted = lambda: False
    mm.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        updates: list = []

        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            ProgressBar.updates.append((value, total))

    utils.ProgressBar = ProgressBar
    comfy.model_management = mm
    comfy.utils = utils
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}


@pytest.fixture
def pack(tmp_path, monkeypatch):
    """The pack imported from its folder (fakes for ComfyUI when it is absent)."""
    if not _real_module_available("folder_paths"):
        monkeypatch.setitem(sys.modules, "folder_paths", _fake_folder_paths(tmp_path))
    if not _real_module_available("comfy"):
        for name, module in _fake_comfy().items():
            monkeypatch.setitem(sys.modules, name, module)
    import folder_paths

    # Whatever registered "sae" before (another copy of the pack) is restored afterwards.
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", dict(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(sys, "path", list(sys.path))

    name = f"ce_pack_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        module.common = sys.modules[f"{name}.nodes.common"]
        module.nodes_pkg = sys.modules[f"{name}.nodes"]
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_exports_v1_mappings_only(pack):
    assert pack.nodes_pkg.FAILED_MODULES == {}, "\n".join(pack.nodes_pkg.FAILED_MODULES.values())
    assert "CE_LoadSAE" in pack.NODE_CLASS_MAPPINGS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert not hasattr(pack, "comfy_entrypoint"), "export either the V1 mappings or comfy_entrypoint, never both"


def test_pack_folder_on_sys_path(pack):
    assert str(REPO_ROOT) in sys.path
    # The pack's own ``nodes`` was imported relatively, never as a top-level module.
    top = sys.modules.get("nodes")
    assert top is None or Path(top.__file__).resolve().parent != REPO_ROOT / "nodes"


def test_every_node_class_has_the_v1_contract(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert isinstance(spec, dict) and "required" in spec, node_id
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, node_id
        assert callable(getattr(cls, cls.FUNCTION, None)), f"{node_id}.FUNCTION names no method"
        assert cls.CATEGORY.startswith(CATEGORY_ROOT), f"{node_id} category {cls.CATEGORY!r}"
        assert isinstance(getattr(cls, "DESCRIPTION", None), str) and cls.DESCRIPTION.strip(), node_id
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), f"{node_id}.{attr} length"
        assert hasattr(cls, "OUTPUT_TOOLTIPS"), f"{node_id} has no OUTPUT_TOOLTIPS"


def test_every_input_has_a_tooltip(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert isinstance(entry, tuple) and len(entry) == 2, f"{node_id}.{name}: expected (type, options)"
                tooltip = entry[1].get("tooltip", "")
                assert isinstance(tooltip, str) and tooltip.strip(), f"{node_id}.{name} has no tooltip"
        assert pack.common.missing_tooltips(cls) == [], node_id


def test_ids_and_display_names_are_consistent(pack):
    names = list(pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(set(names)) == len(names), "display names must be unique"
    for node_id, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id.startswith(ID_PREFIX), node_id
        assert node_id[len(ID_PREFIX):].isidentifier(), node_id
        # The id prefix is for uniqueness only; menus show plain words.
        assert display.strip() == display and display and not display.startswith(ID_PREFIX), display
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["CE_LoadSAE"] == "Load SAE"
    assert pack.NODE_CLASS_MAPPINGS["CE_LoadSAE"].CATEGORY == "concept_erasure/sae"


def test_sae_folder_registered_with_safetensors(pack):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["sae"]
    assert os.path.join(folder_paths.models_dir, "sae") in paths
    assert os.path.join(folder_paths.get_output_directory(), "sae") in paths
    assert set(extensions) == {".safetensors", ".pth"}  # .pth: listed only as ItD folders


def test_sae_folder_merges_with_extra_model_paths(pack, monkeypatch, tmp_path):
    import folder_paths

    # extra_model_paths.yaml registers folders with an empty extension set.
    user_dir = str(tmp_path / "shared_saes")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([user_dir], set()))
    pack.common.register_sae_folder()
    paths, extensions = folder_paths.folder_names_and_paths["sae"]
    assert paths[0] == user_dir
    assert os.path.join(folder_paths.models_dir, "sae") in paths
    assert set(extensions) == {".safetensors", ".pth"}  # .pth: listed only as ItD folders
    before = (list(paths), set(extensions))
    pack.common.register_sae_folder()  # idempotent
    assert (list(folder_paths.folder_names_and_paths["sae"][0]), set(extensions)) == before


def test_root_init_without_comfyui_is_empty(monkeypatch):
    if _real_module_available("folder_paths"):
        pytest.skip("ComfyUI is importable in this environment")
    name = f"ce_pack_bare_{uuid.uuid4().hex}"
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert f"{name}.nodes" not in sys.modules


def test_load_sae_node_with_cache(pack, tmp_path, monkeypatch):
    import folder_paths
    from sae_core.config import SaeConfig
    from sae_core.formats import save_sae
    from sae_core.sae import SparseAutoencoder

    sae_dir = tmp_path / "saes"
    sae_dir.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(sae_dir)], {".safetensors"}))
    getattr(folder_paths, "filename_list_cache", {}).pop("sae", None)
    pack.common.register_sae_folder()

    gen = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4, hookpoint="unet.mid_block"), generator=gen)
    path = save_sae(sae, str(sae_dir / "tiny.safetensors"), layout="file")

    node_cls = pack.NODE_CLASS_MAPPINGS["CE_LoadSAE"]
    assert "tiny.safetensors" in node_cls.INPUT_TYPES()["required"]["sae_name"][0]
    pack.nodes_pkg.sae_nodes.SAE_CACHE.clear()
    with torch.inference_mode():
        (first,) = node_cls().load("tiny.safetensors", device="cpu", dtype="float32")
        (again,) = node_cls().load("tiny.safetensors", device="cpu", dtype="float32")
        (half,) = node_cls().load("tiny.safetensors", device="cpu", dtype="bfloat16")
    assert again is first, "an unchanged file is served from the cache"
    assert half is not first and half.W_dec.dtype == torch.bfloat16
    assert not first.W_dec.is_inference(), "parameters must stay usable outside inference mode"
    x = torch.randn(5, 8, generator=gen)
    ref = sae.encode(x)
    got = first.encode(x)
    assert torch.equal(got.top_indices, ref.top_indices) and torch.equal(got.top_acts, ref.top_acts)

    fingerprint = node_cls.IS_CHANGED(sae_name="tiny.safetensors", device="cpu", dtype="float32")
    assert fingerprint == node_cls.IS_CHANGED(sae_name="tiny.safetensors", device="cpu", dtype="float32")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert node_cls.IS_CHANGED(sae_name="tiny.safetensors", device="cpu", dtype="float32") != fingerprint
    with torch.inference_mode():
        (reloaded,) = node_cls().load("tiny.safetensors", device="cpu", dtype="float32")
    assert reloaded is not first, "a changed file is read again"


def test_progress_and_interrupt_degrade_gracefully(pack):
    common = pack.common
    with common.Progress(3, desc="steps") as bar:
        for _ in range(4):
            bar.update(1)
        assert bar.current == 3, "progress is clamped to the total"
        bar.update_absolute(1)
        assert bar.current == 1
    assert common.interrupt_requested() is False
    common.throw_if_interrupted()  # no interrupt pending: returns quietly

    assert common.category("sae") == "concept_erasure/sae" and common.node_id("LoadSAE") == "CE_LoadSAE"
    assert common.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        common.torch_dtype("float64")
    with pytest.raises(ValueError, match="tooltip"):
        common.inp("INT", "  ")
