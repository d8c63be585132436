"""Concept-inversion leak probe (sae_core.probe): the objective, its optimisation, and the settings' checks."""

from __future__ import annotations

import pytest
import torch

from sae_core.probe import InversionSettings, denoising_loss, invert_concept


def test_linear_toy_reaches_the_known_optimum():
    """A denoiser whose estimate is a linear map of the context: the loss is minimal where the map gives the
    images' mean, which the probe must find; the start and end losses are measured on the same draws."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 4, 4, generator=g)
    proj = torch.randn(2 * 5, 3 * 4 * 4, generator=g) / 4

    def denoise(x_t, index, context):
        return (context.reshape(context.shape[0], -1) @ proj).reshape(x_t.shape)

    sigmas = torch.tensor([2.0, 1.0, 0.5, 0.0])
    result = invert_concept(denoise, images, sigmas, torch.zeros(1, 2, 5) + 0.1,
                            InversionSettings(steps=600, lr=0.05, batch=6))
    target = images.mean(0).reshape(-1)
    best = torch.linalg.lstsq(proj.T, target[:, None]).solution.reshape(-1)
    reached = result.context.reshape(-1) @ proj
    torch.testing.assert_close(reached, best @ proj, atol=0.05, rtol=0.05)
    assert result.end_loss < result.start_loss and len(result.losses) == 600
    assert result.context.requires_grad is False


def test_minicanvas_probe_lowers_the_erased_denoising_error():
    """On the shipped MiniCanvas: starting from another object's prompt, the probe makes the model denoise
    images of a star better (the end loss below the start loss, on the same draws)."""
    from sae_core.minicanvas.canvas import MiniCanvas

    torch.manual_seed(0)
    canvas = MiniCanvas.load()
    images = canvas.sample(["an image of a star"], seeds=[0], steps=4)
    abar = canvas.schedule.alphas_cumprod
    ts = torch.tensor([800, 500, 250, 100])
    sigmas = ((1 - abar[ts]) / abar[ts]).sqrt()

    def denoise(x_t, index, context):
        a = abar[ts[index]]
        eps = canvas.denoiser(a.sqrt() * x_t, ts[index].repeat(x_t.shape[0]), context)
        return x_t - sigmas[index] * eps

    start = canvas.encode_text(["an image of a heart"]).detach()
    before = {k: v.clone() for k, v in canvas.unet.state_dict().items()}  # the model is not trained
    result = invert_concept(denoise, images.detach(), sigmas, start, InversionSettings(steps=8, lr=0.05, batch=1))
    assert result.end_loss < result.start_loss
    assert all(torch.equal(before[k], v) for k, v in canvas.unet.state_dict().items())


def test_denoising_loss_is_zero_for_a_perfect_denoiser():
    x0 = torch.randn(2, 3, 4, 4)
    loss = denoising_loss(lambda x_t, i, c: x0, x0, torch.tensor([1.5]), torch.zeros(1, 1, 1), 0, torch.randn_like(x0))
    assert float(loss) == 0.0


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": float("nan")}, {"lr": -1.0}, {"batch": 0}, {"steps": 2.5}])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        InversionSettings(**bad)


def test_bad_inputs_are_refused():
    den = lambda x_t, i, c: x_t  # noqa: E731
    with pytest.raises(ValueError, match="starting conditioning"):
        invert_concept(den, torch.zeros(1, 3, 2, 2), torch.tensor([1.0]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="positive"):
        invert_concept(den, torch.zeros(1, 3, 2, 2), torch.tensor([0.0]), torch.zeros(1, 2, 3))
