"""Load SAE in a real ComfyUI: the dropdown, prompt validation, execution, caching and errors."""

from __future__ import annotations

import asyncio
import copy
import os
import uuid
from types import SimpleNamespace

import pytest
import torch

from sae_core.config import SaeConfig
from sae_core.formats import save_sae
from sae_core.sae import SparseAutoencoder

NODE_ID = "CE_LoadSAE"
PROBE_ID = "TestOnly_SaeProbe"


class SaeProbe:
    """Test-only output node: records the SAE it receives and reports its config."""

    received: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sae": ("SAE", {"tooltip": "SAE under test"})}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, sae):
        SaeProbe.received.append((sae, torch.is_inference_mode_enabled()))
        return {"ui": {"d_in": [sae.cfg.d_in], "hookpoint": [sae.cfg.hookpoint]}}


@pytest.fixture
def sae_subdir(comfy):
    """A fresh sub-folder of the temporary ``models/sae``; yields (absolute dir, dropdown prefix)."""
    name = f"t{uuid.uuid4().hex[:8]}"
    path = comfy.base / "models" / "sae" / name
    path.mkdir(parents=True)
    return path, name


@pytest.fixture
def tiny_sae():
    gen = torch.Generator().manual_seed(0)
    cfg = SaeConfig(d_in=16, num_latents=64, k=4, hookpoint="unet.up_blocks.1.attentions.1", model_family="sd1")
    sae = SparseAutoencoder(cfg, generator=gen)
    with torch.no_grad():
        sae.encoder.bias.normal_(0.0, 0.1, generator=gen)
        sae.b_dec.normal_(0.0, 0.1, generator=gen)
    return sae


@pytest.fixture
def executor(comfy, monkeypatch):
    """ComfyUI's PromptExecutor with a server stand-in, plus the probe node registered."""
    import execution

    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, PROBE_ID, SaeProbe)
    SaeProbe.received = []
    server = SimpleNamespace(client_id=None, last_node_id=None, send_sync=lambda *a, **k: None)
    comfy.nodes_pkg.sae_nodes.SAE_CACHE.clear()
    return execution.PromptExecutor(server)


def _prompt(sae_name: str, device: str = "auto", dtype: str = "float32") -> dict:
    return {
        "1": {"class_type": NODE_ID, "inputs": {"sae_name": sae_name, "device": device, "dtype": dtype}},
        "2": {"class_type": PROBE_ID, "inputs": {"sae": ["1", 0]}},
    }


def _run(executor, prompt: dict):
    """Validate and execute ``prompt`` as the server does for a freshly queued request."""
    import execution

    prompt = copy.deepcopy(prompt)  # the executor records IS_CHANGED results inside the prompt
    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    executor.execute(prompt, prompt_id, {}, outputs)
    return executor


def _messages(executor, event: str) -> list[dict]:
    return [data for name, data in executor.status_messages if name == event]


def _assert_same_encoding(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    x = torch.randn(7, a.cfg.d_in, generator=torch.Generator().manual_seed(1))
    ea, eb = a.encode(x), b.encode(x)
    assert torch.equal(ea.top_indices, eb.top_indices)
    torch.testing.assert_close(ea.top_acts, eb.top_acts, rtol=0, atol=0)
    torch.testing.assert_close(a.decode(*ea), b.decode(*eb), rtol=0, atol=0)


def test_single_file_sae_appears_and_loads(comfy, sae_subdir, tiny_sae, executor):
    folder, prefix = sae_subdir
    save_sae(tiny_sae, str(folder / "tiny.safetensors"), layout="file")
    name = f"{prefix}/tiny.safetensors"
    choices = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID].INPUT_TYPES()["required"]["sae_name"][0]
    assert name in choices

    _run(executor, _prompt(name))
    assert executor.success, _messages(executor, "execution_error")
    (loaded, in_inference_mode), = SaeProbe.received
    assert in_inference_mode, "ComfyUI runs nodes under torch.inference_mode()"
    assert isinstance(loaded, SparseAutoencoder)
    assert loaded.cfg.hookpoint == tiny_sae.cfg.hookpoint and loaded.cfg.model_family == "sd1"
    assert (loaded.cfg.d_in, loaded.cfg.num_latents, loaded.cfg.k) == (16, 64, 4)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_encoding(loaded, tiny_sae)
    assert executor.history_result["outputs"]["2"]["d_in"] == [16]


