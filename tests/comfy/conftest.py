"""Integration tests against a real ComfyUI checkout.

Set ``COMFYUI_PATH`` to a ComfyUI source checkout and run with that checkout's venv, e.g.
``COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/comfy``
(``make test-comfy``). Without ``COMFYUI_PATH`` every test here is skipped.

ComfyUI is configured at import time, before anything can import ``folder_paths``: CPU only
(as ``--cpu``; ``COMFYUI_DEVICE=gpu`` lets ComfyUI use its GPU instead) and a temporary base directory
(as ``--base-directory``), so ``models/`` and ``output/`` are throwaway folders. The pack is then loaded through ComfyUI's own loader.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip()
# shared helper modules of these tests (tiny_models) import by name under --import-mode=importlib
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))
SKIP_REASON = "COMFYUI_PATH not set: tests/comfy needs a ComfyUI checkout and its venv (see README)"

PACK_NODE_IDS = ("CE_LoadSAE", "CE_SAComputeFisher", "CE_SALoRATrain", "CE_RECEEditModel", "CE_SaveEditAsLoRA",
                 "CE_ItDPromptClassifier", "CE_ItDPromptGate", "CE_CollectTextActivations",
                 "CE_CollectSAEActivations", "CE_TrainSAE", "CE_SAeUronConceptFeatures", "CE_SAeUronConceptBlock",
                 "CE_DownloadSAE", "CE_MiniCanvasCheckpoint", "CE_ErasureReport", "CE_ConceptInversionProbe", "CE_SAeUronFiringMap")
"""Node ids the pack must register in ComfyUI."""


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def _configure_comfyui(comfy_root: Path) -> Path:
    """Put ComfyUI on ``sys.path`` and set its CLI defaults; returns the temporary base dir."""
    if not (comfy_root / "nodes.py").is_file() or not (comfy_root / "folder_paths.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={comfy_root} is not a ComfyUI checkout (no nodes.py/folder_paths.py)")
    if "folder_paths" in sys.modules:
        raise pytest.UsageError("folder_paths was imported before tests/comfy could configure ComfyUI")
    sys.path.insert(0, str(comfy_root))
    import comfy.cli_args

    base = Path(tempfile.mkdtemp(prefix="ce-comfyui-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    for sub in ("models", "output", "input", "temp", "user", "custom_nodes"):
        (base / sub).mkdir()
    args = comfy.cli_args.args  # defaults: args are parsed from [] unless parsing was enabled
    # importing comfy.model_management without a GPU needs --cpu; COMFYUI_DEVICE=gpu runs ComfyUI on its GPU
    args.cpu = os.environ.get("COMFYUI_DEVICE", "cpu").strip().lower() != "gpu"
    args.base_directory = str(base)
    args.disable_api_nodes = True
    # ComfyUI's ``utils`` package before nodes.py puts comfy/ (which has a utils.py) first on sys.path, as
    # main.py imports it; otherwise comfy_extras/nodes_images.py fails to import
    import utils.install_util  # noqa: F401
    import folder_paths

    assert Path(folder_paths.models_dir) == base / "models", folder_paths.models_dir
    return base


BASE_DIR = _configure_comfyui(Path(COMFYUI_PATH).resolve()) if COMFYUI_PATH else None


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI with the pack loaded by ``nodes.load_custom_node``, as at server start.

    Yields a namespace: ``nodes`` (ComfyUI's module), ``folder_paths``, ``base`` (the
    temporary base directory), ``pack`` (the pack module ComfyUI imported), ``nodes_pkg``
    (its ``nodes`` package), ``comfy_root``, ``repo_root`` and ``node_ids``.
    """
    import folder_paths
    import nodes

    assert Path(nodes.__file__).resolve().parent == Path(COMFYUI_PATH).resolve(), (
        f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py"
    )
    ok = asyncio.run(nodes.load_custom_node(str(REPO_ROOT)))
    assert ok, "ComfyUI could not load the pack (see the log above)"
    module_name = str(REPO_ROOT).replace(".", "_x_")  # the name ComfyUI's loader gives a pack folder
    pack = sys.modules[module_name]
    missing = [n for n in PACK_NODE_IDS if n not in nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"pack did not register {missing}"
    for node_id in PACK_NODE_IDS:
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is pack.NODE_CLASS_MAPPINGS[node_id]
    yield SimpleNamespace(
        nodes=nodes,
        folder_paths=folder_paths,
        base=BASE_DIR,
        pack=pack,
        nodes_pkg=sys.modules[f"{module_name}.nodes"],
        comfy_root=Path(COMFYUI_PATH).resolve(),
        repo_root=REPO_ROOT,
        node_ids=PACK_NODE_IDS,
    )


def tiny_sd15_model(seed: int = 0):
    """A ModelPatcher around ComfyUI's own SD1.5 model class at toy size (``tiny_models.tiny_sd15``: 32 channels,
    two levels, context width 32) that loads to ComfyUI's torch device (the GPU under COMFYUI_DEVICE=gpu)."""
    import comfy.model_management as mm
    import tiny_models

    return tiny_models.tiny_sd15(seed, load_device=mm.get_torch_device())


def tiny_sd1_clip():
    """ComfyUI's SD1 CLIP (its shipped tokenizer) with a 32-wide, one-layer CLIP-L and seeded random weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import torch

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": {
        "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 2}})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return clip


@pytest.fixture(scope="module")
def tiny(comfy):
    """(model, clip): a toy SD1.5 ModelPatcher and SD1 CLIP built through ComfyUI's classes, once per module."""
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        return tiny_sd15_model(), tiny_sd1_clip()


def random_sd15_checkpoint(path, seed: int = 0) -> None:
    """Write a checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD1.5, with seeded random weights (fp16):
    the full CLIP-L text encoder (12 layers, 768 wide) and SD VAE, and a reduced UNet of SD1.5's widths (320
    channels, context 768: what detection checks) with two levels of one block each. About 500 MB."""
    import comfy.sd1_clip
    import comfy.supported_models
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    import tiny_models

    unet_config = {**tiny_models.BASE_UNET, "model_channels": 320, "channel_mult": [1, 1], "context_dim": 768,
                   "num_heads": 8}
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        unet = comfy.supported_models.SD15(unet_config).get_model({}, device="meta")
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    shapes = {f"model.{k}": v.shape for k, v in unet.state_dict().items() if k.startswith("diffusion_model.")}
    shapes.update({k.replace("clip_l.", "cond_stage_model.", 1): v.shape for k, v in clip.state_dict().items()})
    shapes.update({f"first_stage_model.{k}": v.shape for k, v in vae.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        shape = torch.Size(shape)
        if key.endswith("logit_scale"):
            sd[key] = torch.tensor(4.6)
        elif len(shape) > 1:
            sd[key] = (torch.randn(shape, generator=g) * (0.5 / shape[1:].numel() ** 0.5)).half()
        elif "norm" in key and key.endswith("weight"):
            sd[key] = torch.ones(shape).half()
        else:
            sd[key] = (torch.randn(shape, generator=g) * 0.02).half()
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def sd15_checkpoint(comfy):
    """A random-weight SD1.5 checkpoint (:func:`random_sd15_checkpoint`) named as the templates name theirs
    (``v1-5-pruned-emaonly.safetensors``), in the test's models/checkpoints; removed after the module."""
    folder = comfy.base / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "v1-5-pruned-emaonly.safetensors"
    if not path.exists():
        random_sd15_checkpoint(path)
    comfy.folder_paths.filename_list_cache.clear()
    yield path
    path.unlink(missing_ok=True)
    comfy.folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="module")
def mc(comfy):
    """``(model, clip, vae)`` from the registered MiniCanvas Checkpoint node, loaded as ComfyUI runs nodes."""
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        return comfy.nodes.NODE_CLASS_MAPPINGS["CE_MiniCanvasCheckpoint"]().load(clip_denoised=True)


@pytest.fixture(scope="module")
def canvas():
    """The shipped MiniCanvas (``sae_core.minicanvas``) with its judges: the reference the nodes are compared to."""
    from sae_core.minicanvas import MiniCanvas

    return MiniCanvas.load()


@pytest.fixture(scope="session")
def bench_module(comfy):
    """``benchmarks/comfy_minicanvas.py`` (not a package) as a module, loaded once: the node-path benchmark's
    graphs (``METHODS``, ``NodeBench``) and the node inputs each method gets from its MiniCanvas plug-in."""
    import importlib.util

    name = "ce_comfy_minicanvas_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / "comfy_minicanvas.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
