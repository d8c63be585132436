"""Damaged files: every reader turns a truncated, zeroed or bit-flipped file into one error type that
names the file (:class:`sae_core.artefacts.ArtefactError`), or loads it when the damage left a valid file.

Nothing else may escape: no raw ``SafetensorError``, ``KeyError``, ``IndexError`` or ``json`` error.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from sae_core.artefacts import ArtefactError
from sae_core.config import SaeConfig, TrainConfig
from sae_core.formats import load_sae, save_sae
from sae_core.sae import SparseAutoencoder
from sae_core.saeuron.stats import ConceptStats
from sae_core.store import ActivationReader, ActivationWriter
from sae_core.trainer import SaeTrainer

CASES_PER_KIND = 60


def _sae(seed: int = 0) -> SparseAutoencoder:
    return SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4, hookpoint="h"),
                             generator=torch.Generator().manual_seed(seed))


def _build_sae_file(root: Path) -> tuple[Path, Callable[[Path], object]]:
    path = root / "one.safetensors"
    save_sae(_sae(), path, layout="file")
    return path, load_sae


def _build_sae_folder_weights(root: Path) -> tuple[Path, Callable[[Path], object]]:
    save_sae(_sae(), root / "f", layout="folder")
    return root / "f" / "sae.safetensors", lambda p: load_sae(p.parent)


def _build_sae_folder_cfg(root: Path) -> tuple[Path, Callable[[Path], object]]:
    save_sae(_sae(), root / "f", layout="folder")
    return root / "f" / "cfg.json", lambda p: load_sae(p.parent)


def _build_saelens(root: Path) -> tuple[Path, Callable[[Path], object]]:
    from safetensors.torch import save_file

    sae, folder = _sae(), root / "saelens"
    folder.mkdir()
    save_file({"W_enc": sae.encoder.weight.detach().t().contiguous(), "b_enc": sae.encoder.bias.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4,
                                                 "hook_name": "blocks.3.hook_resid_post", "normalize_activations": "none"}))
    return folder / "sae_weights.safetensors", lambda p: load_sae(p.parent)


def _build_itd(root: Path) -> tuple[Path, Callable[[Path], object]]:
    sae = _sae()
    folder = root / "itd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": 32, "d_model": 8, "k": 4}))
    torch.save({"encoder.weight": sae.encoder.weight.detach().clone(), "latent_bias": sae.encoder.bias.detach().clone(),
                "decoder.weight": sae.W_dec.detach().t().contiguous(), "pre_bias": sae.b_dec.detach().clone()},
               folder / "state_dict.pth")
    return folder / "state_dict.pth", lambda p: load_sae(p.parent)


def _build_fisher(root: Path) -> tuple[Path, Callable[[Path], object]]:
    from sae_core.amnesia.fisher import load_fisher, save_fisher

    path = root / "fisher.safetensors"
    save_fisher(path, {"diffusion_model.a.attn2.to_k.weight": torch.rand(8, 4), "diffusion_model.a.attn2.to_v.weight":
                       torch.rand(8, 4)}, {"count": 10})
    return path, load_fisher


def _build_lora(root: Path) -> tuple[Path, Callable[[Path], object]]:
    from sae_core.amnesia.lora import load_lora_state_dict, save_lora

    path = root / "lora.safetensors"
    save_lora(path, {"diffusion_model.a.lora_up.weight": torch.randn(8, 2), "diffusion_model.a.lora_down.weight":
                     torch.randn(2, 4), "diffusion_model.a.alpha": torch.tensor(2.0)})
    return path, load_lora_state_dict


def _build_stats(root: Path) -> tuple[Path, Callable[[Path], object]]:
    path = root / "stats.safetensors"
    ConceptStats(["a", "b"], torch.rand(2, 3, 32), schedule=[999.0, 500.0, 1.0]).save(path)
    return path, ConceptStats.load


def _store(root: Path) -> Path:
    w = ActivationWriter(root / "store", d=4, shard_tokens=8, metadata_columns=["step"])
    w.add(torch.randn(20, 4), step=torch.arange(20))
    w.close()
    return root / "store"


def _read_store(folder: Path) -> None:
    reader = ActivationReader(folder)
    for _ in reader.iter_batches(7, columns=["step"]):
        pass


def _build_manifest(root: Path) -> tuple[Path, Callable[[Path], object]]:
    return _store(root) / "manifest.json", lambda p: _read_store(p.parent)


def _build_shard(root: Path) -> tuple[Path, Callable[[Path], object]]:
    return _store(root) / "shard-00001.safetensors", lambda p: _read_store(p.parent)


def _build_trainer_checkpoint(root: Path) -> tuple[Path, Callable[[Path], object]]:
    cfg = TrainConfig(batch_size=16, k=4, num_latents=32, geometric_median_iters=2, checkpoint_every=0)
    trainer = SaeTrainer(cfg, d_in=8)
    trainer.train([torch.randn(16, 8) for _ in range(2)], total_steps=2, checkpoint_dir=root / "ck", progress=False)

    def load(path: Path) -> None:
        SaeTrainer(cfg, d_in=8).load_checkpoint(path.parent)

    return root / "ck" / "trainer_state.safetensors", load


KINDS = {
    "sae_file": _build_sae_file,
    "sae_folder_weights": _build_sae_folder_weights,
    "sae_folder_cfg": _build_sae_folder_cfg,
    "sae_itd": _build_itd,
    "sae_saelens": _build_saelens,
    "feature_table": _build_stats,
    "fisher": _build_fisher,
    "lora": _build_lora,
    "store_manifest": _build_manifest,
    "store_shard": _build_shard,
    "trainer_checkpoint": _build_trainer_checkpoint,
}


def _damage(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "zero", "flip", "empty"])
    if kind == "empty" or not data:
        return b""
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    buf = bytearray(data)
    if kind == "zero":
        start = rng.randrange(len(buf))
        end = min(len(buf), start + rng.randint(1, 64))
        buf[start:end] = bytes(end - start)
    else:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_damaged_files_raise_one_error_type_naming_the_file(tmp_path, kind):
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    target, load = KINDS[kind](pristine)
    load(target)  # the undamaged file loads
    original = target.read_bytes()
    rng = random.Random(f"{kind}")
    refused = 0
    for case in range(CASES_PER_KIND):
        work = tmp_path / f"case{case}"
        shutil.copytree(pristine, work)
        damaged = work / target.relative_to(pristine)
        damaged.write_bytes(_damage(original, rng))
        try:
            load(damaged)
        except ArtefactError as err:
            refused += 1
            assert err.path.startswith(str(work)), (kind, case, err.path)
        except FileNotFoundError:
            pytest.fail(f"{kind} case {case}: the file exists, yet the reader said it was missing")
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{kind} case {case}: {type(err).__name__} escaped: {err}")
        shutil.rmtree(work)
    assert refused >= CASES_PER_KIND // 4, f"{kind}: only {refused} of {CASES_PER_KIND} damaged files were refused"


def test_json_configs_with_wrong_types_are_refused(tmp_path):
    save_sae(_sae(), tmp_path / "f", layout="folder")
    cfg_path = tmp_path / "f" / "cfg.json"
    base = json.loads(cfg_path.read_text())
    for field, value in [("k", "four"), ("k", [4]), ("d_in", None), ("num_latents", True), ("hookpoint", 3)]:
        cfg_path.write_text(json.dumps({**base, field: value}))
        try:
            load_sae(tmp_path / "f")
        except ArtefactError as err:
            assert "cfg.json" in err.path or "sae.safetensors" in err.path
        else:
            if field != "d_in":  # d_in None is inferred from the weights
                pytest.fail(f"cfg.json with {field}={value!r} was accepted")
