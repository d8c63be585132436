"""ItD's "deactivate" step and its zero-shot classifier, on plain tensors.

For a residual ``h [B, L, d]`` of the hooked text-encoder layer and a concept feature set ``F``:

1. ``z = TopK(ReLU(W_enc (h - b_dec) + b_enc))`` per token (the SAE's code).
2. ``z~ = z`` except ``z~[:, t >= 1, F] = s * z[:, t >= 1, F]`` (default ``s = -8``: the
   features are sign-flipped and amplified, not zeroed; position 0, the BOS token, is untouched).
3. ``h~ = W_dec z~ + b_dec``: the full SAE reconstruction without an error term
   (``error_mode="reconstruct"``, as the reference), or ``h~ = h + (s - 1) W_dec[F] z_F``
   (``error_mode="preserve"``: the exact residual plus the steering delta only).
4. ``score_b = mean_{t, c} (h~ - h)^2`` per prompt.
5. A prompt is *detected* when ``score_b >= tau``; detected prompts get ``h~``, all others pass
   through bit-exact (the original tensor values, not a recomputation). The gate is per sequence.

All SAE maths runs in float32 whatever the model's dtype; the output is cast back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sae import SparseAutoencoder

__all__ = [
    "ERROR_MODES",
    "GateOutput",
    "ItDGate",
    "SaeMath",
    "steer",
    "steering_scores",
]

ERROR_MODES = ("reconstruct", "preserve")


class SaeMath:
    """Float32 per-token TopK encode/decode of a :class:`SparseAutoencoder`, for ItD.

    Works on the SAE's parameters directly, so a half-precision SAE is still evaluated in fp32
    and a training-time BatchTopK setting never leaks into inference. For very wide SAEs
    (ItD's 524,288 latents) the encoder is evaluated in chunks of ``latent_chunk`` latents and
    the per-chunk top-k candidates are merged, which bounds the temporary memory.
    """

    def __init__(self, sae: SparseAutoencoder, latent_chunk: int = 65536, token_chunk: int = 4096) -> None:
        for name in ("encoder", "W_dec", "b_dec"):
            if not hasattr(sae, name):
                raise TypeError(f"SaeMath needs a SparseAutoencoder (missing attribute '{name}'), got {type(sae).__name__}")
        self.sae = sae
        self.latent_chunk = max(1, int(latent_chunk))
        self.token_chunk = max(1, int(token_chunk))

    @property
    def d_in(self) -> int:
        return int(self.sae.W_dec.shape[1])

    @property
    def num_latents(self) -> int:
        return int(self.sae.W_dec.shape[0])

    @property
    def k(self) -> int:
        return int(self.sae.cfg.k)

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    def check_width(self, width: int, where: str) -> None:
        """Raise a clear ValueError when ``width`` (of ``where``) differs from the SAE's ``d_in``."""
        if int(width) != self.d_in:
            hook = getattr(self.sae.cfg, "hookpoint", None)
            raise ValueError(
                f"SAE width mismatch: the SAE reads d_in={self.d_in} features"
                f"{f' (trained on {hook!r})' if hook else ''} but {where} has width {int(width)}. "
                f"Use an SAE trained on this text encoder's layer."
            )

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token TopK code of ``x [..., d]``: ``(acts, indices)`` each ``[..., k]`` (fp32, int64)."""
        self.check_width(x.shape[-1], "the input")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in).to(device=self.device, dtype=torch.float32)
        w, b = self.sae.encoder.weight, self.sae.encoder.bias
        centred = x - self.sae.b_dec.float()
        k, n = self.k, self.num_latents
        if n <= self.latent_chunk:
            pre = F.relu(F.linear(centred, w.float(), b.float()))
            acts, idx = pre.topk(k, dim=-1)
        else:
            cand_v, cand_i = [], []
            for start in range(0, n, self.latent_chunk):
                stop = min(n, start + self.latent_chunk)
                pre = F.relu(F.linear(centred, w[start:stop].float(), b[start:stop].float()))
                v, i = pre.topk(min(k, stop - start), dim=-1)
                cand_v.append(v)
                cand_i.append(i + start)
            values, where = torch.cat(cand_v, -1).topk(k, dim=-1)
            acts, idx = values, torch.cat(cand_i, -1).gather(-1, where)
        return acts.reshape(*lead, k), idx.reshape(*lead, k)

    @torch.no_grad()
    def decode(self, acts: Tensor, indices: Tensor, bias: bool = True) -> Tensor:
        """``sum_j acts_j W_dec[indices_j] (+ b_dec)`` in fp32, shape ``[..., d]``."""
        lead, m = acts.shape[:-1], acts.shape[-1]
        a = acts.reshape(-1, m).float()
        i = indices.reshape(-1, m)
        w = self.sae.W_dec
        if w.dtype == torch.float32:
            out = F.embedding_bag(i, w, per_sample_weights=a, mode="sum")
        else:  # gather rows chunk by chunk so the fp32 copy stays small
            out = torch.cat(
                [
                    torch.einsum("tm,tmd->td", a[s : s + self.token_chunk], w[i[s : s + self.token_chunk]].float())
                    for s in range(0, a.shape[0], self.token_chunk)
                ]
            ) if a.shape[0] else a.new_zeros(0, self.d_in)
        if bias:
            out = out + self.sae.b_dec.float()
        return out.reshape(*lead, self.d_in)

    def feature_table(self, features: Tensor | Sequence[int]) -> Tensor:
        """Boolean membership table ``[num_latents]`` of a feature set (on the SAE's device)."""
        idx = torch.as_tensor(features, dtype=torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_latents):
            raise ValueError(
                f"feature indices must lie in [0, {self.num_latents}) for this SAE; got range "
                f"[{int(idx.min())}, {int(idx.max())}] (were the features found with another SAE?)"
            )
        table = torch.zeros(self.num_latents, dtype=torch.bool, device=self.device)
        table[idx.to(self.device)] = True
        return table


def steer(
    math: SaeMath,
    hidden: Tensor,
    table: Tensor,
    scale: float = -8.0,
    error_mode: str = "reconstruct",
    skip_positions: int = 1,
    code: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The steered residual ``h~`` (fp32, ``[B, L, d]``) for a feature membership ``table``.

    ``skip_positions`` leading positions (the BOS token) keep their code unchanged.
    ``code`` may pass a precomputed ``math.encode(hidden)``. (:class:`ItDGate` validates its
    settings once and steers through :func:`_steer` without these checks.)
    """
    if error_mode not in ERROR_MODES:
        raise ValueError(f"error_mode must be one of {ERROR_MODES}, got {error_mode!r}")
    if hidden.dim() != 3:
        raise ValueError(f"expected a [batch, tokens, width] residual, got shape {tuple(hidden.shape)}")
    return _steer(math, hidden, table, float(scale), error_mode == "reconstruct", int(skip_positions), code)


def _steer(
    math: SaeMath,
    hidden: Tensor,
    table: Tensor,
    scale: float,
    reconstruct: bool,
    skip_positions: int,
    code: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`steer` on validated settings."""
    h = hidden.to(device=math.device, dtype=torch.float32)
    acts, idx = code if code is not None else math.encode(h)
    selected = table[idx]
    if skip_positions > 0:
        selected[:, :skip_positions] = False
    if reconstruct:
        return math.decode(torch.where(selected, acts * scale, acts), idx)
    delta = math.decode(torch.where(selected, acts * (scale - 1.0), torch.zeros_like(acts)), idx, bias=False)
    return h + delta


def steering_scores(hidden: Tensor, steered: Tensor) -> Tensor:
    """``mean_{t, c} (h~ - h)^2`` per prompt, fp32 ``[B]``."""
    return (steered - hidden.to(device=steered.device, dtype=torch.float32)).pow(2).mean(dim=(1, 2))


class GateOutput(NamedTuple):
    """What the gated ItD edit did to one batch."""

    hidden: Tensor
    """The residual to continue with (input dtype/device). It *is* the input tensor when no prompt
    was detected; otherwise detected rows hold ``h~`` and the others the original values."""

    scores: Tensor
    """``[B]`` fp32 (CPU) classifier scores."""

    detected: Tensor
    """``[B]`` bool (CPU): ``scores >= tau``."""

    steered: Tensor
    """``[B, L, d]`` fp32 steered residual ``h~`` for every row (on the SAE's device)."""


class ItDGate:
    """The gated ItD edit for one SAE and one feature set.

    Args:
        sae: the SAE of the hooked layer.
        features: concept feature indices (union over concepts).
        tau: threshold of the zero-shot classifier; ``None`` steers every prompt.
        scale: the factor ``s`` applied to the concept features (``-8`` in the reference).
        error_mode: ``"reconstruct"`` (reference: ``h~`` is the full SAE reconstruction) or
            ``"preserve"`` (``h~ = h + (s - 1) W_dec[F] z_F``).
        skip_positions: leading positions whose code is never changed (1 = the BOS token).
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        features: Tensor | Sequence[int],
        tau: float | None,
        scale: float = -8.0,
        error_mode: str = "reconstruct",
        skip_positions: int = 1,
    ) -> None:
        if error_mode not in ERROR_MODES:
            raise ValueError(f"error_mode must be one of {ERROR_MODES}, got {error_mode!r}")
        self.math = sae if isinstance(sae, SaeMath) else SaeMath(sae)
        self.features = torch.as_tensor(features, dtype=torch.int64).flatten().unique()
        self.table = self.math.feature_table(self.features)
        self.tau = None if tau is None else float(tau)
        self.scale = float(scale)
        self.error_mode = error_mode
        self._reconstruct = error_mode == "reconstruct"
        self.skip_positions = int(skip_positions)

    def steer(self, hidden: Tensor) -> Tensor:
        """``h~`` for every row (fp32); the SAE checks the width (settings were checked at construction)."""
        return _steer(self.math, hidden, self.table, self.scale, self._reconstruct, self.skip_positions)

    def scores(self, hidden: Tensor) -> Tensor:
        """Classifier scores ``[B]`` (fp32, CPU)."""
        return steering_scores(hidden, self.steer(hidden)).cpu()

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> GateOutput:
        steered = self.steer(hidden)
        scores = steering_scores(hidden, steered).cpu()
        if self.tau is None:
            detected = torch.ones_like(scores, dtype=torch.bool)
        else:
            detected = scores >= self.tau
        if not bool(detected.any()):
            return GateOutput(hidden, scores, detected, steered)
        gate = detected.to(hidden.device).view(-1, *([1] * (hidden.dim() - 1)))
        out = torch.where(gate, steered.to(device=hidden.device, dtype=hidden.dtype), hidden)
        return GateOutput(out, scores, detected, steered)
