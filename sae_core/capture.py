"""Activation capture: find a module by dotted path, hook it, and turn what it sees into token rows.

The pieces, from low to high level:

* :func:`get_submodule` resolves ``"output_blocks.5.1"``-style paths and, when a path is wrong,
  names the closest valid ones.
* :func:`to_tokens` flattens a feature map or sequence into ``[tokens, d]`` rows (channel-last,
  row-major for images: token index ``h * W + w``) and can report each row's batch element and
  position.
* :func:`capture` is a context manager that hooks one submodule's output (or input) for the
  duration of a ``with`` block and always removes the hook again, even when the forward raises.
* :class:`ActivationCollector` runs one user call (for example one denoiser evaluation) under
  :func:`capture` and produces token rows plus per-row metadata columns (step, sigma/timestep,
  cond, prompt index, position), optionally filtered and streamed straight into an
  :class:`~sae_core.store.ActivationWriter`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CAPTURE_WHICH",
    "ActivationCollector",
    "Capture",
    "CollectedRows",
    "TokenRows",
    "capture",
    "expand_per_row",
    "get_submodule",
    "to_tokens",
]


# ---------------------------------------------------------------------------------------------
# Module lookup
# ---------------------------------------------------------------------------------------------


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``root`` at dotted ``path`` (``""`` is ``root`` itself).

    Raises:
        ValueError: when the path does not exist. The message names the longest valid prefix,
            that prefix's children and the closest full paths in the model.
    """
    if not isinstance(root, nn.Module):
        raise TypeError(f"get_submodule: root must be a torch.nn.Module, got {type(root).__name__}")
    if not isinstance(path, str):
        raise TypeError(f"get_submodule: path must be a string like 'output_blocks.5.1', got {path!r}")
    path = path.strip()
    if path == "":
        return root

    module = root
    walked: list[str] = []
    for part in path.split("."):
        child = module._modules.get(part) if part else None
        if child is None:
            raise ValueError(_missing_path_message(root, path, walked, module, part))
        module = child
        walked.append(part)
    return module


def _missing_path_message(root: nn.Module, path: str, walked: list[str], parent: nn.Module,
                          part: str) -> str:
    prefix = ".".join(walked)
    where = f"'{prefix}'" if prefix else f"the root {type(root).__name__}"
    children = list(parent._modules.keys())
    shown = ", ".join(children[:20]) + (", ..." if len(children) > 20 else "")
    lines = [
        f"hook point '{path}' not found in {type(root).__name__}: "
        f"{where} has no child '{part}'"
        + (f" (its children: {shown})" if children else " (it has no children)")
    ]
    names = [name for name, _ in root.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
    if close:
        lines.append("did you mean: " + ", ".join(f"'{c}'" for c in close) + "?")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Token layout
# ---------------------------------------------------------------------------------------------


class TokenRows(NamedTuple):
    """Rows of a flattened activation with where each row came from."""

    rows: Tensor
    """``[tokens, d]`` activations, on the input's device and dtype."""
    batch_index: Tensor
    """``[tokens]`` int64 (CPU): which batch element each row belongs to."""
    position: Tensor
    """``[tokens]`` int64 (CPU): token index inside its element (``h * W + w`` for feature maps,
    the sequence position for ``[B, T, d]``, 0 for 2-D input)."""


def to_tokens(t: Tensor, return_index: bool = False) -> Tensor | TokenRows:
    """Flatten an activation into ``[tokens, d]`` rows.

    * 4-D ``[B, C, H, W]`` (conv/UNet feature map): channel-last, row-major, i.e.
      ``t.permute(0, 2, 3, 1).reshape(B * H * W, C)``; token ``h * W + w`` of element ``b`` is
      row ``b * H * W + h * W + w``.
    * 3-D ``[B, T, d]`` (sequence): ``[B * T, d]``.
    * 2-D ``[N, d]``: unchanged (each row its own element, position 0).

    With ``return_index=True`` a :class:`TokenRows` is returned that also gives each row's batch
    index and position, so per-element metadata can be expanded per row.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"to_tokens: expected a tensor, got {type(t).__name__}")
    if t.dim() == 4:
        b, c, h, w = t.shape
        rows = t.permute(0, 2, 3, 1).reshape(b * h * w, c)
        per = h * w
    elif t.dim() == 3:
        b, per, c = t.shape
        rows = t.reshape(b * per, c)
    elif t.dim() == 2:
        b, per = t.shape[0], 1
        rows = t
    else:
        raise ValueError(
            f"to_tokens: expected a 2-D [N, d], 3-D [B, T, d] or 4-D [B, C, H, W] activation, "
            f"got shape {tuple(t.shape)}"
        )
    if not return_index:
        return rows
    batch_index = torch.arange(b, dtype=torch.int64).repeat_interleave(per)
    position = torch.arange(per, dtype=torch.int64).repeat(b)
    return TokenRows(rows, batch_index, position)


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


class Capture:
    """What a :func:`capture` block recorded.

    Attributes:
        path: the hooked module's dotted path.
        module: the hooked module.
        which: ``"output"``, ``"input"`` or ``"diff"``.
        tensors: recorded tensors, one per forward call, in call order (empty when a callback
            ``fn`` was given: the callback received them instead).
        calls: how many times the hook fired.
    """

    def __init__(self, path: str, module: nn.Module, which: str) -> None:
        self.path = path
        self.module = module
        self.which = which
        self.tensors: list[Tensor] = []
        self.calls = 0

    def __repr__(self) -> str:
        return (f"Capture(path={self.path!r}, which={self.which!r}, calls={self.calls}, "
                f"recorded={len(self.tensors)})")


def _first_tensor(value: Any, what: str, path: str) -> Tensor:
    """The activation tensor inside a module's output/input (tuples/lists: the first element)."""
    while isinstance(value, (tuple, list)):
        if len(value) == 0:
            raise ValueError(f"capture: the {what} of '{path}' is an empty {type(value).__name__}")
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"capture: the {what} of '{path}' is a {type(value).__name__}, not a tensor")
    return value


