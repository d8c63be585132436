"""LoRA/LoCon layers, target presets on LDM names, ComfyUI-format export and application."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sae_core.amnesia.lora import (
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    apply_lora_state_dict,
    find_lora_layers,
    inject_lora,
    load_lora_metadata,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    select_targets,
)

C, CTX, T_DIM = 8, 6, 8  # channels, context width, time-embedding width


# --------------------------------------------------------------------------- a toy UNet with LDM names


class CrossAttention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(a @ v)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 2 * dim), nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, ctx_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, ctx_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, ctx_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, ctx_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        z = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            z = blk(z, context)
        return x + self.proj_out(z.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(T_DIM, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ToyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(T_DIM, T_DIM), nn.SiLU(), nn.Linear(T_DIM, T_DIM))
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(4, C, 3, padding=1)),
            TimestepEmbedSequential(ResBlock(C, C), SpatialTransformer(C, CTX)),
            TimestepEmbedSequential(Downsample(C)),
        ])
        self.middle_block = TimestepEmbedSequential(ResBlock(C, C), SpatialTransformer(C, CTX), ResBlock(C, C))
        self.output_blocks = nn.ModuleList([
            TimestepEmbedSequential(ResBlock(2 * C, C), SpatialTransformer(C, CTX), Upsample(C)),
        ])
        self.out = nn.Sequential(nn.GroupNorm(2, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1))

    def forward(self, x, t, context):
        freqs = torch.arange(T_DIM, dtype=torch.float32)
        emb = self.time_embed(torch.sin(t.float()[:, None] * (freqs + 1) / 100.0))
        hs = []
        h = x
        for blk in self.input_blocks:
            h = blk(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


class ToyBaseModel(nn.Module):
    """ComfyUI/CompVis-like wrapper: the UNet is ``diffusion_model``; another layer sits outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = ToyUNet()
        self.outside = nn.Linear(3, 3)


def make_unet(seed: int = 0) -> ToyUNet:
    torch.manual_seed(seed)
    return ToyUNet().eval()


def toy_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, CTX, generator=g)


def all_layers(root: nn.Module) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def randomise_up(loras, seed: int = 5, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in loras.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * std)


ATTN = "transformer_blocks.0"
ST_BLOCKS = ["input_blocks.1.1", "middle_block.1", "output_blocks.0.1"]


def expected_xattn() -> set[str]:
    return {f"{b}.{ATTN}.attn2.{p}" for b in ST_BLOCKS for p in ("to_q", "to_k", "to_v", "to_out.0")}


# --------------------------------------------------------------------------- presets


def test_presets_select_expected_ldm_names():
    unet = make_unet()
    everything = set(all_layers(unet))

    xattn = select_targets(unet, "xattn")
    assert set(xattn) == expected_xattn()
    assert len(xattn) == 12

    noxattn = set(select_targets(unet, "noxattn"))
    # Spot checks of what noxattn must contain and skip (written out, not derived from the rule).
    must = {
        "input_blocks.0.0",
        "input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3", "input_blocks.1.0.emb_layers.1",
        "input_blocks.1.1.proj_in", "input_blocks.1.1.proj_out",
        f"input_blocks.1.1.{ATTN}.attn1.to_q", f"input_blocks.1.1.{ATTN}.attn1.to_k",
        f"input_blocks.1.1.{ATTN}.attn1.to_v", f"input_blocks.1.1.{ATTN}.attn1.to_out.0",
        f"input_blocks.1.1.{ATTN}.ff.net.0.proj", f"input_blocks.1.1.{ATTN}.ff.net.2",
        "input_blocks.2.0.op", "output_blocks.0.0.skip_connection", "output_blocks.0.2.conv",
        "middle_block.2.out_layers.3",
    }
    must_not = expected_xattn() | {"time_embed.0", "time_embed.2", "out.2"}
    assert must <= noxattn
    assert not (must_not & noxattn)
    # ... and it is exactly "everything except attn2, time_embed and the output head".
    assert noxattn == everything - must_not

    assert set(select_targets(unet, "full")) == everything


