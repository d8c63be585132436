"""The shipped MiniCanvas: judges, base-model quality bar and the adapter interface."""

import pytest
import torch

from sae_core.minicanvas.canvas import MiniCanvas, evaluation_prompts
from sae_core.minicanvas.data import OBJECTS, STYLES, make_dataset, prompt_for
from sae_core.minicanvas.files import WEIGHTS_DIR
from sae_core.minicanvas.metrics import base_accuracy

QUALITY_STEPS = 10
"""DDIM steps of the quality check (the shipped default uses more; 10 keeps the test fast)."""


@pytest.fixture(scope="module")
def canvas():
    torch.set_num_threads(1)
    return MiniCanvas.load()


def test_weights_are_package_data_and_small():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors")) + (WEIGHTS_DIR / "config.json").stat().st_size
    assert total <= 25 * 2**20


def test_judges_on_fresh_heldout_set(canvas):
    data = make_dataset(4, seed=424242)  # never used in training (train seed 0, held-out 1000)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255.0
    pred = canvas.judge(images)
    assert (pred.objects.numpy() == data.objects).mean() >= 0.98
    assert (pred.styles.numpy() == data.styles).mean() >= 0.98



def test_base_model_meets_quality_bar(canvas):
    specs = evaluation_prompts(unstyled=False)
    assert len(specs) == len(OBJECTS) * len(STYLES)
    table, images = canvas.evaluate(specs, seeds=[0], steps=QUALITY_STEPS)
    assert images.shape == (len(specs), 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    obj_acc, sty_acc = base_accuracy(table)
    assert obj_acc >= 0.9, f"object accuracy {obj_acc:.3f}"
    assert sty_acc >= 0.9, f"style accuracy {sty_acc:.3f}"


def test_cross_attention_projections_and_hook_points(canvas):
    projs = canvas.cross_attention_projections()
    d = canvas.text_encoder.config.hidden_size
    assert len(projs) == len(canvas.hook_points()) >= 4
    for name, to_k, to_v in projs:
        assert name.endswith("transformer_blocks.0.attn2")
        assert isinstance(to_k, torch.nn.Linear) and isinstance(to_v, torch.nn.Linear)
        assert to_k.in_features == to_v.in_features == d
        assert canvas.get_block(name).to_k is to_k
    assert any(p.startswith("output_blocks.") for p in canvas.hook_points())
    with pytest.raises(KeyError, match="SpatialTransformer blocks"):
        canvas.get_block("output_blocks.99.1")


def test_encode_text_shapes_and_uncond(canvas):
    tok = canvas.tokenize(["an image of a star", ""])
    assert tok.input_ids.shape == tok.attention_mask.shape == (2, canvas.tokenizer.max_length)
    e = canvas.encode_text(["an image of a star", ""])
    assert e.shape == (2, canvas.tokenizer.max_length, canvas.text_encoder.config.hidden_size)
    torch.testing.assert_close(e[1:], canvas.encode_text([""]))


def test_sample_is_per_seed_deterministic(canvas):
    p = [prompt_for(0, 1), prompt_for(3, None)]
    a = canvas.sample(p, seeds=[5, 6], steps=2)
    b = canvas.sample(p[1:], seeds=[6], steps=2)
    assert a.shape == (4, 3, 32, 32)
    torch.testing.assert_close(a[3:4], b, rtol=1e-3, atol=2e-4)  # batch composition does not matter


def test_hooks_see_step_index_and_can_edit_output(canvas):
    block = canvas.hook_points()[-1]
    seen = []

    def spy(module, inputs, output, ctx):
        seen.append((ctx.step_index, ctx.timestep, ctx.cfg_order, output.shape[0]))

    edited = canvas.with_hook(block, spy)
    edited.sample([prompt_for(1, 2)], seeds=[0], steps=3, cfg=3.0)
    ts = canvas.schedule.ddim_timesteps(3)
    assert [(s, t) for s, t, _, _ in seen] == list(enumerate(ts))
    assert all(order == ("uncond", "cond") and n == 2 for _, _, order, n in seen)
    # the original canvas is untouched and hooks are removed after sampling
    assert canvas.hooks == [] and len(canvas.get_block(block)._forward_hooks) == 0
    base = canvas.sample([prompt_for(1, 2)], seeds=[0], steps=3, cfg=3.0)
    zeroed = canvas.with_hook(block, lambda m, i, o, ctx: torch.zeros_like(o)).sample(
        [prompt_for(1, 2)], seeds=[0], steps=3, cfg=3.0)
    assert not torch.allclose(base, zeroed)


def test_replaced_encoding_is_used(canvas):
    calls = []

    def enc(prompts):
        calls.append(list(prompts))
        return canvas.encode_text_default(prompts)

    edited = canvas.replace(encode_fn=enc)
    a = edited.sample([prompt_for(2, 3)], seeds=[1], steps=2)
    b = canvas.sample([prompt_for(2, 3)], seeds=[1], steps=2)
    torch.testing.assert_close(a, b)
    assert [""] in calls and [prompt_for(2, 3)] in calls
    assert canvas.encode_fn is None
