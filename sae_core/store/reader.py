"""Reading an activation store: :class:`ActivationReader`."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from .format import (
    _SHARD_RE,
    _ST_CODES,
    ACTIVATIONS_KEY,
    FORMAT_VERSION,
    MANIFEST_NAME,
    IncompleteStoreError,
    StoreFormatError,
    _count,
    _dtype_name,
    _read_manifest,
    _resolve_column_dtype,
    _resolve_store_dtype,
)


class ActivationBatch(NamedTuple):
    """A batch with metadata, yielded when ``columns`` are requested."""

    activations: Tensor
    """``[batch, d]`` rows."""
    meta: dict[str, Tensor]
    """``[batch]`` values per requested metadata column."""


class ActivationReader:
    """Read a store written by :class:`ActivationWriter`.

    Opening validates the manifest against every shard header (presence, file size, shapes,
    dtypes, columns) without loading data; problems raise ``FileNotFoundError`` or
    ``ValueError`` naming the shard. An unfinished store raises :class:`IncompleteStoreError`.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"activation store folder {self.folder} does not exist")
        manifest = _read_manifest(self.folder)
        if manifest is None:
            leftovers = [p.name for p in self.folder.iterdir() if _SHARD_RE.match(p.name)]
            if leftovers:
                raise IncompleteStoreError(
                    f"{self.folder} has {len(leftovers)} shard file(s) but no {MANIFEST_NAME}: "
                    f"an unfinished activation store; collect it again"
                )
            raise FileNotFoundError(f"{self.folder} is not an activation store (no {MANIFEST_NAME})")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.folder / MANIFEST_NAME}: store format version {manifest.get('version')!r} is not "
                f"supported (this code reads version {FORMAT_VERSION})"
            )
        if not manifest.get("complete"):
            why = f" ({manifest['aborted']})" if manifest.get("aborted") else ""
            raise IncompleteStoreError(
                f"{self.folder} is an incomplete activation store{why}: its writer never closed "
                f"({manifest.get('total_tokens', 0)} tokens in {len(manifest.get('shards', []))} finished shards); "
                f"collect it again"
            )
        self.manifest = manifest
        where = self.folder / MANIFEST_NAME
        try:
            self.d: int = _count(manifest["d"], "d", minimum=1)
            self.dtype: torch.dtype = _resolve_store_dtype(manifest["dtype"])
            self.columns: dict[str, torch.dtype] = {}
            for name, dt in dict(manifest.get("columns", {})).items():
                self.columns[name] = _resolve_column_dtype(name, dt) if dt is not None else torch.int64
            self.attrs: dict[str, Any] = dict(manifest.get("attrs", {}))
            self.shards: list[dict[str, Any]] = [dict(s) for s in manifest["shards"]]
            self.shard_rows: list[int] = [_count(s["rows"], "rows") for s in self.shards]
            for entry in self.shards:  # a shard is a plain file name of this store, never a path elsewhere
                if not isinstance(entry["file"], str) or not _SHARD_RE.match(entry["file"]):
                    raise ValueError(f"shard file {entry['file']!r} is not a shard name of this store")
            _count(manifest["total_tokens"], "total_tokens")
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise StoreFormatError(where, f"malformed activation store manifest: {what}") from exc
        self._len = sum(self.shard_rows)
        if self._len != int(manifest["total_tokens"]):
            raise ValueError(
                f"{self.folder / MANIFEST_NAME}: shards hold {self._len} rows but total_tokens is "
                f"{manifest['total_tokens']}"
            )
        for i in range(len(self.shards)):
            self._validate_shard(i)

    def __len__(self) -> int:
        """Number of token rows in the store."""
        return self._len

    @property
    def fingerprint(self) -> str:
        """Identity of this store's content: a hash of its manifest (creation time, attributes such as the
        prompts, shard sizes and row counts). A store collected again, even with the same row count, differs."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"ActivationReader({str(self.folder)!r}, tokens={self._len}, d={self.d}, "
                f"dtype={_dtype_name(self.dtype)}, shards={len(self.shards)})")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_path(self, i: int) -> Path:
        return self.folder / self.shards[i]["file"]

    def _validate_shard(self, i: int) -> None:
        entry = self.shards[i]
        path = self.shard_path(i)
        if not path.is_file():
            raise FileNotFoundError(f"activation store {self.folder}: shard {entry['file']} listed in "
                                    f"{MANIFEST_NAME} is missing")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise StoreFormatError(path, f"activation store shard is truncated or altered ({size} bytes on disk, "
                                         f"{MANIFEST_NAME} records {entry['bytes']})")
        rows = int(entry["rows"])
        expected = {ACTIVATIONS_KEY: ([rows, self.d], _ST_CODES[self.dtype])}
        expected.update({name: ([rows], _ST_CODES[dt]) for name, dt in self.columns.items()})
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for key, (shape, code) in expected.items():
                    if key not in keys:
                        raise ValueError(f"tensor '{key}' is missing")
                    sl = f.get_slice(key)
                    if list(sl.get_shape()) != shape or sl.get_dtype() != code:
                        raise ValueError(f"tensor '{key}' is {sl.get_dtype()} {list(sl.get_shape())}, "
                                         f"expected {code} {shape}")
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise StoreFormatError(path, f"activation store shard is invalid: {exc}") from exc

    def _check_columns(self, columns: Sequence[str]) -> tuple[str, ...]:
        if isinstance(columns, str):
            columns = (columns,)
        unknown = [c for c in columns if c not in self.columns]
        if unknown:
            raise ValueError(f"activation store {self.folder} has no column(s) {unknown}; "
                             f"it has {list(self.columns)}")
        return tuple(columns)

    def _load(self, shard_indices: Sequence[int], columns: Sequence[str]) -> dict[str, Tensor]:
        """Read shards into one set of tensors; peak RAM is the result plus one shard."""
        shard_indices = list(shard_indices)
        keys = (ACTIVATIONS_KEY, *columns)
        if len(shard_indices) == 1:
            return self._read_shard(shard_indices[0], keys)
        total = sum(self.shard_rows[i] for i in shard_indices)
        out = {ACTIVATIONS_KEY: torch.empty(total, self.d, dtype=self.dtype)}
        out.update({c: torch.empty(total, dtype=self.columns[c]) for c in columns})
        start = 0
        for i in shard_indices:
            n = self.shard_rows[i]
            for key, value in self._read_shard(i, keys).items():
                out[key][start:start + n].copy_(value)
            start += n
        return out

    def _read_shard(self, i: int, keys: Sequence[str]) -> dict[str, Tensor]:
        path = self.shard_path(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in keys}
        except Exception as exc:
            raise StoreFormatError(path, f"cannot read activation store shard: {exc}") from exc

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per epoch for :meth:`iter_batches`."""
        return self._len // batch_size if drop_last else math.ceil(self._len / batch_size)

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = torch.float32,
        columns: Sequence[str] = (),
        *,
        shuffle_shards: int = 3,
        start_batch: int = 0,
    ) -> Iterator[Tensor | ActivationBatch]:
        """Yield one epoch of ``[batch_size, d]`` batches.

        Args:
            batch_size: rows per batch; every batch has exactly this size except a final partial
                one, which is yielded only when ``drop_last`` is False.
            shuffle: permute shards and rows. The order depends only on ``(seed, epoch)``.
            seed, epoch: shuffling seed; use a new epoch number for a new order.
            drop_last: drop the final partial batch.
            device, dtype: where/what the batches are (``dtype=None`` keeps the store dtype).
            columns: metadata columns to return alongside; when non-empty the iterator yields
                :class:`ActivationBatch` instead of plain tensors.
            shuffle_shards: shards loaded and mixed at a time (RAM ~ this many shards + a batch).
            start_batch: skip this many batches of the epoch's order (for resuming a trainer);
                shards that lie entirely before the start are not read.
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"iter_batches: batch_size must be a positive int, got {batch_size!r}")
        if shuffle_shards < 1:
            raise ValueError(f"iter_batches: shuffle_shards must be >= 1, got {shuffle_shards}")
        if start_batch < 0:
            raise ValueError(f"iter_batches: start_batch must be >= 0, got {start_batch}")
        columns = self._check_columns(columns)
        n_shards = len(self.shards)
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(n_shards).tolist()
            windows = [order[i:i + shuffle_shards] for i in range(0, n_shards, shuffle_shards)]
        else:
            windows = [[i] for i in range(n_shards)]

        skip = start_batch * batch_size
        carry: dict[str, Tensor] | None = None
        carry_rows = 0
        for w, window in enumerate(windows):
            rows_in_window = sum(self.shard_rows[i] for i in window)
            if skip >= rows_in_window:
                skip -= rows_in_window
                continue
            data = self._load(window, columns)
            if shuffle:
                perm = torch.from_numpy(np.random.default_rng([seed, epoch, w]).permutation(rows_in_window))
            else:
                perm = torch.arange(rows_in_window)
            pos, skip = skip, 0
            while pos < rows_in_window:
                need = batch_size - carry_rows
                idx = perm[pos:pos + need]
                pos += idx.shape[0]
                piece = {k: v[idx] for k, v in data.items()}
                if carry is not None:
                    piece = {k: torch.cat([carry[k], piece[k]]) for k in piece}
                n = piece[ACTIVATIONS_KEY].shape[0]
                if n == batch_size:
                    carry, carry_rows = None, 0
                    yield self._finish(piece, columns, device, dtype)
                else:
                    carry, carry_rows = piece, n
            del data
        if carry is not None and not drop_last:
            yield self._finish(carry, columns, device, dtype)

    def _finish(self, piece: dict[str, Tensor], columns: Sequence[str], device: torch.device | str | None,
                dtype: torch.dtype | None) -> Tensor | ActivationBatch:
        acts = piece[ACTIVATIONS_KEY]
        if device is not None or dtype is not None:
            acts = acts.to(device=device if device is not None else acts.device,
                           dtype=dtype if dtype is not None else acts.dtype)
        if not columns:
            return acts
        meta = {c: (piece[c].to(device) if device is not None else piece[c]) for c in columns}
        return ActivationBatch(acts, meta)

    def iter_epochs(
        self,
        batch_size: int,
        *,
        start_epoch: int = 0,
        num_epochs: int | None = None,
        start_batch: int = 0,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Tensor | ActivationBatch]]:
        """Yield ``(epoch, batch)`` over successive epochs, forever when ``num_epochs`` is None.

        Each epoch is :meth:`iter_batches` with its own ``epoch`` number (a fresh order);
        ``start_batch`` applies to the first epoch only. Other keyword arguments go to
        :meth:`iter_batches`.
        """
        if self._len == 0:
            raise ValueError(f"activation store {self.folder} is empty; nothing to iterate")
        if "epoch" in kwargs:
            raise TypeError("iter_epochs: use start_epoch instead of epoch")
        epoch = start_epoch
        while num_epochs is None or epoch < start_epoch + num_epochs:
            for batch in self.iter_batches(batch_size, epoch=epoch,
                                           start_batch=start_batch if epoch == start_epoch else 0, **kwargs):
                yield epoch, batch
            epoch += 1

    def read_all(
        self,
        columns: Sequence[str] = (),
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        max_bytes: int | None = 4 << 30,
    ) -> Tensor | ActivationBatch:
        """Load the whole store in order (for small stores).

        Refuses when the result would exceed ``max_bytes`` (default 4 GiB; ``None`` disables
        the check). Returns a tensor, or an :class:`ActivationBatch` when ``columns`` are given.
        """
        columns = self._check_columns(columns)
        out_dtype = dtype if dtype is not None else self.dtype
        size = self._len * self.d * torch.empty(0, dtype=out_dtype).element_size()
        if max_bytes is not None and size > max_bytes:
            raise MemoryError(
                f"read_all: activation store {self.folder} needs {size / 2**30:.2f} GiB as {_dtype_name(out_dtype)} "
                f"(limit {max_bytes / 2**30:.2f} GiB); stream it with iter_batches instead"
            )
        if not self.shards:
            empty = {ACTIVATIONS_KEY: torch.empty(0, self.d, dtype=self.dtype),
                     **{c: torch.empty(0, dtype=self.columns[c]) for c in columns}}
            return self._finish(empty, columns, device, dtype)
        return self._finish(self._load(range(len(self.shards)), columns), columns, device, dtype)
