"""SaeTrainer: determinism, bit-exact resume, logging, interrupts, and the geometric median."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core.config import TrainConfig
from sae_core.formats import load_sae
from sae_core.trainer import EXPORT_DIR, STATE_NAME, SaeTrainer
from sae_core.utils import geometric_median, rechunk

D = 16


def stream(seed=0, chunk=24, chunks=None):
    """Deterministic activation stream in odd-sized chunks (re-chunked by the trainer)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(40, D, generator=g)
    i = 0
    while chunks is None or i < chunks:
        codes = torch.rand(chunk, 40, generator=g).pow(8)
        yield codes @ basis + 0.05 * torch.randn(chunk, D, generator=g) + 2.0
        i += 1


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        batch_size=64, lr=3e-3, k=4, num_latents=96, batch_topk=True, seed=0, log_every=2,
        dead_feature_threshold=128, k_aux=6, checkpoint_every=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def params(sae):
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def assert_bit_identical(a, b):
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_weights_and_other_seed_differs():
    a = SaeTrainer(small_cfg(), D).train(stream(), 12, progress=False)
    b = SaeTrainer(small_cfg(), D).train(stream(), 12, progress=False)
    c = SaeTrainer(small_cfg(seed=1), D).train(stream(), 12, progress=False)
    assert_bit_identical(params(a), params(b))
    assert not torch.equal(a.encoder.weight, c.encoder.weight)


