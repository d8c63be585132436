"""The shared I/O layer (atomic writes, tensor files, fingerprints, artefact policy) and prompt-list parsing."""

from __future__ import annotations

import os

import pytest
import torch

from sae_core.artefacts import (
    Action,
    atomic_write,
    decide_artefact,
    file_fingerprint,
    is_temp_name,
    load_json,
    load_tensors,
    read_metadata,
    sae_fingerprint,
    sae_fingerprint_hint,
    save_json,
    save_tensors,
    tensor_fingerprint,
)
from sae_core.config import SaeConfig
from sae_core.prompts import parse_names, parse_prompts
from sae_core.sae import SparseAutoencoder


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    save_json(path, {"v": 1})

    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert load_json(path) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_temp_names_are_hidden_and_recognised(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.safetensors", lambda tmp: (seen.append(os.path.basename(tmp)), open(tmp, "w").close()))
    assert is_temp_name(seen[0]) and seen[0].startswith(".x.safetensors.")
    assert not is_temp_name("x.safetensors")


def test_tensor_round_trip_with_metadata_and_dtype(tmp_path):
    path = tmp_path / "sub" / "t.safetensors"
    t = torch.randn(3, 4, requires_grad=True)
    save_tensors(path, {"a": t, "i": torch.arange(3)}, {"n": 3, "s": "text"}, dtype=torch.float16)
    back = load_tensors(path)
    assert back["a"].dtype == torch.float16 and back["i"].dtype == torch.int64
    assert torch.equal(back["a"], t.detach().half())
    assert read_metadata(path) == {"n": "3", "s": "text"}


def test_corrupt_and_missing_files_give_named_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_tensors(bad, what="Fisher")
    with pytest.raises(FileNotFoundError, match="Fisher not found"):
        load_tensors(tmp_path / "none.safetensors", what="Fisher")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_json(tmp_path / "bad.json")


def test_tensor_fingerprint_sees_values_names_and_dtype_rounding():
    a = torch.randn(64, 8)
    base = tensor_fingerprint([("w", a)])
    assert tensor_fingerprint([("w", a.clone())]) == base
    b = a.clone()
    b[7, 3] += 1e-3
    assert tensor_fingerprint([("w", b)]) != base
    assert tensor_fingerprint([("v", a)]) != base
    # rounded to fp16, an fp16 copy agrees with the fp32 original
    assert tensor_fingerprint([("w", a)], dtype=torch.float16) == tensor_fingerprint([("w", a.half())], dtype=torch.float16)


def test_sae_fingerprint_agrees_across_dtypes_and_differs_between_saes():
    torch.manual_seed(0)
    one = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4))
    two = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4))
    assert sae_fingerprint(one) == sae_fingerprint(one.to(torch.float16))
    assert sae_fingerprint(one) != sae_fingerprint(two)


def test_a_bfloat16_sae_copy_is_refused_with_how_to_load_it():
    """Load SAE's bfloat16 rounds an SAE away from the float32/float16 copies whose fingerprint files record: the
    refusal of a file built with the float32 SAE says so instead of asking to rebuild it for "this SAE"."""
    import copy

    from sae_core.saeuron import ConceptStats

    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4))
    stats = ConceptStats(["a", "b"], torch.zeros(2, 1, 32), torch.ones(2, 1, dtype=torch.long),
                         sae_fingerprint=sae_fingerprint(sae))
    for same in (sae, copy.deepcopy(sae).half()):
        stats.check_sae(same)
        assert sae_fingerprint_hint(same) == ""
    bf16 = copy.deepcopy(sae).to(torch.bfloat16)
    assert sae_fingerprint(bf16) != sae_fingerprint(sae)
    with pytest.raises(ValueError, match="held in bfloat16.*load it as float32 or float16"):
        stats.check_sae(bf16)


