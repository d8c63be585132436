"""The MiniCanvas text encoder: a small transformers ``CLIPTextModel``.

The architecture is CLIP's (token + position embeddings, causal pre-LN transformer,
final layer norm). It is wrapped so that the residual stream sits at
``text_model.encoder.layers[i]`` and state-dict keys read ``text_model.…`` as in SD's
CLIP, on transformers 4.x (where ``CLIPTextModel.text_model`` is the transformer) and 5.x
(where ``CLIPTextModel`` is the transformer itself) alike. The UNet consumes
``last_hidden_state`` (after the final layer norm), as Stable Diffusion does. No padding
mask is passed to the model (as in SD): padded positions are encoded like any other token
under the causal mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import WordTokenizer


@dataclass
class TextEncoderConfig:
    """Size of the CLIP-architecture text encoder."""

    hidden_size: int = 128
    """Residual-stream width (and the UNet's context_dim)."""
    num_hidden_layers: int = 4
    """Transformer layers."""
    num_attention_heads: int = 4
    """Attention heads per layer."""
    intermediate_size: int = 256
    """MLP width."""

    def to_dict(self) -> dict:
        return asdict(self)


class MiniTextEncoder(nn.Module):
    """``text_model``: the CLIP text transformer; ``forward(input_ids) -> CLIP output``."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        model = CLIPTextModel(config)
        # transformers 4.x nests the transformer one level down; 5.x does not.
        self.text_model = getattr(model, "text_model", model)
        self.config = config

    @property
    def layers(self) -> nn.ModuleList:
        """The residual-stream layers, ``text_model.encoder.layers``."""
        return self.text_model.encoder.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """CLIP text output (``last_hidden_state`` [B, L, d], ``pooler_output`` [B, d])."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask)


def build_text_encoder(cfg: TextEncoderConfig, tokenizer: WordTokenizer) -> MiniTextEncoder:
    """A randomly initialised CLIP text encoder sized for ``tokenizer``'s vocabulary and length."""
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=tokenizer.max_length,
        hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        projection_dim=cfg.hidden_size,
    )
    # Eager attention keeps the behaviour independent of optional kernels.
    config._attn_implementation = "eager"
    return MiniTextEncoder(config)
