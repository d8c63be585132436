"""SAE file layouts: bit-exact round trips, SAELens / ItD conversion, and clear errors on bad files."""

from __future__ import annotations

import fractions
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_core.artefacts as artefacts
import sae_core.formats as formats
from sae_core.config import SaeConfig
from sae_core.formats import SaeFormatError, detect_layout, load_sae, save_sae
from sae_core.sae import SparseAutoencoder

D, N, K = 12, 48, 5


def make_sae(dtype=torch.float32, **cfg) -> SparseAutoencoder:
    base = dict(d_in=D, num_latents=N, k=K, hookpoint="unet.up_blocks.1.attentions.1", model_family="sd1")
    base.update(cfg)
    sae = SparseAutoencoder(SaeConfig(**base), dtype=dtype, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.encoder.bias.copy_(0.1 * torch.randn(N, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(D, generator=g))
    return sae


def assert_same(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name


def assert_same_function(a: SparseAutoencoder, b: SparseAutoencoder, atol=1e-5) -> None:
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.encode_dense(x), b.encode_dense(x), atol=atol, rtol=1e-5)
    acts, idx = a.encode(x)
    torch.testing.assert_close(a.decode(acts, idx), b.decode(acts, idx), atol=atol, rtol=1e-5)
    torch.testing.assert_close(a(x).sae_out, b(x).sae_out, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folder_round_trip_is_bit_exact(tmp_path, dtype):
    sae = make_sae(dtype=dtype, extra={"note": "x", "nested": {"a": [1, 2]}})
    out = save_sae(sae, tmp_path / "my_sae")
    assert sorted(os.listdir(out)) == ["cfg.json", "sae.safetensors"]
    assert set(load_file(Path(out) / "sae.safetensors")) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    back = load_sae(out)
    assert_same(sae, back)
    assert back.cfg == sae.cfg
    # the weights file inside the folder is accepted too
    assert_same(sae, load_sae(Path(out) / "sae.safetensors"))


def test_single_file_round_trip_is_bit_exact(tmp_path):
    sae = make_sae()
    out = save_sae(sae, tmp_path / "models" / "sae" / "style.safetensors", layout="file")
    assert detect_layout(out)[0] == "file"
    back = load_sae(out)
    assert_same(sae, back)
    assert back.cfg == sae.cfg
    assert not back.training and back.cfg.batch_topk is False
    assert sorted(os.listdir(tmp_path / "models" / "sae")) == ["style.safetensors"]  # no temp files left


def test_loading_forces_per_token_topk(tmp_path):
    sae = make_sae(batch_topk=True)
    back = load_sae(save_sae(sae, tmp_path / "a"))
    assert back.cfg.batch_topk is False and back.cfg.sample_topk is False


def test_saeuron_cfg_json_with_num_latents_zero(tmp_path):
    sae = make_sae(num_latents=D * 4, expansion_factor=4)
    folder = Path(save_sae(sae, tmp_path / "unet.up_blocks.1.attentions.1"))
    ref_cfg = {  # the reference trainer's cfg.json fields, verbatim
        "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": K,
        "batch_topk": True, "sample_topk": False, "input_unit_norm": False, "multi_topk": False, "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps(ref_cfg))
    back = load_sae(folder)
    assert back.num_latents == D * 4 and back.cfg.batch_topk is False and back.cfg.hookpoint is None
    assert_same_function(sae, back, atol=0)
    with pytest.raises(SaeFormatError, match="SAE subfolders"):
        load_sae(tmp_path)  # the parent holds SAE subfolders; the error says so


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    first = make_sae()
    save_sae(first, path, layout="file")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(artefacts, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(make_sae(hookpoint="other"), path, layout="file")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_save_rejects_bad_targets(tmp_path):
    sae = make_sae()
    with pytest.raises(ValueError, match=".safetensors"):
        save_sae(sae, tmp_path / "x.bin", layout="file")
    with pytest.raises(ValueError, match="layout"):
        save_sae(sae, tmp_path / "x", layout="zip")


# --------------------------------------------------------------------------------------------
# SAELens and ItD conversion
# --------------------------------------------------------------------------------------------
def write_saelens(folder: Path, sae: SparseAutoencoder, apply_b_dec=True, **cfg_overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w_enc = sae.encoder.weight.detach().t().contiguous()
    b_enc = sae.encoder.bias.detach().clone()
    if not apply_b_dec:  # SAELens then computes x @ W_enc + b_enc without subtracting b_dec
        b_enc = b_enc - sae.b_dec.detach() @ w_enc
    save_file(
        {"W_enc": w_enc, "b_enc": b_enc, "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32",
        "hook_name": "blocks.3.hook_resid_post", "model_name": "tiny-model",
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
    }
    cfg.update(cfg_overrides)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def saelens_reference_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens TopK semantics: top-k of the hidden pre-activation, ReLU of the kept values."""
    t = load_file(folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    sae_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    hidden = sae_in @ t["W_enc"] + t["b_enc"]
    vals, idx = hidden.topk(cfg["k"], dim=-1)
    return torch.zeros_like(hidden).scatter(-1, idx, vals.relu())


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_folder_loads_as_equivalent_sae(tmp_path, apply_b_dec):
    sae = make_sae()
    folder = write_saelens(tmp_path / "saelens", sae, apply_b_dec=apply_b_dec)
    back = load_sae(folder)
    assert (back.d_in, back.num_latents, back.k) == (D, N, K)
    assert back.cfg.hookpoint == "blocks.3.hook_resid_post" and back.cfg.model_family == "tiny-model"
    assert_same_function(sae, back)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(back.encode_dense(x), saelens_reference_encode(folder, x), atol=1e-5, rtol=1e-5)
    assert_same_function(back, load_sae(folder / "sae_weights.safetensors"), atol=0)


def test_saelens_non_topk_and_normalised_are_refused(tmp_path):
    sae = make_sae()
    relu = write_saelens(tmp_path / "relu", sae, architecture="standard")
    with pytest.raises(SaeFormatError, match="not a TopK SAE") as err:
        load_sae(relu)
    assert "cfg.json" in str(err.value)
    norm = write_saelens(tmp_path / "norm", sae, normalize_activations="expected_average_only_in")
    with pytest.raises(SaeFormatError, match="normalize_activations"):
        load_sae(norm)


def write_itd(folder: Path, sae: SparseAutoencoder, wrap=True, **cfg_overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "encoder.weight": sae.encoder.weight.detach().clone(),
        "decoder.weight": sae.W_dec.detach().clone().t(),  # [d, n], column-major like the reference
        "pre_bias": sae.b_dec.detach().clone(),
        "latent_bias": sae.encoder.bias.detach().clone(),
        "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
    }
    torch.save({"state_dict": state} if wrap else state, folder / "state_dict.pth")
    cfg = {"n_dirs_local": N, "d_model": D, "k": K, "auxk": 8, "dead_steps_threshold": 200000}
    cfg.update(cfg_overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def itd_reference_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """ItD semantics: u = W_enc (x - b_pre) + b_lat; keep the top-k of u, then ReLU."""
    s = torch.load(folder / "state_dict.pth", weights_only=True)
    s = s.get("state_dict", s)
    u = (x - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"]
    vals, idx = u.topk(K, dim=-1)
    return torch.zeros_like(u).scatter(-1, idx, vals.relu())


@pytest.mark.parametrize("wrap", [True, False])
def test_itd_folder_loads_as_equivalent_sae(tmp_path, wrap):
    sae = make_sae()
    folder = write_itd(tmp_path / "text_model.encoder.layers.8_k5_hidden48_auxk8_bs50_lr0.0001_datasetcoco" / "6000", sae, wrap)
    back = load_sae(folder)
    assert back.cfg.hookpoint == "text_model.encoder.layers.8"
    assert back.cfg.extra["source_format"] == "itd"
    assert back.W_dec.is_contiguous()
    assert_same_function(sae, back, atol=0)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(back.encode_dense(x), itd_reference_encode(folder, x), atol=1e-5, rtol=1e-5)
    s = torch.load(folder / "state_dict.pth", weights_only=True)
    s = s.get("state_dict", s)
    x_hat_ref = itd_reference_encode(folder, x) @ s["decoder.weight"].T + s["pre_bias"]
    torch.testing.assert_close(back(x).sae_out, x_hat_ref, atol=1e-5, rtol=1e-5)
    # converting to our single-file layout keeps it identical
    converted = load_sae(formats.convert_sae(folder, tmp_path / "itd.safetensors"))
    assert_same(back, converted)
    assert converted.cfg == back.cfg


UNBOX_RUN = "unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001"
"""Folder name of a published sdxl-unbox SAE (its block, then the training settings); the weights are in final/."""


def test_sdxl_unbox_folder_loads_as_an_update_sae(tmp_path):
    """The sdxl-unbox layout (the ItD files, a UNet block in the folder name, mean.pt/std.pt beside them): the
    codes and reconstruction are the published encoder's, and the SAE says it reads the block's update."""
    sae = make_sae()
    folder = write_itd(tmp_path / UNBOX_RUN / "final", sae)
    for extra in ("mean.pt", "std.pt"):  # per-latent statistics of the published folders; not needed to load
        torch.save(torch.rand(N) * 20, folder / extra)
    back = load_sae(folder / "state_dict.pth")
    assert back.cfg.hookpoint == "unet.up_blocks.0.attentions.1"
    assert back.cfg.extra["source_format"] == "sdxl_unbox" and back.cfg.extra["source"] == "diff"
    assert back.cfg.model_family == "SDXL"
    assert back.cfg.extra["unbox_auxk"] == 8 and "itd_auxk" not in back.cfg.extra
    assert (back.cfg.d_in, back.cfg.num_latents, back.cfg.k) == (D, N, K)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(back.encode_dense(x), itd_reference_encode(folder, x), atol=1e-5, rtol=1e-5)
    assert_same_function(sae, back, atol=0)
    # the block recorded in config.json wins over the folder name; a text-encoder block stays ItD
    other = write_itd(tmp_path / "renamed" / "final", sae, hookpoint="unet.mid_block.attentions.0")
    assert load_sae(other).cfg.hookpoint == "unet.mid_block.attentions.0"
    text = write_itd(tmp_path / "text", sae, hookpoint="text_model.encoder.layers.8")
    assert load_sae(text).cfg.extra["source_format"] == "itd" and "source" not in load_sae(text).cfg.extra
    # kept through a conversion to our layout: the SAeUron nodes then read updates without being told
    converted = load_sae(formats.convert_sae(folder, tmp_path / "unbox.safetensors"))
    assert converted.cfg.extra["source"] == "diff" and converted.cfg.hookpoint == back.cfg.hookpoint


# --------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------
def saved_folder(tmp_path: Path, name="bad") -> Path:
    return Path(save_sae(make_sae(), tmp_path / name))


def rewrite_weights(folder: Path, edit) -> Path:
    tensors = load_file(folder / "sae.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "sae.safetensors"))
    return folder / "sae.safetensors"


def test_missing_key_is_reported(tmp_path):
    folder = saved_folder(tmp_path)
    rewrite_weights(folder, lambda t: t.pop("b_dec"))
    with pytest.raises(SaeFormatError, match=r"missing tensor\(s\) \['b_dec'\]") as err:
        load_sae(folder)
    assert err.value.path.endswith("sae.safetensors")


def test_wrong_shape_is_reported(tmp_path):
    folder = saved_folder(tmp_path)
    rewrite_weights(folder, lambda t: t.__setitem__("encoder.bias", torch.zeros(N, 2)))
    with pytest.raises(SaeFormatError, match="encoder.bias should have shape") as err:
        load_sae(folder)
    assert "sae.safetensors" in str(err.value)


def test_d_in_mismatch_between_cfg_and_tensors(tmp_path):
    folder = saved_folder(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_in"] = D + 1
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeFormatError, match=rf"d_in mismatch: config \(cfg.json\) says d_in={D + 1}") as err:
        load_sae(folder)
    assert str(folder) in str(err.value)
    # the same for a single file whose metadata disagrees with its tensors
    path = tmp_path / "one.safetensors"
    tensors = load_file(folder / "sae.safetensors")
    save_file(tensors, str(path), metadata={"sae_config": json.dumps(cfg)})
    with pytest.raises(SaeFormatError, match="d_in mismatch") as err:
        load_sae(path)
    assert "one.safetensors" in str(err.value)


def test_truncated_or_corrupt_safetensors(tmp_path):
    path = Path(save_sae(make_sae(), tmp_path / "t.safetensors", layout="file"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaeFormatError, match="t.safetensors") as err:
        load_sae(path)
    assert "safetensors" in err.value.problem
    folder = saved_folder(tmp_path, "garbage")
    (folder / "sae.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(SaeFormatError, match="possibly truncated or corrupt"):
        load_sae(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, value):
    folder = saved_folder(tmp_path)

    def poison(t):
        t["W_dec"][3, 4] = value

    rewrite_weights(folder, poison)
    with pytest.raises(SaeFormatError, match=r"W_dec has 1 non-finite value") as err:
        load_sae(folder)
    assert "sae.safetensors" in str(err.value)


def test_unknown_layouts(tmp_path):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(SaeFormatError, match="unknown SAE layout") as err:
        load_sae(folder)
    assert "random" in str(err.value)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"1234")
    with pytest.raises(SaeFormatError, match="unknown SAE file type") as err:
        load_sae(other)
    assert "weights.bin" in str(err.value)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(SaeFormatError, match="no 'sae_config' metadata") as err:
        load_sae(plain)
    assert "plain.safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_sae(tmp_path / "does-not-exist")


def test_bad_configs(tmp_path):
    folder = saved_folder(tmp_path)
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "input_unit_norm": True}))
    with pytest.raises(SaeFormatError, match="input_unit_norm") as err:
        load_sae(folder)
    assert "cfg.json" in str(err.value)
    cfg_path.write_text("{not json")
    with pytest.raises(SaeFormatError, match="cannot read JSON config"):
        load_sae(folder)
    cfg_path.write_text(json.dumps({**cfg, "k": "many"}))
    with pytest.raises(SaeFormatError, match="'k' must be an integer"):
        load_sae(folder)
    cfg_path.write_text(json.dumps({**cfg, "k": N + 1}))
    with pytest.raises(SaeFormatError, match="invalid SAE config"):
        load_sae(folder)


def test_bad_itd_files(tmp_path):
    sae = make_sae()
    folder = write_itd(tmp_path / "itd_a", sae, d_model=D + 2)
    with pytest.raises(SaeFormatError, match="d_model=14") as err:
        load_sae(folder)
    assert "state_dict.pth" in str(err.value)

    folder = write_itd(tmp_path / "itd_b", sae)
    state = torch.load(folder / "state_dict.pth", weights_only=True)
    del state["state_dict"]["pre_bias"]
    torch.save(state, folder / "state_dict.pth")
    with pytest.raises(SaeFormatError, match=r"ItD SAE is missing tensor\(s\) \['pre_bias'\]"):
        load_sae(folder)

    folder = write_itd(tmp_path / "itd_c", sae)  # an arbitrary pickled object: weights_only must refuse it
    torch.save({"state_dict": {"x": fractions.Fraction(1, 3)}}, folder / "state_dict.pth")
    with pytest.raises(SaeFormatError, match="weights_only") as err:
        load_sae(folder / "state_dict.pth")
    assert "state_dict.pth" in str(err.value)

    folder = write_itd(tmp_path / "itd_d", sae)
    (folder / "state_dict.pth").write_bytes(b"truncated")
    with pytest.raises(SaeFormatError, match="state_dict.pth"):
        load_sae(folder)


# --------------------------------------------------------------------------------------------
# reliability: interrupted saves, bad numbers, narrowing casts
# --------------------------------------------------------------------------------------------
def test_new_weights_beside_an_old_cfg_are_refused(tmp_path):
    """A save killed between sae.safetensors and cfg.json must not load the new weights with the old k."""
    folder = tmp_path / "s"
    save_sae(make_sae(k=K), folder)
    old_cfg = (folder / "cfg.json").read_text()
    save_sae(make_sae(k=K + 2), folder)
    (folder / "cfg.json").write_text(old_cfg)  # as if killed before the second write
    with pytest.raises(SaeFormatError, match=r"disagrees .*k 5 \(cfg.json\) vs 7"):
        load_sae(folder)


@pytest.mark.parametrize("field,value", [("k", "NaN"), ("d_in", "Infinity"), ("num_latents", "-Infinity")])
def test_non_finite_config_numbers_are_named(tmp_path, field, value):
    folder = tmp_path / "s"
    save_sae(make_sae(), folder)
    text = (folder / "cfg.json").read_text()
    data = json.loads(text)
    data[field] = 0  # placeholder replaced by the JSON non-number below
    (folder / "cfg.json").write_text(json.dumps(data).replace(f'"{field}": 0', f'"{field}": {value}'))
    with pytest.raises(SaeFormatError, match=field) as err:
        load_sae(folder / "sae.safetensors")
    assert "cfg.json" in str(err.value)


def test_non_text_hookpoint_is_refused(tmp_path):
    path = tmp_path / "one.safetensors"
    sae = make_sae()
    save_sae(sae, path, layout="file")
    tensors, meta = load_file(path), None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    cfg = json.loads(meta["sae_config"])
    cfg["hookpoint"] = 7
    meta["sae_config"] = json.dumps(cfg)
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(SaeFormatError, match="hookpoint"):
        load_sae(path)


def test_loading_as_float16_refuses_values_that_overflow(tmp_path):
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = 1e6  # finite in float32, inf in float16
    path = save_sae(sae, tmp_path / "big.safetensors", layout="file")
    with pytest.raises(SaeFormatError, match="overflows float16"):
        load_sae(path, dtype=torch.float16)
    assert load_sae(path, dtype=torch.bfloat16).W_dec[0, 0] > 0
