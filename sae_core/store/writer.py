"""Writing an activation store: :class:`ActivationWriter`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..artefacts import is_temp_name, save_tensors, write_bytes
from .format import (
    _SHARD_NAME,
    _SHARD_RE,
    _STAGING_NAME,
    ACTIVATIONS_KEY,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    _dtype_name,
    _read_manifest,
    _resolve_column_dtype,
    _resolve_store_dtype,
)


class ActivationWriter:
    """Stream activation rows into a sharded safetensors store.

    Args:
        folder: the store folder (created if missing).
        d: row width (activation dimension).
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        shard_tokens: rows per shard; also the most rows ever buffered in RAM.
        metadata_columns: names of per-row metadata columns every :meth:`add` must supply, or a
            mapping ``name -> dtype`` (``"int64"``, ``"float32"``, ...). Without a dtype a column
            takes int64 (integers, bools) or float32 (floats) from its first values.
        attrs: JSON-serialisable user attributes stored in the manifest (hook point, model,
            prompt list, ...). May be updated through :attr:`attrs` until :meth:`close`.
        overwrite: replace an existing *complete* store in ``folder``; it stays readable, and is
            replaced only when the new store is complete (:meth:`close`; :meth:`abort` keeps it).
            Leftovers of an unfinished store are always replaced.
        source: a name for error messages (default: ``attrs["hookpoint"]`` or the folder).

    Use as a context manager. On normal exit the last partial shard is written and the manifest
    is marked complete; on an exception the buffer is dropped, temp files are removed and the
    manifest stays ``"complete": false``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        d: int,
        dtype: str | torch.dtype = "float16",
        shard_tokens: int = 65536,
        metadata_columns: Sequence[str] | Mapping[str, str | torch.dtype | None] = (),
        attrs: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        source: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self._write_dir = self.folder
        """Where shards and the running manifest go: the folder itself, or a staging folder inside it while a
        complete store there is being replaced (it stays readable until the new one is complete)."""
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise ValueError(f"ActivationWriter: d must be a positive int, got {d!r}")
        if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or shard_tokens <= 0:
            raise ValueError(f"ActivationWriter: shard_tokens must be a positive int, got {shard_tokens!r}")
        self.d = d
        self.dtype = _resolve_store_dtype(dtype)
        self.shard_tokens = shard_tokens

        if isinstance(metadata_columns, str):
            metadata_columns = (metadata_columns,)
        col_items = (metadata_columns.items() if isinstance(metadata_columns, Mapping)
                     else ((name, None) for name in metadata_columns))
        self._columns: dict[str, torch.dtype | None] = {}
        for name, col_dtype in col_items:
            if not isinstance(name, str) or not name.isidentifier() or name == ACTIVATIONS_KEY:
                raise ValueError(f"ActivationWriter: invalid metadata column name {name!r} "
                                 f"(identifiers only, not '{ACTIVATIONS_KEY}')")
            if name in self._columns:
                raise ValueError(f"ActivationWriter: metadata column '{name}' listed twice")
            self._columns[name] = _resolve_column_dtype(name, col_dtype)

        self.attrs: dict[str, Any] = dict(attrs or {})
        self._check_attrs()
        self.source = source or str(self.attrs.get("hookpoint") or self.folder)

        self.total_tokens = 0
        """Rows accepted so far (written or buffered)."""
        self.buffered_rows = 0
        """Rows currently held in RAM, waiting for the next shard."""
        self.peak_buffered_rows = 0
        """Largest value :attr:`buffered_rows` has reached; never exceeds ``shard_tokens``."""
        self.shards: list[dict[str, Any]] = []
        self._buffer: Tensor | None = None
        self._meta_buffers: dict[str, Tensor] = {}
        self._closed = False
        self._created = time.time()

        self._prepare_folder(overwrite)
        self._write_manifest(complete=False)

    # -- public API ------------------------------------------------------------------------------

    @property
    def columns(self) -> tuple[str, ...]:
        """Metadata column names."""
        return tuple(self._columns)

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, rows: Tensor, **meta: Any) -> None:
        """Append ``rows [N, d]`` with one value per row (or a scalar) for every metadata column.

        Rows are cast to the store dtype and copied into the shard buffer; a shard is written
        whenever the buffer holds ``shard_tokens`` rows.

        Raises:
            ValueError: wrong shape, missing/unknown metadata, NaN/inf rows, or values that do not
                fit the store dtype (e.g. > 65504 for float16).
        """
        if self._closed:
            raise RuntimeError(f"ActivationWriter for {self.folder} is closed")
        rows = torch.as_tensor(rows).detach()
        if rows.dim() != 2 or rows.shape[1] != self.d:
            raise ValueError(
                f"ActivationWriter.add ({self.source}): rows must be [N, {self.d}], got shape {tuple(rows.shape)}"
            )
        if not rows.is_floating_point():
            raise ValueError(f"ActivationWriter.add ({self.source}): rows must be floating point, got {rows.dtype}")
        n = rows.shape[0]
        missing = [c for c in self._columns if c not in meta]
        unknown = [c for c in meta if c not in self._columns]
        if missing or unknown:
            raise ValueError(
                f"ActivationWriter.add ({self.source}): metadata columns must be exactly "
                f"{list(self._columns)}; missing {missing}, unexpected {unknown}"
            )
        if n == 0:
            return
        cols = {name: self._column_values(name, value, n) for name, value in meta.items()}
        self._check_values(rows)

        start = 0
        while start < n:
            if self._buffer is None:
                self._allocate()
            take = min(n - start, self.shard_tokens - self.buffered_rows)
            lo, hi = self.buffered_rows, self.buffered_rows + take
            self._buffer[lo:hi].copy_(rows[start:start + take])
            for name, values in cols.items():
                self._meta_buffers[name][lo:hi].copy_(values[start:start + take])
            self.buffered_rows = hi
            self.total_tokens += take
            self.peak_buffered_rows = max(self.peak_buffered_rows, self.buffered_rows)
            start += take
            if self.buffered_rows == self.shard_tokens:
                self._flush()

    def close(self) -> Path:
        """Write the last partial shard and a complete manifest. Returns the folder. Idempotent."""
        if self._closed:
            return self.folder
        try:
            if self.buffered_rows:
                self._flush()
            self._check_attrs()
            self._write_manifest(complete=True)
            if self._write_dir != self.folder:
                self._swap_in()
        except BaseException:
            self.abort()
            raise
        self._release()
        self._closed = True
        return self.folder

    def abort(self, reason: str | None = None) -> None:
        """Drop buffered rows and leave the store marked incomplete (no temp files remain)."""
        if self._closed:
            return
        self._release()
        self._closed = True
        if self._write_dir != self.folder:  # the store being replaced stays as it was
            shutil.rmtree(self._write_dir, ignore_errors=True)
            return
        self._remove_temp_files()
        with contextlib.suppress(Exception):
            self._write_manifest(complete=False, aborted=reason or "aborted")
        self._remove_temp_files()

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(f"{exc_type.__name__}: {exc}")

    def __repr__(self) -> str:
        return (f"ActivationWriter({str(self.folder)!r}, d={self.d}, dtype={_dtype_name(self.dtype)}, "
                f"tokens={self.total_tokens}, shards={len(self.shards)}, closed={self._closed})")

    # -- internals -------------------------------------------------------------------------------

    def _check_attrs(self) -> None:
        try:
            json.dumps(self.attrs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ActivationWriter: attrs must be JSON-serialisable: {exc}") from exc

    def _prepare_folder(self, overwrite: bool) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"activation store path {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            manifest = _read_manifest(folder)
        except ValueError:
            if not overwrite:
                raise ValueError(
                    f"{folder / MANIFEST_NAME} exists but is not a readable activation store manifest; "
                    f"pass overwrite=True to replace it"
                ) from None
            manifest = None
        if manifest is not None and manifest.get("version") != FORMAT_VERSION and not overwrite:
            raise ValueError(
                f"{folder / MANIFEST_NAME} is an activation store of format version {manifest.get('version')!r}, which "
                f"this code does not read (it writes version {FORMAT_VERSION}); it is kept: pass overwrite=True to "
                "replace it, or choose another folder"
            )
        if manifest is not None and manifest.get("complete") and not overwrite:
            raise FileExistsError(
                f"{folder} already holds a complete activation store ({manifest.get('total_tokens')} tokens); "
                f"pass overwrite=True to replace it"
            )
        staging = folder / _STAGING_NAME
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed while replacing a store
        if manifest is not None and manifest.get("complete"):
            # overwrite: the complete store stays readable until the new one is complete (see _swap_in)
            staging.mkdir()
            self._write_dir = staging
            return
        # Replace the leftovers of an unfinished store: manifest first, so no manifest ever describes
        # shards that are being deleted.
        with contextlib.suppress(FileNotFoundError):
            (folder / MANIFEST_NAME).unlink()
        for entry in folder.iterdir():
            if _SHARD_RE.match(entry.name) or is_temp_name(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def _swap_in(self) -> None:
        """Move the complete new store from the staging folder over the old one (old manifest first, so no
        manifest ever describes a mix of old and new shards), then drop the old store's surplus shards."""
        folder, staging = self.folder, self._write_dir
        with contextlib.suppress(FileNotFoundError):
            (folder / MANIFEST_NAME).unlink()
        new = {entry["file"] for entry in self.shards}
        for name in sorted(new):
            os.replace(staging / name, folder / name)
        for entry in folder.iterdir():
            if _SHARD_RE.match(entry.name) and entry.name not in new:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        os.replace(staging / MANIFEST_NAME, folder / MANIFEST_NAME)
        shutil.rmtree(staging, ignore_errors=True)
        self._write_dir = folder

    def _remove_temp_files(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in self._write_dir.iterdir():
                if is_temp_name(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()

    def _column_values(self, name: str, value: Any, n: int) -> Tensor:
        t = torch.as_tensor(value).detach().to("cpu")
        if t.is_complex():
            raise ValueError(f"ActivationWriter.add ({self.source}): metadata '{name}' must be real-valued")
        if self._columns[name] is None:
            self._columns[name] = torch.float32 if t.is_floating_point() else torch.int64
        elif t.is_floating_point() and not self._columns[name].is_floating_point:
            raise ValueError(
                f"ActivationWriter.add ({self.source}): metadata '{name}' is a {_dtype_name(self._columns[name])} "
                f"column but got floating-point values"
            )
        if t.dim() == 0:
            t = t.expand(n)
        elif t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"ActivationWriter.add ({self.source}): metadata '{name}' must be a scalar or have "
                f"{n} values (one per row), got shape {tuple(t.shape)}"
            )
        return t

    def _check_values(self, rows: Tensor) -> None:
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()
            raise ValueError(
                f"non-finite activations (NaN/inf) from {self.source}: {bad.numel()} of {rows.shape[0]} "
                f"rows in this batch (first at row {int(bad[0])}); refusing to store them in {self.folder}"
            )
        limit = torch.finfo(self.dtype).max
        if limit < torch.finfo(rows.dtype).max:
            peak = float(rows.abs().max())
            if peak > limit:
                raise ValueError(
                    f"activations from {self.source} reach |x| = {peak:.4g}, beyond the {_dtype_name(self.dtype)} "
                    f"range ({limit:.4g}); create the store with dtype='float32'"
                )

    def _allocate(self) -> None:
        # torch.empty does not touch the pages, so an oversized buffer for a small store is cheap.
        self._buffer = torch.empty(self.shard_tokens, self.d, dtype=self.dtype)
        self._meta_buffers = {name: torch.empty(self.shard_tokens, dtype=dtype)
                              for name, dtype in self._columns.items()}

    def _release(self) -> None:
        self._buffer = None
        self._meta_buffers = {}
        self.buffered_rows = 0

    def _flush(self) -> None:
        n = self.buffered_rows
        if n == 0 or self._buffer is None:
            return
        index = len(self.shards)
        name = _SHARD_NAME.format(index)
        tensors = {ACTIVATIONS_KEY: self._buffer[:n]}
        tensors.update({col: buf[:n] for col, buf in self._meta_buffers.items()})
        save_tensors(self._write_dir / name, tensors, {"format": FORMAT, "shard": str(index), "d": str(self.d)})
        self.shards.append({"file": name, "rows": n, "bytes": (self._write_dir / name).stat().st_size})
        self.buffered_rows = 0
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, aborted: str | None = None) -> None:
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "complete": complete,
            "d": self.d,
            "dtype": _dtype_name(self.dtype),
            "total_tokens": sum(s["rows"] for s in self.shards),
            "shard_tokens": self.shard_tokens,
            "columns": {name: (_dtype_name(dt) if dt is not None else None)
                        for name, dt in self._columns.items()},
            "shards": list(self.shards),
            "attrs": self.attrs,
            "created_unix": self._created,
        }
        if aborted is not None:
            manifest["aborted"] = aborted
        write_bytes(self._write_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"))
