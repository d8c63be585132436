"""Text through a ComfyUI CLIP: tokenize, encode, count the real tokens of a prompt's first chunk.

One mechanism, shared by the methods that need prompt encodings outside a sampler (RECE encodes its
concept, anchor and preserve prompts; ItD tokenizes its calibration prompts exactly as CLIPTextEncode does;
Selective Amnesia conditions its training on :func:`encode_prompts`, the same conditioning its sampler uses).

ComfyUI tokenizes a prompt into fixed-length chunks per sub-encoder (``clip.tokenize(text)`` is
``{"l": [[(token, weight), ...], ...], "g": ...}``; MiniCanvas: ``{"minicanvas": [[...]]}``), padded with the end
token (SD1/SDXL) or a pad token (MiniCanvas), and encodes them as one ``[1, length * chunks, width]``
conditioning. The chunk length is the tokenizer's (77 for CLIP, 16 for MiniCanvas): it is read off the tokens,
never assumed. The *real* tokens of a chunk are BOS, the words and the first end token after them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("concept_erasure")

__all__ = [
    "TokenizeFn",
    "chunk_ids",
    "encode_first_chunks",
    "encode_prompts",
    "end_token",
    "first_chunk_tokenizer",
    "real_token_count",
    "tokenizer_of",
]

_DEFAULT_END = 49407
"""CLIP's end-of-text token, used when the tokenizer does not say."""


def tokenizer_of(clip: Any, key: str) -> Any:
    """The sub-tokenizer of ``clip`` for tokenize key ``key`` (``"l"`` -> ``clip.tokenizer.clip_l``), or None."""
    return getattr(clip.tokenizer, f"clip_{key}", None) or getattr(clip.tokenizer, key, None)


def end_token(clip: Any, key: str) -> int:
    """The end-of-text token id of ``clip``'s tokenizer for ``key``."""
    end = getattr(tokenizer_of(clip, key), "end_token", None)
    return int(end) if isinstance(end, int) else _DEFAULT_END


def real_token_count(ids: Sequence[Any], end: int) -> int:
    """BOS, words and the first end token after position 0: their number in one chunk of ids (all, if none)."""
    for i in range(1, len(ids)):
        if isinstance(ids[i], int) and ids[i] == end:
            return i + 1
    return len(ids)


def chunk_ids(tokens: dict, key: str, text: str, who: str) -> list[Any]:
    """The token ids of the first chunk of ``tokens[key]`` (a ``clip.tokenize`` result of ``text``).

    A textual-inversion embedding stays as the tensor ComfyUI put there; a text longer than one chunk is
    logged as a warning naming ``who`` (only its first chunk is used).
    """
    chunks = tokens[key]
    if len(chunks) > 1:
        log.warning("%s: prompt %r is longer than one %d-token chunk; only its first chunk is used", who, text,
                    len(chunks[0]))
    return [item[0] for item in chunks[0]]


@torch.no_grad()
def encode_first_chunks(clip: Any, texts: Sequence[str], who: str) -> tuple[Tensor, list[int]]:
    """``(conditioning [n, length, width] float32 CPU, real-token counts)`` of each text's first chunk.

    Each text goes through the CLIP's normal encode path on its own (``clip.encode_from_tokens``, as
    CLIPTextEncode; a CLIP Set Last Layer applies). ``length`` is the tokenizer's chunk length (77 for CLIP,
    16 for MiniCanvas). The counts come from the first sub-encoder's tokens.
    """
    encs, counts = [], []
    for text in texts:
        tokens = clip.tokenize(text)
        key = sorted(tokens)[0]
        ids = chunk_ids(tokens, key, text, who)
        length = len(ids)
        cond = clip.encode_from_tokens(tokens)
        if isinstance(cond, (tuple, list)):
            cond = cond[0]
        if cond.dim() != 3 or cond.shape[1] < length or cond.shape[1] % length:
            raise ValueError(f"clip: encoding {text!r} gave conditioning of shape {tuple(cond.shape)}, "
                             f"expected [1, {length}*k, width] ({length}-token chunks)")
        enc = cond[0, :length].detach().to("cpu", torch.float32)
        if not torch.isfinite(enc).all():
            raise ValueError(f"clip: encoding {text!r} produced NaN or Inf values; check the text encoder's weights "
                             "and precision")
        if encs and enc.shape != encs[0].shape:
            raise ValueError(f"clip: {text!r} encoded to {tuple(enc.shape)}, the other texts to "
                             f"{tuple(encs[0].shape)}")
        encs.append(enc)
        counts.append(real_token_count(ids, end_token(clip, key)))
    return torch.stack(encs), counts


TokenizeFn = Callable[[Sequence[str]], tuple[Tensor, list[int]]]
"""``tokenize(texts) -> (token ids [B, length] int64, real-token counts)``."""


def first_chunk_tokenizer(clip: Any, key: str, who: str) -> tuple[TokenizeFn, int]:
    """``(tokenize, padded length)``: ComfyUI's own tokenization for ``key`` (``clip.tokenize(text)[key]``).

    ``tokenize(texts)`` gives the first chunk's token ids ``[B, length]`` (int64) and each text's real-token
    count. Texts with a textual-inversion embedding are refused (only plain token ids can be fed back).
    """
    end = end_token(clip, key)
    length = len(clip.tokenize("")[key][0])

    def tokenize(texts: Sequence[str]) -> tuple[Tensor, list[int]]:
        rows, counts = [], []
        for text in texts:
            ids = chunk_ids(clip.tokenize(text), key, text, who)
            if not all(isinstance(t, int) for t in ids):
                raise ValueError(f"{who}: prompt {text!r} contains a textual-inversion embedding; these prompts "
                                 "must be plain text")
            if len(ids) != length:
                raise ValueError(f"{who}: prompt {text!r} tokenized to {len(ids)} tokens, expected {length}")
            rows.append([int(t) for t in ids])
            counts.append(real_token_count(ids, end))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length), counts

    return tokenize, length


def encode_prompts(clip: Any, prompts: list[str]) -> torch.Tensor:
    """CLIP conditioning ``[N, L, D]`` of each prompt (ValueError if lengths differ)."""
    rows = []
    for p in prompts:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        rows.append(cond[0][0].detach().to("cpu", torch.float32).clone())
    shapes = {tuple(r.shape[1:]) for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"prompts encode to different lengths {sorted(shapes)}; keep every prompt under 75 tokens")
    return torch.cat(rows) if rows else torch.zeros(0)