CAPTURE_WHICH = ("output", "input", "diff")
"""What :func:`capture` can record of a block."""


@contextlib.contextmanager
def capture(
    root: nn.Module,
    path: str,
    which: str = "output",
    fn: Callable[[Tensor], Any] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    copy: bool = True,
) -> Iterator[Capture]:
    """Record what the submodule at ``path`` outputs (or receives) while the block runs.

    Args:
        root: the model to search.
        path: dotted submodule path (see :func:`get_submodule`).
        which: ``"output"`` hooks the module's output (a forward hook); ``"input"`` hooks its
            first positional input (a forward pre-hook; falls back to the first tensor keyword
            argument when called with keywords only). Tuple/list values contribute their first
            element, so blocks that return ``(hidden_states,)`` work. ``"diff"`` records the
            block's update, output minus first positional input (SAeUron's ``output_or_diff="diff"``;
            the two must have the same shape).
        fn: optional callback. When given it receives each detached tensor instead of it being
            appended to ``Capture.tensors``; if it raises, the exception propagates out of the
            model's forward (and the hook is still removed).
        device, dtype: where/what to move the recorded tensor to (e.g. ``"cpu"`` and
            ``torch.float16`` to keep GPU memory free).
        copy: record a private copy, so later in-place edits by the model cannot change what was
            recorded. A callback that consumes the tensor immediately can pass ``copy=False``.

    The hook is always removed when the block exits, also when the model raised.
    Recording never modifies the value the model sees.
    """
    if which not in CAPTURE_WHICH:
        raise ValueError(f"capture: which must be one of {CAPTURE_WHICH}, got {which!r}")
    module = get_submodule(root, path)
    record = Capture(path, module, which)

    def take(value: Any, fresh: bool = False) -> None:
        # fresh: the tensor was just computed here (the diff), so it already is a copy
        t = _first_tensor(value, which, path).detach()
        copy_now = copy and not fresh
        if copy_now or device is not None or dtype is not None:
            t = t.to(device=device if device is not None else t.device,
                     dtype=dtype if dtype is not None else t.dtype, copy=copy_now)
        record.calls += 1
        if fn is not None:
            fn(t)
        else:
            record.tensors.append(t)

    if which == "output":
        def output_hook(_module: nn.Module, _args: Any, output: Any) -> None:
            take(output)

        handle = module.register_forward_hook(output_hook)
    elif which == "diff":
        def diff_hook(_module: nn.Module, args: tuple, output: Any) -> None:
            out = _first_tensor(output, "output", path)
            if not args:
                raise ValueError(f"capture(which='diff'): '{path}' was called without a positional input")
            x = _first_tensor(args, "input", path)
            if x.shape != out.shape:
                raise ValueError(f"capture(which='diff'): '{path}' maps {tuple(x.shape)} to {tuple(out.shape)}; "
                                 "its update (output - input) is only defined for equal shapes")
            take(out.detach() - x.detach(), fresh=True)

        handle = module.register_forward_hook(diff_hook)
    else:
        def input_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                take(args)
            else:
                tensors = [v for v in kwargs.values() if isinstance(v, Tensor)]
                if not tensors:
                    raise ValueError(f"capture: '{path}' was called without a tensor input")
                take(tensors[0])

        handle = module.register_forward_pre_hook(input_hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Collector
# ---------------------------------------------------------------------------------------------


class CollectedRows(NamedTuple):
    """Token rows produced by one :meth:`ActivationCollector.collect` call."""

    rows: Tensor
    """``[N, d]`` kept activation rows."""
    meta: dict[str, Tensor]
    """Per-row metadata columns, each ``[N]`` (CPU): ``position`` always, plus every metadata
    field that was given (``step``, ``sigma``, ``timestep``, ``cond``, ``prompt_index``, extras)."""


class _StopForward(Exception):
    """Raised inside a hook to skip the rest of a forward pass once the activation is captured."""


def expand_per_row(name: str, value: Any, batch_size: int, batch_index: Tensor) -> Tensor:
    """Expand one metadata field given per batch element (or as a scalar) to one value per row.

    ``value`` may be a Python scalar, a 0-d tensor, or a sequence/1-D tensor of length
    ``batch_size``. Integers and bools become int64, floats float32.
    """
    t = torch.as_tensor(value).detach().to("cpu")
    if t.is_complex():
        raise TypeError(f"metadata '{name}' must be real-valued, got dtype {t.dtype}")
    t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)
    if t.dim() == 0:
        return t.expand(batch_index.shape[0]).clone()
    if t.dim() != 1 or t.shape[0] != batch_size:
        raise ValueError(
            f"metadata '{name}' must be a scalar or have one value per batch element "
            f"({batch_size}), got shape {tuple(t.shape)}"
        )
    return t[batch_index]


