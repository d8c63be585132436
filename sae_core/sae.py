"""TopK sparse autoencoder (the SAeUron / EleutherAI parameterisation).

Per token ``x`` (no input normalisation)::

    pre   = ReLU(W_enc (x - b_dec) + b_enc)            # [n]
    z     = TopK_k(pre)                                # k non-zeros per token
    x_hat = z @ W_dec + b_dec                          # W_dec is [n, d]: one row per latent

Sparse representation
---------------------
Latents travel as ``(top_acts, top_indices)`` pairs of equal shape ``[..., m]``. Under per-token
TopK ``m == k``. Under **BatchTopK** (training option, ``cfg.batch_topk``) the top ``k * N``
values of the whole ``[N, n]`` batch are kept; the number per token varies, so each row is padded:
``m`` is the largest per-token count in the batch, rows with fewer selections are padded with
zero activations (their indices point at real but irrelevant latents and contribute nothing).
Exactly ``k * N`` entries are "selected"; padding values are exactly 0. Every decode path accepts
this padded form unchanged.

Decode paths
------------
``decode_impl = "sparse"`` gathers the ``m`` decoder rows per token with ``F.embedding_bag``
(cost ``N * m * d``); ``"dense"`` scatters into a dense ``[N, n]`` code and multiplies by
``W_dec`` (cost ``N * n * d``). Both are exact; tests check they agree. The default is
``"sparse"``, chosen by measurement (``benchmarks/sae_train.py``, SAeUron's shape: d_in 1280,
20480 latents, k 32, BatchTopK, 4096 tokens, 1000 latents kept dead so that every step includes
the AuxK loss as in real training). One thread of a 2-core CPU shared with other jobs (load
~2.5): full training step 564 tokens/s sparse vs 288 dense (2.0x); without dead latents
(``--dead 0``, no AuxK) 831 vs 363 (2.3x); decoder forward alone 0.14 s sparse vs 1.7 s dense.
One H200 (``--device cuda``): 59 k tokens/s sparse vs 62 k dense with AuxK (dense 5% faster),
293 k vs 167 k without (sparse 1.75x). AuxK is most of a step's cost (up to ``k_aux = 640``
dead latents per token against ``k = 32``): it divides GPU throughput by 5.

Encoder backward
----------------
During training :meth:`SparseAutoencoder.forward` uses ``_FusedTopKEncoder``, an autograd
Function whose backward only touches the selected latents (``N * m * d`` work instead of two
dense ``N * n * d`` matmuls). Same benchmark at 1024 tokens, sparse decode, one CPU thread
(load ~4-6): 534 tokens/s fused vs 328 with plain autograd (1.6x) without dead latents; with
1000 dead latents both run at ~290 tokens/s, the AuxK selection (hundreds of latents per token)
then dominating either backward. ``encoder_impl = "eager"`` selects plain autograd; tests check
both give the same values and gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SaeConfig

__all__ = [
    "EncoderOutput",
    "ForwardOutput",
    "SparseAutoencoder",
    "batch_topk",
    "per_token_topk",
    "DECODE_IMPLS",
]

DECODE_IMPLS = ("sparse", "dense")


class EncoderOutput(NamedTuple):
    """Sparse code of a batch of tokens."""

    top_acts: Tensor
    """Activations ``[..., m]`` (``m == k`` per-token; zero-padded width under BatchTopK)."""

    top_indices: Tensor
    """Latent indices ``[..., m]`` (int64) matching ``top_acts``."""


class ForwardOutput(NamedTuple):
    """Result of :meth:`SparseAutoencoder.forward`."""

    sae_out: Tensor
    """Reconstruction ``x_hat``, same shape and dtype as the input."""

    latent_acts: Tensor
    """Active latent values ``[N, m]`` (input's leading dims flattened into ``N``)."""

    latent_indices: Tensor
    """Active latent indices ``[N, m]``."""

    fvu: Tensor
    """Fraction of variance unexplained, fp32 scalar: ``sum||x_hat - x||^2 / sum||x - mean(x)||^2``."""

    auxk_loss: Tensor
    """AuxK dead-latent loss, fp32 scalar (0 when no latent is dead)."""


def per_token_topk(pre_acts: Tensor, k: int) -> EncoderOutput:
    """Keep the ``k`` largest entries of each row of ``pre_acts`` (``[..., n]``)."""
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return EncoderOutput(values, indices)


def batch_topk(pre_acts: Tensor, k: int) -> EncoderOutput:
    """BatchTopK: keep the ``k * N`` largest entries of the whole ``[N, n]`` matrix.

    Exact, without sorting all ``N * n`` values: every row's ``w`` best candidates are taken
    (``w`` starts at ``4k``) and the global top ``k * N`` is chosen among them. If some row had
    all of its candidates selected (with a positive last one) it might own more winners beyond
    the candidate window, so ``w`` is doubled and the selection repeated. Within a row the
    selected candidates form a prefix (candidates are sorted), so the result is cut to the
    widest row and zero-padded (see the module docstring).
    """
    if pre_acts.dim() != 2:
        raise ValueError(f"batch_topk expects a 2-D [tokens, latents] tensor, got shape {tuple(pre_acts.shape)}")
    n_tok, n_lat = pre_acts.shape
    total = min(k * n_tok, n_tok * n_lat)
    width = min(n_lat, 4 * k)
    while True:
        values, indices = pre_acts.topk(width, dim=-1, sorted=True)
        chosen = values.detach().flatten().topk(total, sorted=False).indices
        mask = torch.zeros(n_tok * width, dtype=torch.bool, device=pre_acts.device)
        mask[chosen] = True
        mask = mask.view(n_tok, width)
        if width == n_lat:
            break
        saturated = mask[:, -1] & (values.detach()[:, -1] > 0)
        if not bool(saturated.any()):
            break
        width = min(n_lat, 2 * width)
    # Ties may make a row's selection a non-prefix; cut after the last selected position.
    positions = torch.arange(1, width + 1, device=pre_acts.device)
    m = max(int((mask * positions).amax()), 1)
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return EncoderOutput(values[:, :m], indices[:, :m])


def _select(pre_acts: Tensor, k: int, batch: bool) -> EncoderOutput:
    return batch_topk(pre_acts, k) if batch else per_token_topk(pre_acts, k)


class _FusedTopKEncoder(torch.autograd.Function):
    """Encoder + TopK (+ AuxK dead-latent selection) whose backward touches only selected latents.

    Forward runs the dense ``ReLU(W (x - b_dec) + b)`` without recording a graph and returns the
    selected ``(acts, indices)`` and, if ``dead_idx`` is given, the AuxK selection among the dead
    latents. Backward, with ``G [N, m]`` the incoming gradient of the selected acts (masked by
    ReLU) and ``I`` their indices:

    * ``grad_W = S @ (x - b_dec)`` with ``S`` the sparse ``[n, N]`` matrix holding ``G`` at ``(I, t)``
      (cost ``N m d`` instead of the dense ``N n d``),
    * ``grad_b = scatter-add of G`` over ``I``,
    * ``grad_b_dec = -grad_b @ W`` (the sum over tokens of ``-dL/d(x - b_dec)``),
    * ``grad_x = embedding_bag(I, W, G)`` (only if ``x`` requires grad).
    """

    @staticmethod
    def forward(ctx, x, b_dec, weight, bias, k, batch, dead_idx, k_aux):  # type: ignore[override]
        xc = x - b_dec
        pre = F.relu(F.linear(xc, weight, bias))
        acts, idx = _select(pre, k, batch)
        if dead_idx is not None:
            aux_acts, aux_pos = _select(pre.index_select(-1, dead_idx), k_aux, batch)
            aux_idx = dead_idx[aux_pos]
        else:
            aux_acts, aux_idx = pre.new_zeros(pre.shape[0], 0), idx.new_zeros(idx.shape[0], 0)
        ctx.save_for_backward(xc, weight, acts, idx, aux_acts, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return acts, idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, g_acts, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        xc, weight, acts, idx, aux_acts, aux_idx = ctx.saved_tensors
        grads, indices = [], []
        for g, a, i in ((g_acts, acts, idx), (g_aux, aux_acts, aux_idx)):
            if g is not None and i.shape[-1] > 0:
                grads.append(torch.where(a > 0, g, torch.zeros((), dtype=g.dtype, device=g.device)).float())
                indices.append(i)
        n, d = weight.shape
        n_tok = xc.shape[0]
        if not grads:
            return (None, None, torch.zeros_like(weight), torch.zeros(n, dtype=weight.dtype, device=weight.device)) + (None,) * 4
        g_all = torch.cat(grads, dim=-1)
        i_all = torch.cat(indices, dim=-1)
        flat_g, flat_i = g_all.flatten(), i_all.flatten()
        grad_bias = torch.zeros(n, dtype=torch.float32, device=weight.device).index_add_(0, flat_i, flat_g)
        grad_x = grad_b_dec = grad_weight = None
        if ctx.needs_input_grad[2]:
            rows = torch.arange(n_tok, device=xc.device).repeat_interleave(i_all.shape[-1])
            coo = torch.sparse_coo_tensor(
                torch.stack([flat_i, rows]), flat_g, (n, n_tok), check_invariants=False
            )
            grad_weight = torch.sparse.mm(coo, xc.float()).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(i_all, weight.float(), per_sample_weights=g_all, mode="sum").to(xc.dtype)
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(grad_bias @ weight.float()).to(xc.dtype)
        grad_bias = grad_bias.to(weight.dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_b_dec, grad_weight, grad_bias, None, None, None, None


class SparseAutoencoder(nn.Module):
    """TopK sparse autoencoder with an ``nn.Linear`` encoder and a free ``[n, d]`` decoder.

    Parameters: ``encoder.weight [n, d]``, ``encoder.bias [n]`` (init 0), ``W_dec [n, d]``
    (init: copy of the encoder weight with unit-norm rows) and ``b_dec [d]`` (init 0).
    """

    decode_impl: str = "sparse"
    """``"sparse"`` (gather k decoder rows per token) or ``"dense"`` (scatter + matmul); see module doc."""

    encoder_impl: str = "fused"
    """``"fused"`` (custom autograd Function with a sparse backward, used by :meth:`forward` when
    gradients are enabled) or ``"eager"`` (plain autograd through the dense pre-activations)."""

    def __init__(
        self,
        cfg: SaeConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        init: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build an SAE for ``cfg``.

        ``init=False`` leaves the parameters uninitialised (for loading from a file).
        ``generator`` seeds the encoder's Kaiming-uniform init (the global RNG is not used).
        """
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.num_latents
        self.encoder = nn.utils.skip_init(nn.Linear, d, n, device=device if device is not None else "cpu", dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.empty(d, device=device, dtype=dtype))
        if init:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Default ``nn.Linear`` weight init, zero biases, decoder = unit-norm copy of the encoder."""
        if generator is not None and generator.device != self.encoder.weight.device:
            weight = torch.empty_like(self.encoder.weight, device=generator.device)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            self.encoder.weight.copy_(weight)
        else:
            nn.init.kaiming_uniform_(self.encoder.weight, a=math.sqrt(5), generator=generator)
        self.encoder.bias.zero_()
        self.W_dec.copy_(self.encoder.weight)
        self.b_dec.zero_()
        self.set_decoder_norm_to_unit_norm()

    # -- properties ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, num_latents={self.num_latents}, k={self.k}, "
            f"batch_topk={self.cfg.batch_topk}, hookpoint={self.cfg.hookpoint!r}, decode_impl={self.decode_impl!r}"
        )

    # -- encoder ------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"SAE input has width {x.shape[-1]} but this SAE expects d_in={self.d_in} "
                f"(hookpoint={self.cfg.hookpoint!r})"
            )

    def pre_acts(self, x: Tensor) -> Tensor:
        """``ReLU(encoder(x - b_dec))``, shape ``[..., n]``, in the SAE's dtype."""
        self._check_input(x)
        x = x.to(self.encoder.weight.dtype)
        return F.relu(self.encoder(x - self.b_dec))

    def select_topk(self, pre_acts: Tensor, batch: bool | None = None) -> EncoderOutput:
        """TopK over pre-activations: per token, or BatchTopK (``[N, n]`` input) when ``batch``."""
        batch = self.cfg.batch_topk if batch is None else batch
        if batch:
            return batch_topk(pre_acts.reshape(-1, pre_acts.shape[-1]), self.k)
        return per_token_topk(pre_acts, self.k)

    def encode(self, x: Tensor, batch_topk: bool | None = None) -> EncoderOutput:
        """Sparse code of ``x [..., d]``: ``[..., k]`` per token (default ``cfg.batch_topk``;
        under BatchTopK the leading dims are flattened to ``[N, m]``)."""
        return self.select_topk(self.pre_acts(x), batch_topk)

    def encode_dense(self, x: Tensor, batch_topk: bool | None = None) -> Tensor:
        """Dense code ``z [..., n]`` with zeros outside the selected latents."""
        top_acts, top_indices = self.encode(x, batch_topk)
        z = top_acts.new_zeros(*top_acts.shape[:-1], self.num_latents)
        z = z.scatter(-1, top_indices, top_acts)
        return z.reshape(*x.shape[:-1], self.num_latents)

    # -- decoder ------------------------------------------------------------------------------
    def decode(self, top_acts: Tensor, top_indices: Tensor, impl: str | None = None) -> Tensor:
        """Reconstruction ``[..., d]`` from a sparse code ``[..., m]`` (includes ``b_dec``)."""
        impl = impl or self.decode_impl
        if top_acts.shape != top_indices.shape:
            raise ValueError(f"top_acts {tuple(top_acts.shape)} and top_indices {tuple(top_indices.shape)} differ")
        lead, m = top_acts.shape[:-1], top_acts.shape[-1]
        acts = top_acts.reshape(-1, m).to(self.W_dec.dtype)
        idx = top_indices.reshape(-1, m)
        if impl == "sparse":
            out = F.embedding_bag(idx, self.W_dec, per_sample_weights=acts, mode="sum")
        elif impl == "dense":
            z = acts.new_zeros(acts.shape[0], self.num_latents).scatter(-1, idx, acts)
            out = z @ self.W_dec
        else:
            raise ValueError(f"unknown decode impl {impl!r}; expected one of {DECODE_IMPLS}")
        return (out + self.b_dec).reshape(*lead, self.d_in)

    def decode_dense(self, z: Tensor) -> Tensor:
        """Reconstruction ``[..., d]`` from a dense code ``z [..., n]`` (includes ``b_dec``)."""
        if z.shape[-1] != self.num_latents:
            raise ValueError(f"dense code has width {z.shape[-1]}, expected num_latents={self.num_latents}")
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    # -- forward / losses ---------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None) -> ForwardOutput:
        """Encode, decode and compute FVU and AuxK on a batch ``x [..., d]``.

        ``dead_mask`` (bool ``[n]``) marks dead latents for AuxK; ``k_aux`` defaults to ``d_in // 2``.
        AuxK (EleutherAI / SAeUron convention): the top ``k_aux`` dead-latent pre-activations
        (BatchTopK or per token, as the main code) are decoded *with* ``b_dec`` into ``e_hat``
        and regressed onto ``e = x_hat - x``; the squared error is scaled by
        ``min(#dead / k_aux, 1)`` and divided by the batch's total variance.
        """
        self._check_input(x)
        shape = x.shape
        x2 = x.reshape(-1, self.d_in)
        dead_idx = None
        if dead_mask is not None:
            if dead_mask.shape != (self.num_latents,):
                raise ValueError(f"dead_mask must have shape ({self.num_latents},), got {tuple(dead_mask.shape)}")
            dead_idx = dead_mask.nonzero().squeeze(1)
            if dead_idx.numel() == 0:
                dead_idx = None
        k_aux_nominal = k_aux if k_aux is not None else self.d_in // 2
        k_eff = min(k_aux_nominal, dead_idx.numel()) if dead_idx is not None else 0
        batch = self.cfg.batch_topk

        if self.encoder_impl == "fused" and torch.is_grad_enabled():
            top_acts, top_indices, aux_acts, aux_indices = _FusedTopKEncoder.apply(
                x2.to(self.encoder.weight.dtype), self.b_dec, self.encoder.weight, self.encoder.bias,
                self.k, batch, dead_idx, k_eff,
            )
        elif self.encoder_impl in ("fused", "eager"):
            pre = self.pre_acts(x2)
            top_acts, top_indices = _select(pre, self.k, batch)
            if dead_idx is not None:
                aux_acts, aux_pos = _select(pre.index_select(-1, dead_idx), k_eff, batch)
                aux_indices = dead_idx[aux_pos]
        else:
            raise ValueError(f"unknown encoder impl {self.encoder_impl!r}; expected 'fused' or 'eager'")
        sae_out = self.decode(top_acts, top_indices)

        xf = x2.float()
        e = sae_out.float() - xf
        total_variance = (xf - xf.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
        fvu = e.pow(2).sum() / total_variance

        auxk_loss = xf.new_zeros(())
        if dead_idx is not None:
            scale = min(dead_idx.numel() / k_aux_nominal, 1.0)
            e_hat = self.decode(aux_acts, aux_indices)
            auxk_loss = scale * (e_hat.float() - e).pow(2).sum() / total_variance

        return ForwardOutput(sae_out.to(x.dtype).reshape(shape), top_acts, top_indices, fvu, auxk_loss)

    # -- decoder constraints ------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale every decoder row to unit L2 norm (norms computed in fp32)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        norm = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True, dtype=torch.float32)
        self.W_dec.div_((norm + eps).to(self.W_dec.dtype))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the row's orthogonal complement."""
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        dot = torch.linalg.vecdot(grad.float(), w.float(), dim=1)
        sq = torch.linalg.vecdot(w.float(), w.float(), dim=1).clamp_min(1e-30)
        grad.addcmul_((dot / sq).unsqueeze(1).to(grad.dtype), w, value=-1)

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str, layout: str = "folder") -> str:
        """Save with :func:`sae_core.formats.save_sae`; returns the written path."""
        from .formats import save_sae

        return save_sae(self, path, layout=layout)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "SparseAutoencoder":
        """Load any supported layout with :func:`sae_core.formats.load_sae`."""
        from .formats import load_sae

        return load_sae(path, device=device, dtype=dtype)
