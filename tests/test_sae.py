"""SparseAutoencoder: fast paths against plain eager references, constraints, losses, and a
planted-dictionary recovery run through the trainer."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import SaeConfig, TrainConfig
from sae_core.sae import SparseAutoencoder, batch_topk, per_token_topk
from sae_core.trainer import SaeTrainer


def make_sae(d=16, n=64, k=4, batch=False, seed=0, dtype=torch.float32) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        SaeConfig(d_in=d, num_latents=n, k=k, batch_topk=batch),
        dtype=dtype,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():  # non-trivial biases so every term of the maths is exercised
        g = torch.Generator().manual_seed(seed + 100)
        sae.encoder.bias.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g))
    return sae


def eager_pre_acts(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    w, b = sae.encoder.weight.detach(), sae.encoder.bias.detach()
    return torch.clamp((x - sae.b_dec.detach()) @ w.T + b, min=0)


def eager_topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row TopK by full sort: keep entries whose rank is < k."""
    order = pre.argsort(dim=-1, descending=True)
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, order[..., :k], True)
    return torch.where(keep, pre, torch.zeros_like(pre))


def eager_batch_topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    flat = pre.flatten()
    order = flat.argsort(descending=True)[: k * pre.shape[0]]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view_as(pre)


def to_dense(acts: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(*acts.shape[:-1], n, dtype=acts.dtype).scatter_add(-1, idx, acts)


# --------------------------------------------------------------------------------------------
def test_encode_matches_eager_reference():
    sae = make_sae()
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    ref = eager_topk_dense(eager_pre_acts(sae, x), sae.k)
    acts, idx = sae.encode(x)
    assert acts.shape == idx.shape == (3, 7, sae.k)
    torch.testing.assert_close(to_dense(acts, idx, sae.num_latents), ref)
    torch.testing.assert_close(sae.encode_dense(x), ref)
    torch.testing.assert_close(sae.pre_acts(x), eager_pre_acts(sae, x))


def test_decode_sparse_and_dense_agree_values_and_gradients():
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    results = {}
    for impl in ("sparse", "dense"):
        sae = make_sae()
        sae.decode_impl = impl
        out = sae(x)
        (out.fvu + out.sae_out.pow(3).mean()).backward()
        results[impl] = (out.sae_out.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    torch.testing.assert_close(results["sparse"][0], results["dense"][0])
    for name in results["sparse"][1]:
        torch.testing.assert_close(results["sparse"][1][name], results["dense"][1][name], msg=name)

    sae = make_sae()
    acts, idx = sae.encode(x)
    z = to_dense(acts, idx, sae.num_latents)
    eager = z @ sae.W_dec.detach() + sae.b_dec.detach()
    for impl in ("sparse", "dense"):
        torch.testing.assert_close(sae.decode(acts, idx, impl=impl), eager)
    torch.testing.assert_close(sae.decode_dense(z), eager)


def test_decode_agrees_on_batch_topk_padded_codes():
    sae = make_sae(batch=True)
    x = torch.randn(33, 16, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, 33)[:, None]
    acts, idx = sae.encode(x)
    sparse = sae.decode(acts, idx, impl="sparse")
    dense = sae.decode(acts, idx, impl="dense")
    torch.testing.assert_close(sparse, dense)
    z = eager_batch_topk_dense(eager_pre_acts(sae, x), sae.k)
    torch.testing.assert_close(sparse, z @ sae.W_dec.detach() + sae.b_dec.detach())


@pytest.mark.parametrize("batch", [False, True])
def test_fused_encoder_matches_eager_autograd(batch):
    """The sparse-backward encoder gives the same outputs and gradients as plain autograd."""
    x = torch.randn(37, 16, generator=torch.Generator().manual_seed(11)) * torch.linspace(0.2, 2, 37)[:, None]
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    results = {}
    for impl in ("fused", "eager"):
        sae = make_sae(batch=batch)
        sae.encoder_impl = impl
        xi = x.clone().requires_grad_()
        out = sae(xi, dead_mask=dead, k_aux=5)
        assert out.auxk_loss > 0
        (out.fvu + 0.5 * out.auxk_loss).backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
        grads["x"] = xi.grad.clone()
        results[impl] = (out, grads)
    (fo, fg), (eo, eg) = results["fused"], results["eager"]
    assert torch.equal(fo.latent_indices, eo.latent_indices)
    torch.testing.assert_close(fo.latent_acts, eo.latent_acts)
    torch.testing.assert_close(fo.fvu, eo.fvu)
    torch.testing.assert_close(fo.auxk_loss, eo.auxk_loss)
    for name in eg:
        torch.testing.assert_close(fg[name], eg[name], msg=name, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("n_tok,n_lat,k", [(33, 64, 4), (8, 50, 3), (5, 40, 40)])
def test_batch_topk_keeps_exactly_k_times_n(n_tok, n_lat, k):
    pre = torch.rand(n_tok, n_lat, generator=torch.Generator().manual_seed(n_tok)) + 0.01
    pre = pre * torch.linspace(0.1, 4.0, n_tok)[:, None]  # uneven rows: counts per row vary
    acts, idx = batch_topk(pre, k)
    assert int((acts != 0).sum()) == k * n_tok
    torch.testing.assert_close(to_dense(acts, idx, n_lat), eager_batch_topk_dense(pre, k))


def test_batch_topk_widens_when_one_row_owns_most_winners():
    # Row 0 holds far more than 4k of the global winners: the candidate window must grow.
    pre = torch.rand(10, 200, generator=torch.Generator().manual_seed(4))
    pre[0] += 10.0
    acts, idx = batch_topk(pre, 5)
    assert int((acts != 0).sum()) == 50
    assert int((acts[0] != 0).sum()) == 50  # all 50 winners are in row 0
    torch.testing.assert_close(to_dense(acts, idx, 200), eager_batch_topk_dense(pre, 5))


def test_batch_topk_gradient_reaches_only_selected_entries():
    pre = torch.rand(6, 30, generator=torch.Generator().manual_seed(5)).requires_grad_()
    acts, idx = batch_topk(pre, 2)
    acts.sum().backward()
    expected = (eager_batch_topk_dense(pre.detach(), 2) != 0).float()
    torch.testing.assert_close(pre.grad, expected)


def test_per_token_topk_shape():
    acts, idx = per_token_topk(torch.rand(2, 3, 20), 5)
    assert acts.shape == idx.shape == (2, 3, 5)


def test_decoder_rows_unit_norm_after_renorm():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.num_latents, 1) * 5 + 0.1)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents))
    fresh = make_sae(seed=9)
    torch.testing.assert_close(fresh.W_dec.norm(dim=1), torch.ones(fresh.num_latents))