class ActivationCollector:
    """Run a call under :func:`capture` and turn each captured batch into token rows + metadata.

    Typical use, one denoiser call per sampling step::

        with ActivationWriter(folder, d=1280, metadata_columns=(...)) as writer:
            collector = ActivationCollector(unet, "output_blocks.5.1", sink=writer, cond_only=True)
            for step, sigma in enumerate(sigmas):
                collector.collect(lambda: unet(x, t, context), step=step, sigma=sigma,
                                  cond=[0, 0, 1, 1], prompt_index=[0, 1, 0, 1])

    Metadata is given per batch element of the hooked activation (length ``B``) or as a scalar
    that applies to all elements, and is expanded to one value per token row. If the hooked module
    runs more than once during the call, every run must have that same batch size; call
    :meth:`collect` once per differently shaped pass instead.

    Args:
        root, path, which: what to hook (see :func:`capture`).
        sink: where rows go. An object with ``add(rows, **meta)`` (an ``ActivationWriter``) or a
            callable ``sink(rows, meta)``. Without a sink, :meth:`collect` returns the rows.
        device: device for the rows (default CPU, which keeps accelerator memory free).
            ``None`` keeps them where the model produced them.
        dtype: dtype for the rows (default float32; ``None`` keeps the model's dtype).
        cond_only: keep only rows whose ``cond`` metadata is 1 (the conditional CFG branch).
        row_filter: optional ``row_filter(rows, meta) -> bool mask [N]`` applied after the
            built-in filters.
        stop_forward: abort the rest of the forward pass right after the hook has fired once
            (saves compute when only an early layer is needed; the call's return value is lost).
        check_finite: raise a ValueError naming the hook point and step when NaN/inf appear.
    """

    def __init__(
        self,
        root: nn.Module,
        path: str,
        which: str = "output",
        *,
        sink: Any = None,
        device: torch.device | str | None = "cpu",
        dtype: torch.dtype | None = torch.float32,
        cond_only: bool = False,
        row_filter: Callable[[Tensor, Mapping[str, Tensor]], Tensor] | None = None,
        stop_forward: bool = False,
        check_finite: bool = True,
    ) -> None:
        if which not in CAPTURE_WHICH:
            raise ValueError(f"ActivationCollector: which must be one of {CAPTURE_WHICH}, got {which!r}")
        get_submodule(root, path)  # fail early on a wrong path
        self.root = root
        self.path = path
        self.which = which
        self.sink = sink
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.cond_only = cond_only
        self.row_filter = row_filter
        self.stop_forward = stop_forward
        self.check_finite = check_finite
        self.tokens_collected = 0
        """Rows kept (and sent to the sink) over all calls so far."""
        self.calls = 0
        """Number of :meth:`collect` calls so far."""

    def collect(
        self,
        call: Callable[[], Any],
        *,
        step: Any = None,
        sigma: Any = None,
        timestep: Any = None,
        cond: Any = None,
        prompt_index: Any = None,
        positions_mask: Tensor | Sequence[bool] | None = None,
        **extra: Any,
    ) -> CollectedRows | None:
        """Run ``call()`` with the hook installed and process what it captured.

        Args:
            call: a zero-argument callable that runs the model (e.g. one denoiser evaluation).
            step: sampling step index (int).
            sigma / timestep: noise level or model timestep (float).
            cond: 1 for conditional elements, 0 for unconditional.
            prompt_index: index of each element's prompt in the run's prompt list.
            positions_mask: bool ``[P]`` (same for every element) or ``[B, P]`` over the ``P``
                positions per element; rows at False positions are dropped (e.g. BOS and padding
                of a text encoder, built from the attention mask).
            **extra: further numeric per-element metadata columns.

        Returns:
            The kept rows and metadata when the collector has no sink, else ``None``.
        """
        fields: dict[str, Any] = {}
        for name, value in (("step", step), ("sigma", sigma), ("timestep", timestep),
                            ("cond", cond), ("prompt_index", prompt_index), *extra.items()):
            if name == "position":
                raise ValueError("'position' is filled in by the collector; do not pass it")
            if value is not None:
                fields[name] = value
        if self.cond_only and "cond" not in fields:
            raise ValueError("ActivationCollector(cond_only=True) needs the cond metadata (1/0 per element)")

        pieces: list[CollectedRows] = []

        def on_capture(t: Tensor) -> None:
            piece = self._process(t, fields, positions_mask)
            if self.sink is None:
                pieces.append(piece)
                self.tokens_collected += piece.rows.shape[0]
            elif piece.rows.shape[0]:
                self._send(piece)
            if self.stop_forward:
                raise _StopForward

        with capture(self.root, self.path, self.which, fn=on_capture, copy=False) as record:
            try:
                call()
            except _StopForward:
                pass
        self.calls += 1
        if record.calls == 0:
            raise RuntimeError(
                f"ActivationCollector: the hook on '{self.path}' never fired during the call; "
                f"does the call run that module?"
            )
        if self.sink is not None:
            return None
        if len(pieces) == 1:
            return pieces[0]
        return CollectedRows(
            torch.cat([p.rows for p in pieces]),
            {k: torch.cat([p.meta[k] for p in pieces]) for k in pieces[0].meta},
        )

    def _process(self, t: Tensor, fields: Mapping[str, Any],
                 positions_mask: Tensor | Sequence[bool] | None) -> CollectedRows:
        tokens = to_tokens(t, return_index=True)
        batch = t.shape[0]
        per = tokens.rows.shape[0] // batch if batch else 0

        meta = {name: expand_per_row(name, value, batch, tokens.batch_index)
                for name, value in fields.items()}
        meta["position"] = tokens.position

        keep: Tensor | None = None
        if self.cond_only:
            keep = meta["cond"] == 1
        if positions_mask is not None:
            mask = torch.as_tensor(positions_mask, dtype=torch.bool).to("cpu")
            if mask.dim() == 1 and mask.shape[0] == per:
                pos_keep = mask[tokens.position]
            elif mask.dim() == 2 and tuple(mask.shape) == (batch, per):
                pos_keep = mask.reshape(-1)
            else:
                raise ValueError(
                    f"positions_mask must have shape [{per}] or [{batch}, {per}] for the activation "
                    f"of '{self.path}' (shape {tuple(t.shape)}), got {tuple(mask.shape)}"
                )
            keep = pos_keep if keep is None else keep & pos_keep

        rows = tokens.rows
        if self.device is not None or self.dtype is not None:
            rows = rows.to(device=self.device if self.device is not None else rows.device,
                           dtype=self.dtype if self.dtype is not None else rows.dtype)
        if keep is not None:
            rows, meta = self._select(rows, meta, keep)
        if self.row_filter is not None:
            extra_keep = torch.as_tensor(self.row_filter(rows, meta), dtype=torch.bool).to("cpu")
            if extra_keep.shape != (rows.shape[0],):
                raise ValueError(
                    f"row_filter must return a bool mask of shape [{rows.shape[0]}], "
                    f"got {tuple(extra_keep.shape)}"
                )
            rows, meta = self._select(rows, meta, extra_keep)
        if self.check_finite and rows.shape[0] and not bool(torch.isfinite(rows).all()):
            bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().cpu()
            where = ", ".join(f"{k}={meta[k][bad[0]].item()}" for k in meta)
            raise ValueError(
                f"non-finite activations (NaN/inf) captured at '{self.path}': {bad.numel()} of "
                f"{rows.shape[0]} rows, first at {where}"
            )
        # The model may reuse its buffers after the hook returns: keep a private copy.
        if _shares_storage(rows, t):
            rows = rows.clone()
        return CollectedRows(rows, meta)

    @staticmethod
    def _select(rows: Tensor, meta: dict[str, Tensor], keep: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        idx = keep.nonzero().flatten()
        return rows[idx.to(rows.device)], {k: v[idx] for k, v in meta.items()}

    def _send(self, piece: CollectedRows) -> None:
        add = getattr(self.sink, "add", None)
        if callable(add):
            add(piece.rows, **piece.meta)
        else:
            self.sink(piece.rows, piece.meta)
        self.tokens_collected += piece.rows.shape[0]


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    if a.device != b.device:
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:
        return False
