"""Fisher diagonal estimator, its files and resume, and the pickle converter."""

from __future__ import annotations

import argparse
import math
import io
import pickle

import pytest
import torch
from torch import nn

from sae_core.amnesia.ewc import ewc_penalty, fisher_key
from sae_core.amnesia.convert import convert_fisher_pickle, main
from sae_core.amnesia.fisher import (
    compute_fisher,
    eps_mse_loss,
    eps_mse_loss_fn,
    fisher_params,
    load_fisher,
    sample_generator,
    stratified_timesteps,
)
from sae_core.amnesia.lora import inject_lora

D_IN, D_OUT, SIGMA = 4, 3, 0.5
VARS = torch.tensor([0.5, 1.0, 2.0, 4.0])  # c_j = Var[x_j]


def gaussian_setup(n: int, seed: int = 0):
    """y = W x + sigma * eps with x ~ N(0, diag(c)); loss = per-timestep Gaussian NLL."""
    torch.manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT, bias=False)
    xs = [torch.randn(D_IN, generator=torch.Generator().manual_seed(10_000 + i)) * VARS.sqrt() for i in range(n)]

    def loss_fn(x, t, gen):
        k = t.shape[0]
        eps = torch.randn(k, D_OUT, generator=gen)  # one observation-noise draw per timestep
        y = (lin.weight.detach() @ x) + SIGMA * eps  # a sample of the model at W = W*
        return ((y - lin(x)) ** 2).sum(dim=1) / (2 * SIGMA**2)

    return lin, xs, loss_fn


def test_linear_gaussian_fisher_matches_analytic():
    """Analytic Fisher of the linear-Gaussian model.

    Model: y = W x + sigma * eps, eps ~ N(0, I), x ~ N(0, diag(c)); NLL l(W) = ||y - W x||^2 / (2 sigma^2).
    The data are the model's own samples at W = W*, so y - W* x = sigma * eps and
        dl/dW_ij = -(y - W x)_i x_j / sigma^2 = -eps_i x_j / sigma.
    compute_fisher sums K per-timestep losses, each with its own eps_k, and scales by T/K:
        g_ij = -(T/K) (x_j / sigma) sum_k eps_{k,i},   sum_k eps_{k,i} ~ N(0, K),
    hence F_ij = E[g_ij^2] = (T/K)^2 * K * c_j / sigma^2 = (T^2 / K) * c_j / sigma^2.
    (Sharing one eps over the K timesteps would give K times more; omitting T/K, (K/T)^2 times less.)
    g_ij^2 = F_ij * z^2 w^2 with z, w ~ N(0, 1) independent, so Var[g_ij^2] = F_ij^2 (E z^4 E w^4 - 1)
    = 8 F_ij^2 and the mean over N samples has relative standard deviation sqrt(8 / N).
    The test allows 5 of those per element.
    """
    n, k, big_t = 3000, 4, 8
    lin, xs, loss_fn = gaussian_setup(n)
    est = compute_fisher(loss_fn, {"w": lin.weight}, xs, timesteps_per_sample=k, total_timesteps=big_t, progress=False)
    analytic = (big_t**2 / k) * VARS.expand(D_OUT, D_IN) / SIGMA**2
    assert est.count == n and not est.stopped
    rel = (est["w"] - analytic).abs() / analytic
    assert rel.max().item() < 5 * math.sqrt(8 / n), rel
    assert lin.weight.requires_grad  # restored


