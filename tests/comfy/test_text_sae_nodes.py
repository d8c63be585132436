"""Collect Text Activations in a real ComfyUI: what it stores (the classifier's own residuals), reuse and overwrite,
prompt files from models/prompts, the MiniCanvas CLIP giving the plug-in's store (one code path), and the stores of
SDXL's clip_g and SD2's clip_h (through Train SAE into the classifier)."""

from __future__ import annotations

import pytest
import torch

from sae_core.store import ActivationReader

COLLECT_ID = "CE_CollectTextActivations"
PROMPTS = "a photo of a cat\na painting of a house\na dragon, oil painting\na city street at night"


def collect(comfy, clip, prompts=PROMPTS, name="itd_test/acts", corpus=None, layer=-1, positions="all",
            max_prompts=0, dtype="float32", overwrite=False, **optional):
    node_cls = comfy.nodes.NODE_CLASS_MAPPINGS[COLLECT_ID]
    corpus = corpus if corpus is not None else comfy.nodes_pkg.text_sae.NO_CORPUS
    with torch.inference_mode():
        (path,) = node_cls().collect(clip, corpus, prompts, layer, positions, max_prompts, name, dtype, overwrite,
                                     **optional)
    return path


@pytest.fixture(scope="module")
def clip(tiny):
    return tiny[1]  # conftest: ComfyUI's SD1 CLIP, one 32-wide layer, random weights


def test_stores_the_classifiers_residuals_at_every_position(comfy, clip):
    itd = comfy.nodes_pkg.itd
    reader = ActivationReader(collect(comfy, clip))
    assert len(reader) == 4 * 77 and reader.d == 32
    assert reader.attrs["hookpoint"] == "transformer.text_model.encoder.layers.0"  # -1: 2/3 up a 1-layer encoder
    assert reader.attrs["model_family"] == "SD1" and reader.attrs["settings"]["n_prompts"] == 4
    site = comfy.nodes_pkg.clip_patch.text_encoder_site(clip, "test")
    with torch.inference_mode():
        expected = itd.comfy_text_host(clip, site).source(0).residual(PROMPTS.splitlines()).hidden
    torch.testing.assert_close(reader.read_all(), expected.reshape(-1, 32), rtol=1e-5, atol=1e-5)
    content = ActivationReader(collect(comfy, clip, name="itd_test/content", positions="content"))
    assert len(content) == sum(len(p.replace(",", " ,").split()) + 2 for p in PROMPTS.splitlines())


def test_reuses_refuses_and_overwrites(comfy, clip):
    folder = collect(comfy, clip, name="itd_test/reuse")
    manifest = (comfy.base / "output" / "sae_activations" / "itd_test" / "reuse" / "manifest.json")
    stamp = manifest.stat().st_mtime_ns
    assert collect(comfy, clip, name="itd_test/reuse") == folder and manifest.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(FileExistsError, match="turn on overwrite"):
        collect(comfy, clip, prompts="a cow", name="itd_test/reuse")
    collect(comfy, clip, prompts="a cow", name="itd_test/reuse", overwrite=True)
    assert ActivationReader(folder).attrs["settings"]["n_prompts"] == 1
    with pytest.raises(ValueError, match="out of range"):
        collect(comfy, clip, name="itd_test/bad_layer", layer=5)
    with pytest.raises(ValueError, match="no prompts"):
        collect(comfy, clip, prompts=" \n# nothing", name="itd_test/empty")


def test_prompt_files_and_the_default_corpus(comfy, clip):
    from sae_core.itd.corpus import default_corpus
    from sae_core.prompts import PromptFileError

    text_sae = comfy.nodes_pkg.text_sae
    folder = comfy.base / "models" / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.txt").write_text("# my prompts\na red car\na blue boat\n", encoding="utf-8")
    (folder / "broken.txt").write_bytes(b"a cat\n\xff\n")
    comfy.nodes_pkg.folders.forget_file_list("prompts")
    choices = comfy.nodes.NODE_CLASS_MAPPINGS[COLLECT_ID].INPUT_TYPES()["required"]["corpus"][0]
    assert choices[:2] == [text_sae.DEFAULT_CORPUS, text_sae.NO_CORPUS] and {"mine.txt", "broken.txt"} <= set(choices)
    assert text_sae.corpus_prompts("mine.txt", "a green bus\na red car") == ["a red car", "a blue boat", "a green bus"]
    assert text_sae.corpus_prompts(text_sae.DEFAULT_CORPUS, "typed", max_prompts=3) == default_corpus()[:3]
    with pytest.raises(PromptFileError, match="broken.txt, line 2"):
        text_sae.corpus_prompts("broken.txt")
    reader = ActivationReader(collect(comfy, clip, prompts="", corpus="mine.txt", name="itd_test/file"))
    assert len(reader) == 2 * 77