def test_presets_on_base_model_are_scoped_to_diffusion_model():
    base = ToyBaseModel()
    names = select_targets(base, "full")
    assert "outside" not in names
    assert set(names) == {"diffusion_model." + n for n in all_layers(base.diffusion_model)}
    assert set(select_targets(base, "xattn")) == {"diffusion_model." + n for n in expected_xattn()}
    loras = inject_lora(base, "xattn", rank=2)
    assert set(loras) == {"diffusion_model." + n for n in expected_xattn()}
    # Exported keys are not double-prefixed.
    sd = lora_state_dict(loras)
    assert all(k.startswith("diffusion_model.input_blocks") or k.startswith("diffusion_model.middle_block")
               or k.startswith("diffusion_model.output_blocks") for k in sd)


def test_explicit_targets_and_errors():
    unet = make_unet()
    names = [f"input_blocks.1.1.{ATTN}.attn2.to_k", "input_blocks.1.0.in_layers.2"]
    assert select_targets(unet, names) == names
    with pytest.raises(ValueError, match="unknown LoRA target preset 'attn'"):
        select_targets(unet, "attn")
    with pytest.raises(ValueError, match="no such module"):
        select_targets(unet, ["input_blocks.9.1.proj_in"])
    with pytest.raises(ValueError, match="GroupNorm"):
        select_targets(unet, ["input_blocks.1.1.norm"])
    with pytest.raises(ValueError, match="empty"):
        select_targets(unet, [])
    inject_lora(unet, names, rank=2)
    with pytest.raises(ValueError, match="already carry a LoRA"):
        inject_lora(unet, names, rank=2)
    with pytest.raises(ValueError, match="rank"):
        inject_lora(make_unet(), names, rank=0)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("kind", ["linear", "conv3x3_stride2", "conv1x1"])
def test_delta_weight_is_the_exact_effective_weight_change(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(7, 5)
        x = torch.randn(3, 7)
        layer = LoRALinear(base, rank=3, alpha=6.0)
    elif kind == "conv1x1":
        base = nn.Conv2d(4, 6, 1)
        x = torch.randn(2, 4, 5, 5)
        layer = LoRAConv2d(base, rank=2, alpha=1.0)
    else:
        base = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
        x = torch.randn(2, 4, 9, 9)
        layer = LoRAConv2d(base, rank=3, alpha=1.5)
    with torch.no_grad():
        layer.up.normal_()
    dw = layer.delta_weight()
    assert dw.shape == base.weight.shape
    # Independent formula: dW[o, ...] = s * sum_r B[o, r] A[r, ...].
    ref = layer.scale * torch.einsum("or,r...->o...", layer.up.flatten(1), layer.down)
    torch.testing.assert_close(dw, ref)
    # The layer's output equals the base op with W0 + dW.
    w = base.weight + dw
    if kind == "linear":
        expect = F.linear(x, w, base.bias)
    else:
        expect = F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(layer(x), expect, atol=1e-5, rtol=1e-5)
    # Strength 0 is the base model, strength 0.5 half the delta.
    layer.strength = 0.0
    assert torch.equal(layer(x), base(x))
    layer.strength = 0.5
    w_half = base.weight + 0.5 * dw
    expect_half = F.linear(x, w_half, base.bias) if kind == "linear" else F.conv2d(x, w_half, base.bias, base.stride, base.padding)
    torch.testing.assert_close(layer(x), expect_half, atol=1e-5, rtol=1e-5)


def test_shapes_init_and_freezing():
    lin = LoRALinear(nn.Linear(7, 5), rank=3)
    assert lin.down.shape == (3, 7) and lin.up.shape == (5, 3)
    assert lin.scale == 1.0  # alpha defaults to rank
    conv = LoRAConv2d(nn.Conv2d(4, 6, 3), rank=2, alpha=4.0)
    assert conv.down.shape == (2, 4, 3, 3) and conv.up.shape == (6, 2, 1, 1)
    assert conv.scale == 2.0
    for layer in (lin, conv):
        assert torch.count_nonzero(layer.up) == 0
        assert torch.count_nonzero(layer.down) > 0
        assert not any(p.requires_grad for p in layer.base.parameters())
        assert layer.up.requires_grad and layer.down.requires_grad
        assert layer.weight is layer.base.weight
    with pytest.raises(ValueError, match="groups"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), rank=2)