def test_gradient_removal_leaves_grad_orthogonal_to_rows():
    sae = make_sae()
    out = sae(torch.randn(50, 16, generator=torch.Generator().manual_seed(6)))
    out.fvu.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    dots = (sae.W_dec.grad * sae.W_dec.detach()).sum(dim=1)
    assert dots.abs().max() < 1e-6 * max(before.abs().max().item(), 1.0)
    assert sae.W_dec.grad.abs().sum() > 0  # the orthogonal part survives


def test_fvu_of_perfect_reconstruction_is_zero():
    d = 8
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=2 * d, k=d), init=False)
    eye = torch.eye(d)
    with torch.no_grad():  # latents +e_i and -e_i: relu(x) - relu(-x) == x exactly
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    x = torch.randn(20, d, generator=torch.Generator().manual_seed(7))
    out = sae(x)
    assert torch.equal(out.sae_out, x)
    assert out.fvu.item() == 0.0
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # an imperfect decoder gives a positive FVU
    assert sae(x).fvu.item() > 0.0


def test_fvu_matches_eager_formula():
    sae = make_sae()
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(8))
    out = sae(x)
    ref = ((out.sae_out - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu, ref)


def test_auxk_zero_without_dead_latents_and_matches_reference_with_them():
    sae = make_sae()
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(9))
    assert sae(x).auxk_loss.item() == 0.0
    assert sae(x, dead_mask=torch.zeros(sae.num_latents, dtype=torch.bool)).auxk_loss.item() == 0.0

    dead = torch.zeros(sae.num_latents, dtype=torch.bool)
    dead[::5] = True  # 13 dead latents, k_aux = d_in // 2 = 8
    out = sae(x, dead_mask=dead)
    pre = eager_pre_acts(sae, x)
    masked = torch.where(dead, pre, torch.full_like(pre, -1.0))
    z_aux = eager_topk_dense(masked, 8).clamp_min(0)
    e_hat = z_aux @ sae.W_dec.detach() + sae.b_dec.detach()
    e = out.sae_out.detach() - x  # EleutherAI/SAeUron sign: e = x_hat - x
    scale = min(int(dead.sum()) / 8, 1.0)
    ref = scale * ((e_hat - e) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.auxk_loss, ref)

    few = torch.zeros(sae.num_latents, dtype=torch.bool)
    few[:2] = True  # fewer dead than k_aux: scale 2/8
    out2 = sae(x, dead_mask=few)
    z2 = eager_topk_dense(torch.where(few, pre, torch.full_like(pre, -1.0)), 2).clamp_min(0)
    ref2 = 0.25 * ((z2 @ sae.W_dec.detach() + sae.b_dec.detach() - e) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out2.auxk_loss, ref2)


def test_forward_shapes_dtypes_and_width_check():
    sae = make_sae(dtype=torch.bfloat16)
    x = torch.randn(2, 5, 16)
    out = sae(x)
    assert out.sae_out.shape == x.shape and out.sae_out.dtype == x.dtype
    assert out.fvu.dtype == torch.float32 and out.latent_acts.shape == (10, sae.k)
    assert (sae.d_in, sae.num_latents, sae.k) == (16, 64, 4)
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.randn(3, 15))


def test_config_resolves_num_latents_and_rejects_bad_k():
    assert SaeConfig(d_in=8, expansion_factor=4).num_latents == 32
    with pytest.raises(ValueError):
        SaeConfig(d_in=8, num_latents=16, k=17)


# --------------------------------------------------------------------------------------------
def test_planted_dictionary_is_recovered():
    """512 unit atoms in 64 dims; each sample is 4 atoms with U[0.5, 1.5] weights plus noise.

    Tuned for margin: 94-97% recovered on seeds 0-3 (threshold 90%); about 15 s on one core.
    """
    torch.manual_seed(0)
    d, n_atoms, bs = 64, 512, 256
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            idx = torch.randint(0, n_atoms, (bs, 4), generator=g)
            coef = torch.rand(bs, 4, generator=g) + 0.5
            yield torch.einsum("bk,bkd->bd", coef, atoms[idx]) + 0.01 * torch.randn(bs, d, generator=g)

    cfg = TrainConfig(
        batch_size=bs, lr=3e-3, k=4, num_latents=1024, batch_topk=False,
        dead_feature_threshold=50_000, seed=0, log_every=100,
    )
    trainer = SaeTrainer(cfg, d)
    sae = trainer.train(batches(), total_steps=1500, progress=False)
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (atoms @ w.T).max(dim=1).values
    recovered = (best >= 0.9).float().mean().item()
    assert recovered >= 0.9, f"only {recovered:.1%} of planted atoms recovered"
    assert trainer.history[-1]["fvu"] < trainer.history[0]["fvu"]