def test_minicanvas_clip_gives_the_plugin_store(comfy, tmp_path):
    """The node on the MiniCanvas CLIP and the MiniCanvas plug-in's source store the same rows: one code path."""
    from sae_core.itd.collect import collect_text_store
    from sae_core.minicanvas.canvas import MiniCanvas
    from sae_core.minicanvas.plugins.itd import canvas_prompts, text_source

    prompts = canvas_prompts()[:40]
    with torch.inference_mode():
        _, mc_clip, _ = comfy.nodes_pkg.minicanvas.MiniCanvasCheckpoint().load()
    node = ActivationReader(collect(comfy, mc_clip, prompts="\n".join(prompts), name="itd_test/minicanvas"))
    assert node.attrs["hookpoint"] == "text_model.encoder.layers.2" and node.attrs["model_family"] == "MiniCanvas"
    canvas = MiniCanvas.load(None, judges=False)
    plugin = ActivationReader(collect_text_store(text_source(canvas, 2), prompts, tmp_path / "plugin", dtype="float32"))
    assert len(node) == len(plugin) == 40 * 16
    torch.testing.assert_close(node.read_all(), plugin.read_all(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["clip_g", "clip_h"])
def test_clip_g_and_clip_h_stores_train_the_classifiers_sae(comfy, encoder):
    """SDXL's clip_g and SD2's clip_h: the store holds that encoder's layer outputs in a normal encode (its own
    tokenizer, padded with id 0), records the encoder, refuses a layer past the penultimate; Train SAE on it gives
    an SAE the classifier places on that encoder's layer by itself (layer -1: the SAE's hookpoint)."""
    import tiny_models

    width = 48
    if encoder == "clip_g":
        clip, family = tiny_models.tiny_sdxl_clip(clip_l=32, clip_g=width, layers=4), "SDXL"
    else:
        clip, family = tiny_models.tiny_sd2_clip(width=width, layers=4), "SD2"
    name = f"itd_test/{encoder}"
    reader = ActivationReader(collect(comfy, clip, name=name, encoder=encoder))  # -1: layer 2 of 4
    assert len(reader) == 4 * 77 and reader.d == width
    assert reader.attrs["hookpoint"] == "transformer.text_model.encoder.layers.2"
    assert reader.attrs["encoder"] == encoder and reader.attrs["model_family"] == family
    rows, pads = [], []
    layer = getattr(clip.cond_stage_model, encoder).transformer.text_model.encoder.layers[2]
    handle = layer.register_forward_hook(lambda _m, _a, out: rows.append(out[0].float().clone()))
    try:
        with torch.inference_mode():
            for prompt in PROMPTS.splitlines():
                tokens = clip.tokenize(prompt)
                pads.append(tokens[encoder[-1]][0][-1][0])
                clip.encode_from_tokens(tokens)
    finally:
        handle.remove()
    assert pads == [0] * 4  # these tokenizers pad with id 0, not the end token
    torch.testing.assert_close(reader.read_all(), torch.cat(rows), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=rf"{encoder} layer 3 comes after layer 2"):
        collect(comfy, clip, name=f"{name}_late", encoder=encoder, layer=3)
    if encoder == "clip_g":  # auto on SDXL stays clip_l, as before the choice existed
        auto = ActivationReader(collect(comfy, clip, name="itd_test/sdxl_auto"))
        assert auto.attrs["encoder"] == "clip_l" and auto.d == 32

    train = comfy.nodes.NODE_CLASS_MAPPINGS["CE_TrainSAE"]()
    with torch.inference_mode():
        sae, _ = train.train(str(reader.folder), 2, 0, 4, 5, 1e-3, 64, 0, f"itd_test/{encoder}_sae", topk="token",
                             device="cpu")
    assert sae.cfg.d_in == width and sae.cfg.hookpoint == "transformer.text_model.encoder.layers.2"
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CE_ItDPromptClassifier"]()
    with torch.inference_mode():
        patched, report, _plot = node.classify(clip, sae, "a dragon", "", -1, -8.0, top_n=8, encoder=encoder)["result"]
    assert f"{family} {encoder} layer 2 (the SAE's hookpoint" in report
    assert any(getattr(p, "encoder_name", None) == encoder for p in patched.patcher.object_patches.values())