def test_init_draws_on_the_cpu_whatever_the_factor_dtype():
    """A is drawn in fp32 on the CPU from the caller's generator and then cast: the same seed gives the
    same A in every dtype (and on every device: a CPU generator serves a model on CUDA too)."""
    a32 = LoRALinear(nn.Linear(7, 5), rank=3, generator=torch.Generator().manual_seed(4))
    a64 = LoRALinear(nn.Linear(7, 5).double(), rank=3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert a64.down.dtype == torch.float64
    assert torch.equal(a64.down, a32.down.double())
    c32 = LoRAConv2d(nn.Conv2d(4, 6, 3), rank=2, generator=torch.Generator().manual_seed(4))
    c16 = LoRAConv2d(nn.Conv2d(4, 6, 3), rank=2, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c16.down, c32.down.to(torch.bfloat16))


def test_zero_init_gives_identical_outputs_and_only_lora_trains():
    unet = make_unet()
    ref = copy.deepcopy(unet)
    x, t, ctx = toy_inputs()
    loras = inject_lora(unet, "full", rank=2, alpha=1.0)
    assert set(loras) == set(all_layers(ref))
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), ref(x, t, ctx))
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".up") or n.endswith(".down") for n in trainable)
    assert len(trainable) == 2 * len(loras)


# --------------------------------------------------------------------------- export / apply / merge


def test_state_dict_uses_comfyui_keys_and_round_trips(tmp_path):
    unet = make_unet()
    loras = inject_lora(unet, "noxattn", rank=3, alpha=1.5)
    randomise_up(loras)
    sd = lora_state_dict(loras)
    assert len(sd) == 3 * len(loras)
    for name, layer in loras.items():
        up, down, alpha = (sd[f"diffusion_model.{name}.{s}"] for s in ("lora_up.weight", "lora_down.weight", "alpha"))
        assert up.shape == layer.up.shape and down.shape == layer.down.shape
        assert alpha.dim() == 0 and alpha.item() == 1.5
        assert torch.equal(up, layer.up.detach())
    conv_name = "input_blocks.1.0.in_layers.2"
    assert sd[f"diffusion_model.{conv_name}.lora_up.weight"].shape == (C, 3, 1, 1)
    assert sd[f"diffusion_model.{conv_name}.lora_down.weight"].shape == (3, C, 3, 3)

    path = tmp_path / "sub" / "sa.safetensors"
    save_lora(path, sd, {"method": "selective_amnesia", "rank": 3})
    assert os.listdir(path.parent) == ["sa.safetensors"]  # no temp file left behind
    back = load_lora_state_dict(path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    meta = load_lora_metadata(path)
    assert meta["method"] == "selective_amnesia" and meta["rank"] == "3"
    with pytest.raises(FileNotFoundError):
        load_lora_state_dict(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("targets", ["xattn", "noxattn", "full"])
def test_apply_state_dict_reproduces_base_plus_delta(targets):
    unet = make_unet()
    plain = copy.deepcopy(unet)
    w0 = {n: p.detach().clone() for n, p in plain.named_parameters()}
    loras = inject_lora(unet, targets, rank=2, alpha=3.0)
    randomise_up(loras)
    x, t, ctx = toy_inputs()

    patched = apply_lora_state_dict(plain, lora_state_dict(loras), strength=1.0)
    assert sorted(patched) == sorted("diffusion_model." + n for n in loras)
    for name, layer in loras.items():
        torch.testing.assert_close(plain.get_submodule(name).weight, w0[name + ".weight"] + layer.delta_weight())
    # Untouched weights are untouched.
    touched = {n + ".weight" for n in loras}
    assert all(torch.equal(p, w0[n]) for n, p in plain.named_parameters() if n not in touched)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, ctx), unet(x, t, ctx), atol=1e-5, rtol=1e-4)

    # Strength scales the delta.
    half = copy.deepcopy(make_unet())
    apply_lora_state_dict(half, lora_state_dict(loras), strength=0.5)
    name = next(iter(loras))
    torch.testing.assert_close(half.get_submodule(name).weight, w0[name + ".weight"] + 0.5 * loras[name].delta_weight())