def test_file_fingerprint_changes_with_content_and_companions(tmp_path):
    f, cfg = tmp_path / "sae.safetensors", tmp_path / "cfg.json"
    f.write_bytes(b"1")
    before = file_fingerprint(f, [cfg])
    cfg.write_text("{}")
    assert file_fingerprint(f, [cfg]) != before
    assert "missing" in file_fingerprint(tmp_path / "none")


def test_artefact_policy():
    want = {"seed": 0, "n": 8}
    assert decide_artefact("Fisher", "f", want, None).action is Action.CREATE
    assert decide_artefact("Fisher", "f", want, dict(want)).action is Action.REUSE
    assert decide_artefact("Fisher", "f", want, dict(want), complete=False, resumable=True).action is Action.RESUME
    assert decide_artefact("Fisher", "f", want, dict(want), complete=False).action is Action.REDO
    with pytest.raises(FileExistsError, match="n: 4 there, 8 now"):
        decide_artefact("Fisher", "f", want, {"seed": 0, "n": 4})
    decision = decide_artefact("Fisher", "f", want, {"seed": 0, "n": 4}, overwrite=True)
    assert decision.action is Action.REDO and "old file stays" in decision.message


def test_parse_prompts_one_rule():
    text = "a cat, oil painting\n\n  # a comment\n a dog \na cat, oil painting\n"
    assert parse_prompts(text) == ["a cat, oil painting", "a dog"]
    assert parse_prompts(["x\ny", " x ", ""]) == ["x", "y"]
    assert parse_prompts(None) == [] and parse_prompts("") == []


def test_parse_names_splits_commas_too():
    assert parse_names("nudity, naked ,,\n# not: this\nnaked\n erotic") == ["nudity", "naked", "erotic"]
    with pytest.raises(TypeError):
        parse_names([1])  # type: ignore[list-item]


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "lora.safetensors"
    dead = tmp_path / ".lora.safetensors.999999999.abc.tmp"  # no process has this pid
    live = tmp_path / f".lora.safetensors.{os.getpid()}.def.tmp"
    other = tmp_path / ".other.safetensors.999999999.abc.tmp"
    for f in (dead, live, other):
        f.write_bytes(b"partial")
    save_tensors(target, {"x": torch.ones(2)})
    assert not dead.exists() and live.exists() and other.exists()


def test_written_files_get_the_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.json").st_mode & 0o777) == 0o644


def test_load_errors_are_artefact_errors_naming_the_file(tmp_path):
    from sae_core.artefacts import ArtefactError

    bad = tmp_path / "zero.safetensors"
    bad.write_bytes(b"")
    with pytest.raises(ArtefactError) as err:
        load_tensors(bad)
    assert err.value.path == str(bad)


def test_an_sae_file_loaded_as_bfloat16_keeps_the_files_identity(tmp_path):
    """Load SAE's bfloat16 narrows the file's weights after fingerprinting them, so tables built with the float32
    copy of that file match; a change to the weights drops the kept identity."""
    import copy

    from sae_core.formats import load_sae, save_sae
    from sae_core.saeuron import ConceptStats

    torch.manual_seed(0)
    save_sae(SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4)), tmp_path / "s", layout="folder")
    sae32 = load_sae(tmp_path / "s")
    bf16 = load_sae(tmp_path / "s", dtype=torch.bfloat16)
    assert bf16.W_dec.dtype == torch.bfloat16
    stats = ConceptStats(["a", "b"], torch.zeros(2, 1, 32), torch.ones(2, 1, dtype=torch.long),
                         sae_fingerprint=sae_fingerprint(sae32))
    stats.check_sae(bf16)
    file_fp = sae_fingerprint(sae32)
    assert sae_fingerprint(bf16) == file_fp != sae_fingerprint(copy.deepcopy(sae32).to(torch.bfloat16))
    with torch.no_grad():
        bf16.W_dec[5].mul_(2)  # fingerprinted rows: the weights are no longer the file's
    assert sae_fingerprint(bf16) != file_fp
    with pytest.raises(ValueError, match="held in bfloat16"):
        stats.check_sae(bf16)