def test_folder_layout_sae_appears_and_loads(comfy, sae_subdir, tiny_sae):
    folder, prefix = sae_subdir
    save_sae(tiny_sae, str(folder / "unet.up_blocks.1.attentions.1"), layout="folder")
    name = f"{prefix}/unet.up_blocks.1.attentions.1/sae.safetensors"
    assert name in comfy.folder_paths.get_filename_list("sae")
    assert not any(n.endswith(".json") for n in comfy.folder_paths.get_filename_list("sae"))
    with torch.inference_mode():
        (loaded,) = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]().load(name, device="cpu", dtype="float32")
    _assert_same_encoding(loaded, tiny_sae)


def test_itd_folder_appears_and_loads_other_pth_files_do_not(comfy, sae_subdir, tiny_sae):
    import json

    folder, prefix = sae_subdir
    itd = folder / "text_model.encoder.layers.8"
    itd.mkdir()
    (itd / "config.json").write_text(json.dumps({"n_dirs_local": 64, "d_model": 16, "k": 4}))
    torch.save({"encoder.weight": tiny_sae.encoder.weight.detach().clone(),
                "latent_bias": tiny_sae.encoder.bias.detach().clone(),
                "decoder.weight": tiny_sae.W_dec.detach().t().contiguous(),
                "pre_bias": tiny_sae.b_dec.detach().clone()}, itd / "state_dict.pth")
    torch.save({"x": torch.zeros(1)}, folder / "stray.pth")  # not an SAE: never offered
    (folder / "lone").mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "lone" / "state_dict.pth")  # no config.json beside it
    name = f"{prefix}/text_model.encoder.layers.8/state_dict.pth"
    choices = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID].INPUT_TYPES()["required"]["sae_name"][0]
    assert name in choices
    assert f"{prefix}/stray.pth" not in choices and f"{prefix}/lone/state_dict.pth" not in choices
    with torch.inference_mode():
        (loaded,) = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]().load(name, device="cpu", dtype="float32")
    _assert_same_encoding(loaded, tiny_sae)


def test_dtype_choice(comfy, sae_subdir, tiny_sae):
    folder, prefix = sae_subdir
    save_sae(tiny_sae, str(folder / "tiny.safetensors"), layout="file")
    with torch.inference_mode():
        (half,) = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]().load(f"{prefix}/tiny.safetensors", "cpu", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    torch.testing.assert_close(half.W_dec.float(), tiny_sae.W_dec.detach(), rtol=1e-2, atol=1e-2)


def test_validation_rejects_unknown_file(comfy):
    import execution

    prompt = _prompt("no/such/file.safetensors")
    valid, errors, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
    assert not valid
    assert any(e["type"] == "value_not_in_list" for e in errors), errors


def test_cached_until_the_file_changes(comfy, sae_subdir, tiny_sae, executor):
    folder, prefix = sae_subdir
    path = save_sae(tiny_sae, str(folder / "tiny.safetensors"), layout="file")
    prompt = _prompt(f"{prefix}/tiny.safetensors")

    _run(executor, prompt)
    first = SaeProbe.received[-1][0]
    _run(executor, prompt)
    assert "1" in _messages(executor, "execution_cached")[-1]["nodes"], "unchanged file: ComfyUI reuses the output"

    # Same file loaded by a second executor (another graph): the module-level cache serves it.
    with torch.inference_mode():
        (again,) = comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]().load(f"{prefix}/tiny.safetensors", "auto", "float32")
    assert again is first

    # A rewritten file (new weights, new mtime) is loaded again.
    with torch.no_grad():
        tiny_sae.W_dec.mul_(2.0)
    save_sae(tiny_sae, str(folder / "tiny.safetensors"), layout="file")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _run(executor, prompt)
    assert "1" not in _messages(executor, "execution_cached")[-1]["nodes"]
    second = SaeProbe.received[-1][0]
    assert second is not first
    torch.testing.assert_close(second.W_dec, tiny_sae.W_dec.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_gives_clear_error(comfy, sae_subdir, tiny_sae, executor, damage):
    folder, prefix = sae_subdir
    path = folder / "broken.safetensors"
    if damage == "garbage":
        path.write_bytes(b"this is not a safetensors file at all" * 4)
    else:
        save_sae(tiny_sae, str(path), layout="file")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    name = f"{prefix}/broken.safetensors"

    with torch.inference_mode(), pytest.raises(ValueError) as info:
        comfy.nodes.NODE_CLASS_MAPPINGS[NODE_ID]().load(name, "cpu", "float32")
    assert name in str(info.value)

    # Through the executor the user sees the same message on the node.
    _run(executor, _prompt(name))
    assert not executor.success
    (error,) = _messages(executor, "execution_error")
    assert error["node_type"] == NODE_ID and name in error["exception_message"]
    assert not SaeProbe.received