def test_apply_state_dict_errors():
    unet = make_unet()
    loras = inject_lora(copy.deepcopy(unet), "xattn", rank=2)
    sd = lora_state_dict(loras)
    bad = dict(sd)
    bad["diffusion_model.input_blocks.7.1.proj_in.lora_up.weight"] = torch.zeros(C, 2, 1, 1)
    bad["diffusion_model.input_blocks.7.1.proj_in.lora_down.weight"] = torch.zeros(2, C, 1, 1)
    with pytest.raises(ValueError, match="input_blocks.7.1.proj_in"):
        apply_lora_state_dict(copy.deepcopy(unet), bad)
    k = next(k for k in sd if k.endswith("lora_down.weight"))
    wrong = dict(sd)
    wrong[k] = torch.zeros(2, 99)
    with pytest.raises(ValueError, match="does not fit"):
        apply_lora_state_dict(copy.deepcopy(unet), wrong)
    stray = dict(sd)
    stray["diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not understood"):
        apply_lora_state_dict(copy.deepcopy(unet), stray)


def test_merge_and_remove():
    unet = make_unet()
    ref = copy.deepcopy(unet)
    x, t, ctx = toy_inputs()
    loras = inject_lora(unet, "full", rank=2)
    randomise_up(loras)
    with torch.no_grad():
        y_lora = unet(x, t, ctx)

    removed = remove_lora(copy.deepcopy(unet))
    assert set(removed) == set(loras)

    plain = copy.deepcopy(unet)
    remove_lora(plain)
    assert not find_lora_layers(plain)
    assert all(type(plain.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in loras)
    with torch.no_grad():
        assert torch.equal(plain(x, t, ctx), ref(x, t, ctx))

    merged = copy.deepcopy(unet)
    merge_lora(merged)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, ctx), y_lora, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["nan_up", "nan_alpha", "one_d", "rank0", "nan_strength"])
def test_bad_lora_numbers_and_shapes_are_refused(case):
    from sae_core.amnesia.lora import apply_lora_state_dict

    root = torch.nn.Sequential(torch.nn.Linear(4, 3))
    sd = {"0.lora_up.weight": torch.randn(3, 2), "0.lora_down.weight": torch.randn(2, 4), "0.alpha": torch.tensor(2.0)}
    strength = 1.0
    if case == "nan_up":
        sd["0.lora_up.weight"][0, 0] = float("nan")
    elif case == "nan_alpha":
        sd["0.alpha"] = torch.tensor(float("nan"))
    elif case == "one_d":
        sd["0.lora_up.weight"] = torch.randn(3)
    elif case == "rank0":
        sd["0.lora_up.weight"], sd["0.lora_down.weight"] = torch.zeros(3, 0), torch.zeros(0, 4)
    else:
        strength = float("nan")
    before = root[0].weight.detach().clone()
    with pytest.raises(ValueError):
        apply_lora_state_dict(root, sd, strength=strength, prefix="")
    assert torch.equal(root[0].weight, before)
