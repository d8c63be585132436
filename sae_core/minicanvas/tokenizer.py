"""Word-level tokenizer for MiniCanvas prompts (no downloads, fixed vocabulary).

Text is lower-cased, punctuation is dropped and words are split on whitespace. Each
sequence is ``<bos> w1 .. wn <eos> <pad> ...`` with a fixed length (CLIP-style BOS/EOS).
Words outside the vocabulary map to ``<unk>``; text longer than the length is truncated
(the EOS is always kept).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .data import OBJECTS, STYLES

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

# Words of the prompt templates plus a few common words that users type; the latter are
# never seen in training (their embeddings stay near their random init).
BASE_WORDS: tuple[str, ...] = (
    "an", "image", "of", "a", "in", "style",
    "the", "picture", "photo", "painting", "drawing", "art", "with", "and", "on", "background",
    "big", "small", "shape", "object", "colorful", "dark", "bright",
)


class TokenizedPrompts(NamedTuple):
    """Token ids and the mask of real (non-pad) tokens."""

    input_ids: torch.Tensor
    """int64 [B, L]."""
    attention_mask: torch.Tensor
    """int64 [B, L]: 1 for BOS, words and EOS; 0 for padding."""


@dataclass
class WordTokenizer:
    """Maps prompts to fixed-length id sequences over a word vocabulary."""

    vocab: list[str]
    """Token strings; the index is the id. Starts with the four special tokens."""
    max_length: int = 16
    """Padded sequence length, including BOS and EOS."""

    def __post_init__(self) -> None:
        if tuple(self.vocab[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {self.vocab[:4]}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocabulary has duplicate entries")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {self.max_length}")
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def default(cls, max_length: int = 16) -> "WordTokenizer":
        """The MiniCanvas vocabulary: specials, template words, objects and styles."""
        words = list(SPECIAL_TOKENS) + list(BASE_WORDS)
        words += [w for w in OBJECTS + STYLES if w not in words]
        return cls(words, max_length)

    @property
    def pad_token_id(self) -> int:
        return self.index[PAD]

    @property
    def unk_token_id(self) -> int:
        return self.index[UNK]

    @property
    def bos_token_id(self) -> int:
        return self.index[BOS]

    @property
    def eos_token_id(self) -> int:
        return self.index[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case words with punctuation removed (underscores become spaces)."""
        text = text.lower().replace("_", " ")
        return re.findall(r"[a-z0-9]+", text)

    def encode(self, text: str) -> list[int]:
        """Ids of one prompt, ``[bos, words.., eos]`` without padding (truncated to fit)."""
        ids = [self.index.get(w, self.unk_token_id) for w in self.split(text)]
        ids = ids[: self.max_length - 2]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        """Tokenize and pad a prompt or list of prompts to ``max_length``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}")
            row = self.encode(p)
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return TokenizedPrompts(ids, mask)

    def decode(self, ids: Sequence[int]) -> str:
        """Words of an id sequence, without special tokens."""
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] not in SPECIAL_TOKENS)

    def to_dict(self) -> dict:
        return {"vocab": list(self.vocab), "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        return cls(list(d["vocab"]), int(d["max_length"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
