"""A small pixel-space UNet with Stable Diffusion's module layout.

Module names follow the LDM / ComfyUI ``openaimodel`` convention so that code written
against SD1.x UNets finds the same places here:

* ``time_embed`` (Linear, SiLU, Linear) on a sinusoidal timestep embedding;
* ``input_blocks.N.M``: block 0 is the input conv, then per level ``num_res_blocks``
  blocks of ``[ResBlock, SpatialTransformer?]`` and a ``[Downsample]`` block between levels;
* ``middle_block.{0,1,2}`` = ResBlock, SpatialTransformer, ResBlock;
* ``output_blocks.N.M``: per level ``num_res_blocks + 1`` blocks of
  ``[ResBlock, SpatialTransformer?, Upsample?]``;
* ``out`` (GroupNorm, SiLU, Conv).

Each ``SpatialTransformer`` has ``norm``, ``proj_in``, ``transformer_blocks.0`` with
``norm1, attn1, norm2, attn2, norm3, ff`` and ``proj_out``; attention modules hold Linear
``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` exactly as SD does (``attn2`` is the
cross-attention, ``to_k``/``to_v``: context_dim -> inner_dim).

With the default config (3 levels at 32, 16 and 8 pixels, one ResBlock per level,
transformers on levels 1 and 2) the transformers are ``input_blocks.{3,5}.1``,
``middle_block.1`` and ``output_blocks.{0,1,2,3}.1``; ``output_blocks.2.1`` and
``output_blocks.3.1`` work on the 16x16 grid and ``output_blocks.3.2`` is the Upsample that
follows the latter, the same arrangement as SD1.x's ``output_blocks.4.1``/``5.1``/``5.2``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Shape of the MiniCanvas UNet."""

    in_channels: int = 3
    """Image channels in (RGB, pixel space)."""
    out_channels: int = 3
    """Channels predicted (epsilon)."""
    model_channels: int = 24
    """Channels of the first level."""
    channel_mult: tuple[int, ...] = (1, 2, 2)
    """Channel multiplier per level; each level after the first halves the resolution."""
    num_res_blocks: int = 1
    """ResBlocks per level on the down path (the up path has one more)."""
    attention_levels: tuple[int, ...] = (1, 2)
    """Levels (0-based) that carry a SpatialTransformer after each ResBlock."""
    num_heads: int = 4
    """Attention heads in every SpatialTransformer."""
    context_dim: int = 128
    """Width of the text-encoder output consumed by cross-attention."""
    groups: int = 8
    """GroupNorm groups."""
    ff_mult: int = 2
    """Feed-forward expansion (GEGLU inner width = ff_mult * channels)."""

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        for key in ("channel_mult", "attention_levels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim] (cos, sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a timestep-embedding shift, and a 1x1 skip when widths differ."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head (self or cross) attention with SD's Linear names ``to_q/to_k/to_v/to_out.0``."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int):
        super().__init__()
        inner = query_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        h = self.heads
        q, k, v = (z.reshape(b, z.shape[1], h, -1).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection as in SD's feed-forward (``ff.net.0.proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` GEGLU, ``net.1`` dropout, ``net.2`` Linear back to the model width."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-normed with a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, ff_mult: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim, ff_mult)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """``proj_out(transformer_blocks(proj_in(norm(x)))) + x`` over the flattened (h w) tokens."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, ff_mult: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, ff_mult)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).reshape(b, c, hh * ww).transpose(1, 2)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h)
        return x + h.transpose(1, 2).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class MiniUNet(nn.Module):
    """Epsilon-predicting UNet: ``forward(x [B,3,H,W], t [B], context [B,L,context_dim]) -> eps``."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        mc, g = cfg.model_channels, cfg.groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads, cfg.context_dim, g, cfg.ff_mult)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_chans = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, g)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, g), transformer(ch), ResBlock(ch, emb_dim, ch, g)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                skip = skip_chans.pop()
                layers = [ResBlock(ch + skip, emb_dim, mult * mc, g)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"MiniUNet: x must be [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"MiniUNet: context must be [B, L, {self.config.context_dim}], got {tuple(context.shape)}"
            )
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"MiniUNet: height and width must be multiples of {factor} pixels (it halves them "
                             f"{len(self.config.channel_mult) - 1} times; MiniCanvas draws 32x32), got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context)
        return self.out(h)

    def transformer_names(self) -> list[str]:
        """Qualified names of every SpatialTransformer, in forward order."""
        return [n for n, m in self.named_modules() if isinstance(m, SpatialTransformer)]