@pytest.mark.parametrize("batch_topk", [True, False])
def test_resume_is_bit_exact(tmp_path, batch_topk):
    total = 12
    cfg = small_cfg(batch_topk=batch_topk)
    straight_trainer = SaeTrainer(cfg, D)
    straight = straight_trainer.train(stream(), total, progress=False)
    assert straight_trainer.history[-1]["dead_frac"] > 0  # AuxK and dead counting are exercised

    first = SaeTrainer(cfg, D)
    half = first.train(stream(), total, checkpoint_dir=tmp_path, progress=False, should_stop=lambda: first.step >= total // 2)
    assert first.interrupted and first.step == total // 2
    assert (tmp_path / STATE_NAME).is_file()
    assert_bit_identical(params(half), params(load_sae(tmp_path / EXPORT_DIR)))

    second = SaeTrainer(cfg, D)  # a fresh process would build it like this
    resumed = second.train(stream(), total, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert second.step == total and not second.interrupted
    assert_bit_identical(params(straight), params(resumed))
    assert torch.equal(second.tokens_since_fired, straight_trainer.tokens_since_fired)
    assert second.history == straight_trainer.history


def test_resume_with_stream_factory_and_checkpoint_every(tmp_path):
    total, cfg = 10, small_cfg(checkpoint_every=4)
    straight = SaeTrainer(cfg, D).train(stream(chunk=64), total, progress=False)

    def factory(start_token):  # seeks itself: the trainer must not skip again
        assert start_token % 64 == 0
        s = stream(chunk=64)
        for _ in range(start_token // 64):
            next(s)
        return s

    first = SaeTrainer(cfg, D)
    first.train(factory, total, checkpoint_dir=tmp_path, progress=False, should_stop=lambda: first.step >= 6)
    assert first.step == 6
    resumed = SaeTrainer(cfg, D).train(factory, total, checkpoint_dir=tmp_path, progress=False)
    assert_bit_identical(params(straight), params(resumed))
    # with resume=False the checkpoint is ignored and training starts over
    restarted = SaeTrainer(cfg, D)
    restarted.train(factory, 2, checkpoint_dir=tmp_path, resume=False, progress=False)
    assert restarted.step == 2


def test_resume_refuses_incompatible_checkpoint(tmp_path):
    SaeTrainer(small_cfg(), D).train(stream(), 2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="num_latents"):
        SaeTrainer(small_cfg(num_latents=80), D).train(stream(), 4, checkpoint_dir=tmp_path, progress=False)


def test_history_callbacks_and_result():
    entries, steps = [], []
    trainer = SaeTrainer(small_cfg(), D)
    sae = trainer.train(
        stream(), 10, progress=False, callback=entries.append,
        on_step=lambda step, total, metrics: steps.append((step, total, metrics["fvu"])),
    )
    assert [s for s, _, _ in steps] == list(range(1, 11)) and all(t == 10 for _, t, _ in steps)
    assert entries == trainer.history and [e["step"] for e in entries] == [2, 4, 6, 8, 10]
    for entry in trainer.history:
        assert {"fvu", "l0", "dead_frac", "auxk", "loss", "lr", "tokens"} <= set(entry)
        assert math.isfinite(entry["fvu"]) and 0 <= entry["dead_frac"] <= 1
        assert entry["l0"] == pytest.approx(4.0)  # BatchTopK keeps k per token on average
    assert trainer.history[-1]["fvu"] < trainer.history[0]["fvu"]
    assert trainer.history[-1]["lr"] < trainer.history[0]["lr"]  # linear decay
    assert sae.cfg.batch_topk is False and not sae.training
    assert trainer.sae.cfg.batch_topk is True  # the trainer's own copy keeps training settings
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-2, rtol=0)


def test_first_step_sets_b_dec_to_geometric_median():
    cfg = small_cfg(lr=0.0)  # no update: b_dec stays at its step-0 value
    trainer = SaeTrainer(cfg, D)
    first = next(rechunk(stream(), 64))
    trainer.train(stream(), 1, progress=False)
    torch.testing.assert_close(trainer.sae.b_dec.detach(), geometric_median(first))


def test_lr_schedule_warmup_and_linear_decay():
    trainer = SaeTrainer(small_cfg(lr=1.0, lr_warmup_steps=4), D)
    lrs = [trainer.lr_at(s, 12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:] == pytest.approx([(12 - s) / 8 for s in range(4, 12)])


def test_training_works_under_inference_mode(tmp_path):
    """ComfyUI runs nodes under torch.inference_mode(); the trainer must still train and resume."""
    reference = SaeTrainer(small_cfg(), D).train(stream(), 6, progress=False)
    with torch.inference_mode():
        batch = next(rechunk(stream(), 64))  # made under inference_mode: an inference tensor
        assert batch.is_inference()
        trainer = SaeTrainer(small_cfg(), D)
        trainer.train(stream(), 6, checkpoint_dir=tmp_path, progress=False, should_stop=lambda: trainer.step >= 3)
        sae = SaeTrainer(small_cfg(), D).train(stream(), 6, checkpoint_dir=tmp_path, progress=False)
        out = sae(batch)
    assert_bit_identical(params(reference), params(sae))
    assert torch.isfinite(out.fvu)


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="width 15"):
        SaeTrainer(small_cfg(batch_size=0), D).train([torch.randn(8, 15)], 1, progress=False)
    bad = torch.randn(64, D)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SaeTrainer(small_cfg(), D).train([bad], 1, progress=False)


def test_short_stream_warns():
    with pytest.warns(UserWarning, match="ended after 2 of 5"):
        SaeTrainer(small_cfg(), D).train(stream(chunk=64, chunks=2), 5, progress=False)


def test_rechunk_and_skip():
    chunks = [torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * i for i, n in enumerate([3, 5, 1, 7])]
    flat = torch.cat(chunks)
    out = list(rechunk(chunks, 4))
    assert len(out) == 4 and torch.equal(torch.cat(out), flat[:16])
    skipped = list(rechunk(chunks, 4, skip_tokens=5))
    assert torch.equal(torch.cat(skipped), flat[5:13])


# --------------------------------------------------------------------------------------------
def sum_of_distances(points, y):
    return (points - y).norm(dim=1).sum()


def numeric_median(points: torch.Tensor) -> torch.Tensor:
    """Minimise the sum of distances with L-BFGS in float64 (independent of Weiszfeld)."""
    y = points.mean(0).clone().requires_grad_()
    opt = torch.optim.LBFGS([y], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum_of_distances(points, y)
        loss.backward()
        return loss

    opt.step(closure)
    return y.detach()


def test_geometric_median_minimises_sum_of_distances():
    points = torch.randn(25, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    gm = geometric_median(points)
    ref = numeric_median(points)
    assert sum_of_distances(points, gm) <= sum_of_distances(points, ref) + 1e-9
    torch.testing.assert_close(gm, ref, atol=1e-4, rtol=0)
    # small perturbations never do better
    for _ in range(20):
        step = 1e-3 * torch.randn(3, dtype=torch.float64)
        assert sum_of_distances(points, gm) <= sum_of_distances(points, gm + step) + 1e-12


def test_geometric_median_is_robust_to_an_outlier():
    cluster = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)) * 0.1 + torch.tensor([1.0, -2.0, 0.5, 3.0])
    points = torch.cat([cluster, torch.full((1, 4), 1000.0)])
    gm = geometric_median(points)
    assert (gm - cluster.mean(0)).norm() < 0.1
    assert (points.mean(0) - cluster.mean(0)).norm() > 10  # the mean is dragged away
    assert gm.dtype == torch.float32
    # collinear points: the median is the middle point
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    torch.testing.assert_close(geometric_median(line), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        geometric_median(torch.empty(0, 3))


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", -1.0), ("grad_clip", float("nan")),
                                         ("auxk_alpha", float("inf")), ("k_aux", -1), ("log_every", -2)])
def test_train_config_refuses_bad_numbers(field, value):
    from sae_core.config import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_diverging_run_raises_and_checkpoints_nothing(tmp_path):
    from sae_core.config import TrainConfig
    from sae_core.trainer import SaeTrainer

    cfg = TrainConfig(batch_size=64, lr=1e30, k=4, num_latents=32, checkpoint_every=1, geometric_median_iters=2)
    trainer = SaeTrainer(cfg, d_in=8)
    data = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    with pytest.raises(FloatingPointError, match="diverged"):
        trainer.train(data, total_steps=20, checkpoint_dir=tmp_path / "ck", progress=False)
    saved = tmp_path / "ck" / "sae"
    if saved.exists():  # a checkpoint written before divergence holds finite weights
        from sae_core.formats import load_sae

        load_sae(saved)