def test_per_sample_squaring_not_batch_squaring():
    """compute_fisher squares per-sample gradients; squaring a batch mean is ~1/B smaller.

    For independent zero-mean per-sample gradients g_1..g_B, E[(mean_b g_b)^2] = E[g^2] / B.
    """
    n, k, big_t, b = 2000, 2, 2, 8
    lin, xs, loss_fn = gaussian_setup(n, seed=1)
    est = compute_fisher(loss_fn, {"w": lin.weight}, xs, timesteps_per_sample=k, total_timesteps=big_t, progress=False, seed=3)

    per_sample = []
    for i, x in enumerate(xs):  # same generators as the estimator
        gen = sample_generator(3, i)
        t = stratified_timesteps(k, big_t, gen)
        (g,) = torch.autograd.grad(loss_fn(x, t, gen).sum() * (big_t / k), [lin.weight])
        per_sample.append(g)
    g = torch.stack(per_sample)
    torch.testing.assert_close(est["w"], g.square().mean(0), rtol=1e-4, atol=0)

    batch_sq = g.reshape(n // b, b, D_OUT, D_IN).mean(1).square().mean(0)
    ratio = batch_sq.sum() / est["w"].sum()
    assert 0.75 / b < ratio.item() < 1.25 / b


def test_timestep_scaling_is_total_over_k():
    """A loss equal at every timestep: g = (T/K) * K * grad f = T grad f for every K, so F = T^2 (grad f)^2."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(3)
    seen = []

    def loss_fn(sample, t, gen):
        seen.append(t.clone())
        return lin(sample).square().sum().expand(t.shape[0])

    (gf,) = torch.autograd.grad(lin(x).square().sum(), [lin.weight])
    for k in (1, 10, 1000):
        seen.clear()
        est = compute_fisher(loss_fn, {"w": lin.weight}, [x], timesteps_per_sample=k, total_timesteps=1000, progress=False)
        torch.testing.assert_close(est["w"], (1000 * gf) ** 2, rtol=1e-5, atol=0)
        assert seen[0].shape == (k,)
    assert torch.equal(seen[0], torch.arange(1000))  # K = T is the reference's sum over all timesteps


def test_stratified_timesteps():
    g = torch.Generator().manual_seed(0)
    for k, big_t in ((10, 1000), (7, 10), (3, 3), (1, 1000)):
        for _ in range(20):
            t = stratified_timesteps(k, big_t, g)
            edges = [math.floor(i * big_t / k) for i in range(k + 1)]
            assert all(edges[i] <= t[i] < edges[i + 1] for i in range(k))
    with pytest.raises(ValueError, match="timesteps_per_sample"):
        stratified_timesteps(0, 1000)


def test_resume_equals_uninterrupted_run(tmp_path):
    lin, xs, loss_fn = gaussian_setup(23)
    params = {"w": lin.weight}
    full = compute_fisher(loss_fn, params, xs, 3, 30, out_path=tmp_path / "full.safetensors", progress=False, save_every=4)

    path = tmp_path / "part.safetensors"
    calls = {"n": 0}

    def stop_after_7():
        calls["n"] += 1
        return calls["n"] > 7

    part = compute_fisher(loss_fn, params, xs, 3, 30, out_path=path, progress=False, should_stop=stop_after_7, save_every=4)
    assert part.stopped and part.count == 7
    assert load_fisher(path).count == 7
    # Resume with a plain iterator (not a Sequence): the first 7 items are skipped.
    done = compute_fisher(loss_fn, params, iter(xs), 3, 30, out_path=path, progress=False, save_every=4)
    assert done.count == 23 and not done.stopped
    assert torch.equal(done["w"], full["w"])
    f = load_fisher(path)
    assert f.count == 23 and torch.equal(f.fisher["w"], full["w"])
    assert f.metadata["timesteps_per_sample"] == "3" and f.metadata["total_timesteps"] == "30"
    # Resuming a finished file is a no-op; a mismatched configuration is refused.
    again = compute_fisher(loss_fn, params, xs, 3, 30, out_path=path, progress=False)
    assert again.count == 23 and torch.equal(again["w"], full["w"])
    with pytest.raises(FileExistsError, match="timesteps_per_sample: '3' there, '4' now"):
        compute_fisher(loss_fn, params, xs, 4, 30, out_path=path, progress=False)
    with pytest.raises(FileExistsError, match="seed"):
        compute_fisher(loss_fn, params, xs, 3, 30, out_path=path, progress=False, seed=1)
    redone = compute_fisher(loss_fn, params, xs[:4], 3, 30, out_path=path, progress=False, seed=1, redo_different=True)
    assert redone.count == 4 and load_fisher(path).metadata["seed"] == "1"
    fresh = compute_fisher(loss_fn, params, xs[:5], 3, 30, out_path=path, resume=False, progress=False)
    assert fresh.count == 5 and load_fisher(path).count == 5
    fresh = compute_fisher(loss_fn, params, xs[:5], 3, 30, out_path=path, resume=False, progress=False)
    assert fresh.count == 5 and load_fisher(path).count == 5


def test_estimator_errors():
    lin, xs, loss_fn = gaussian_setup(2)
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="do not influence"):
        compute_fisher(loss_fn, {"w": lin.weight, "other": other.weight}, xs, 1, 10, progress=False)
    with pytest.raises(ValueError, match="3 per-timestep losses"):
        compute_fisher(lambda s, t, g: lin(s).sum(), {"w": lin.weight}, xs, 3, 10, progress=False)
    with pytest.raises(ValueError, match="empty"):
        compute_fisher(loss_fn, {"w": lin.weight}, [], 1, 10, progress=False)


class TinyDenoiser(nn.Module):
    """eps(x, t, context) with LDM-style names, enough for an end-to-end check."""

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))])
        self.attn2 = nn.Module()
        self.attn2.to_k = nn.Linear(5, 2, bias=False)

    def forward(self, x, t, context):
        h = self.input_blocks[0](x)
        return h * (1 + t.float()[:, None, None, None] / 1000) + self.attn2.to_k(context).mean(1)[:, :, None, None]


def test_eps_mse_loss_and_end_to_end_with_ewc():
    torch.manual_seed(0)
    den = TinyDenoiser()
    abar = torch.linspace(0.99, 0.01, 1000)
    x0, ctx = torch.randn(2, 4, 4), torch.randn(3, 5)
    t = torch.tensor([0, 500, 999])
    noise = torch.randn(3, 2, 4, 4)
    got = eps_mse_loss(den, x0, ctx, t, noise, abar)
    a = abar[t].view(3, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    ref = ((den(xt, t, ctx.expand(3, 3, 5)) - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, ref)

    params = fisher_params(den, ["input_blocks.0.0", "attn2.to_k"])
    assert list(params) == ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.attn2.to_k.weight"]
    den.requires_grad_(False)
    samples = [(torch.randn(2, 4, 4), torch.randn(3, 5)) for _ in range(4)]
    est = compute_fisher(eps_mse_loss_fn(den, abar), params, samples, 5, 1000, progress=False)
    assert all(v.dtype == torch.float32 and (v >= 0).all() and v.sum() > 0 for v in est.values())
    assert not any(p.requires_grad for p in den.parameters())
    # The estimate plugs straight into the EWC penalty of LoRAs on the same targets.
    loras = inject_lora(den, ["input_blocks.0.0", "attn2.to_k"], rank=1)
    assert fisher_params(den, ["input_blocks.0.0", "attn2.to_k"]).keys() == params.keys()
    with torch.no_grad():
        for layer in loras.values():
            layer.up.fill_(0.1)
    assert ewc_penalty(loras, est, 50.0).item() > 0


# --------------------------------------------------------------------------- converter

KEYS = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 6),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight": (8, 8),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (8,),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight": (8,),
    "diffusion_model.input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
    "diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 4, 3, 3),
    "diffusion_model.time_embed.0.weight": (8, 8),
    "diffusion_model.out.2.weight": (4, 8, 3, 3),
}


def write_source(path, prefix=""):
    g = torch.Generator().manual_seed(0)
    src = {prefix + k: torch.rand(s, generator=g, dtype=torch.float64) for k, s in KEYS.items()}
    torch.save(src, path)
    return src


def test_convert_pickle_keeps_target_subset(tmp_path):
    src = write_source(tmp_path / "fisher.pkl")
    kept = convert_fisher_pickle(tmp_path / "fisher.pkl", tmp_path / "x.safetensors", "xattn")
    assert set(kept) == {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight",
    }
    f = load_fisher(tmp_path / "x.safetensors")
    assert f.count is None and f.metadata["origin"] == "converted"
    for k in kept:
        assert f.fisher[k].dtype == torch.float32
        torch.testing.assert_close(f.fisher[k], src[k].float(), rtol=0, atol=0)

    kept = convert_fisher_pickle(tmp_path / "fisher.pkl", tmp_path / "n.safetensors", "noxattn")
    assert set(kept) == {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "diffusion_model.input_blocks.1.1.proj_in.weight",
        "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    }
    names = ["input_blocks.1.1.proj_in", "time_embed.0"]
    kept = convert_fisher_pickle(tmp_path / "fisher.pkl", tmp_path / "l.safetensors", names)
    assert set(kept) == {fisher_key(n) for n in names}
    with pytest.raises(ValueError, match="no Fisher entry"):
        convert_fisher_pickle(tmp_path / "fisher.pkl", tmp_path / "m.safetensors", ["input_blocks.9.0.op"])
    assert not (tmp_path / "m.safetensors").exists()

    # CompVis full-model names (model.diffusion_model.*) are normalised.
    write_source(tmp_path / "full.pt", prefix="model.")
    kept = convert_fisher_pickle(tmp_path / "full.pt", tmp_path / "f.safetensors", "xattn")
    assert all(k.startswith("diffusion_model.") for k in kept) and len(kept) == 2


class Payload:
    """Unpickling this object would create a file: the converter must refuse before that happens."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_convert_refuses_unsafe_pickles(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"diffusion_model.a.attn2.to_k.weight": torch.ones(2, 2), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_fisher_pickle(tmp_path / "evil.pt", tmp_path / "out.safetensors", "xattn")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()

    torch.save({"diffusion_model.a.attn2.to_k.weight": torch.ones(2, 2), "cfg": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    with pytest.raises(ValueError, match="never falls back"):
        convert_fisher_pickle(tmp_path / "ns.pt", tmp_path / "out.safetensors", "xattn")

    # A plain pickle.dump file may only hold tensors: any other global is refused before it runs.
    with open(tmp_path / "raw_evil.pkl", "wb") as f:
        pickle.dump({"diffusion_model.a.attn2.to_k.weight": torch.ones(2, 2), "x": Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"plain pickle\.dump\(\) file.*open is not allowed"):
        convert_fisher_pickle(tmp_path / "raw_evil.pkl", tmp_path / "out.safetensors", "xattn")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()

    # ... and a storage's embedded bytes are read weights-only, so code hidden there does not run either.
    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf, _use_new_zipfile_serialization=False)
    with open(tmp_path / "raw_storage.pkl", "wb") as f:
        pickle.dump({"diffusion_model.a.attn2.to_k.weight": StoragePayload(buf.getvalue())}, f)
    with pytest.raises(ValueError, match="never falls back"):
        convert_fisher_pickle(tmp_path / "raw_storage.pkl", tmp_path / "out.safetensors", "xattn")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


class StoragePayload:
    """Pickles as the storage loader applied to arbitrary ``torch.save`` bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_convert_reads_plain_pickle_dump(tmp_path, protocol):
    """The reference's combine_fisher_dict.py writes the published Fisher with pickle.dump."""
    g = torch.Generator().manual_seed(1)
    src = {"model." + k: torch.rand(s, generator=g) for k, s in KEYS.items()}
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    src[key] = src[key].t()  # a non-contiguous view keeps its values
    with open(tmp_path / "full_fisher_dict.pkl", "wb") as f:
        pickle.dump(src, f, protocol=protocol)
    with pytest.raises(Exception):  # what makes the dedicated reader necessary
        torch.load(tmp_path / "full_fisher_dict.pkl", weights_only=True)
    kept = convert_fisher_pickle(tmp_path / "full_fisher_dict.pkl", tmp_path / "x.safetensors", "xattn")
    assert len(kept) == 2
    f = load_fisher(tmp_path / "x.safetensors")
    for k in kept:
        torch.testing.assert_close(f.fisher[k], src["model." + k], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        convert_fisher_pickle(tmp_path / "nope.pkl", tmp_path / "out.safetensors", "xattn")


def test_convert_command_line(tmp_path, capsys):
    write_source(tmp_path / "fisher.pkl")
    assert main([str(tmp_path / "fisher.pkl"), str(tmp_path / "x.safetensors"), "--targets", "xattn"]) == 0
    assert "2 tensors" in capsys.readouterr().out
    assert len(load_fisher(tmp_path / "x.safetensors").fisher) == 2
    assert main([str(tmp_path / "fisher.pkl"), str(tmp_path / "y.safetensors"),
                 "--targets", "input_blocks.1.1.proj_in,time_embed.0"]) == 0
    assert main([str(tmp_path / "missing.pkl"), str(tmp_path / "z.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(tmp_path / "fisher.pkl"), str(tmp_path)]) == 2  # a folder: an error line, not a traceback
    assert "is a folder" in capsys.readouterr().err


def test_max_samples_stops_an_endless_stream_without_overdrawing():
    lin, xs, loss_fn = gaussian_setup(1)
    drawn = []

    def endless():
        i = 0
        while True:
            drawn.append(i)
            yield xs[0] * (1 + i / 10)
            i += 1

    est = compute_fisher(loss_fn, {"w": lin.weight}, endless(), 2, 10, progress=False, max_samples=5)
    assert est.count == 5 and len(drawn) == 5


def test_redo_keeps_the_old_file_until_the_new_estimate_is_complete(tmp_path):
    lin, xs, loss_fn = gaussian_setup(11)
    params = {"w": lin.weight}
    path = tmp_path / "f.safetensors"
    old = compute_fisher(loss_fn, params, xs, 3, 30, out_path=path, progress=False)
    before = path.read_bytes()
    calls = {"n": 0}

    def stop_after_4():
        calls["n"] += 1
        return calls["n"] > 4

    part = compute_fisher(loss_fn, params, xs, 3, 30, out_path=path, progress=False, seed=5, redo_different=True,
                          should_stop=stop_after_4, save_every=2)
    assert part.stopped
    assert path.read_bytes() == before  # the old estimate is whole while the new one is unfinished
    assert torch.equal(load_fisher(path).fisher["w"], old["w"])
    done = compute_fisher(loss_fn, params, xs, 3, 30, out_path=path, progress=False, seed=5, redo_different=True)
    straight = compute_fisher(loss_fn, params, xs, 3, 30, out_path=tmp_path / "s.safetensors", progress=False, seed=5)
    assert done.count == len(xs) and torch.equal(done["w"], straight["w"])  # the stopped redo was continued
    assert load_fisher(path).metadata["seed"] == "5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors", "s.safetensors"]


def test_unreadable_fisher_file_is_kept_unless_redo(tmp_path):
    from sae_core.artefacts import ArtefactError

    lin, xs, loss_fn = gaussian_setup(5)
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(ArtefactError, match="f.safetensors"):
        compute_fisher(loss_fn, {"w": lin.weight}, xs, 3, 30, out_path=path, progress=False)
    assert path.read_bytes() == b"\x00" * 10
    est = compute_fisher(loss_fn, {"w": lin.weight}, xs, 3, 30, out_path=path, progress=False, redo_different=True)
    assert load_fisher(path).count == est.count


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_fisher_values_must_be_finite_and_non_negative(tmp_path, bad):
    from sae_core.artefacts import ArtefactError

    fisher = torch.rand(3, 4)
    fisher[1, 2] = bad
    from sae_core.amnesia.fisher import save_fisher

    save_fisher(tmp_path / "f.safetensors", {"w": fisher})
    with pytest.raises(ArtefactError, match="finite values >= 0"):
        load_fisher(tmp_path / "f.safetensors")


def test_convert_refuses_build_on_an_allowed_global(tmp_path):
    """A 60-byte pickle that sets an attribute of the allowed _rebuild_tensor_v2 (BUILD with slot state) is refused
    before it changes the function for the rest of the process."""
    import struct

    import torch._utils

    name, value = b"_ce_probe", b"changed"
    payload = (b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"N" + b"}"
               + b"X" + struct.pack("<I", len(name)) + name + b"X" + struct.pack("<I", len(value)) + value + b"s"
               + b"\x86" + b"b" + b".")
    path = tmp_path / "build.pkl"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="BUILD"):
        convert_fisher_pickle(path, tmp_path / "out.safetensors", "xattn")
    assert not hasattr(torch._utils._rebuild_tensor_v2, "_ce_probe")
    assert not (tmp_path / "out.safetensors").exists()
