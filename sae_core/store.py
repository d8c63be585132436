"""A sharded on-disk store of activation rows for SAE training.

Layout of a store folder::

    manifest.json                 format, d, dtype, total tokens, shards, columns, attrs, complete
    shard-00000.safetensors       "activations" [n, d] + one [n] tensor per metadata column
    shard-00001.safetensors
    ...

:class:`ActivationWriter` buffers rows in RAM up to ``shard_tokens`` rows, writes each full shard
atomically (temp file + ``os.replace``) and keeps ``manifest.json`` up to date with
``"complete": false`` while it runs; only :meth:`ActivationWriter.close` marks the store
complete. A crashed or aborted run therefore leaves a folder that any reader recognises as
unfinished.

:class:`ActivationReader` validates the manifest against the shards and streams fixed-size
batches, shuffled across shards with bounded memory: the shard order is permuted per epoch,
``shuffle_shards`` shards at a time are loaded, and rows are permuted within that window.
Every row is yielded exactly once per epoch, and the order is a pure function of
``(seed, epoch)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from .artefacts import ArtefactError, is_temp_name, save_tensors, write_bytes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "StoreFormatError",
    "ActivationBatch",
    "ActivationReader",
    "ActivationWriter",
    "IncompleteStoreError",
]

FORMAT = "sae_core.activation_store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ACTIVATIONS_KEY = "activations"
_SHARD_NAME = "shard-{:05d}.safetensors"
_SHARD_RE = re.compile(r"^shard-\d{5,}\.safetensors$")
_STAGING_NAME = ".replacing"
"""Staging folder of a run that replaces a complete store (hidden; readers never look inside)."""

_STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_COLUMN_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                  "uint8": torch.uint8, "bool": torch.bool, "float32": torch.float32,
                  "float64": torch.float64, "float16": torch.float16}
# safetensors header dtype codes.
_ST_CODES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.uint8: "U8", torch.bool: "BOOL"}


class StoreFormatError(ArtefactError):
    """An activation store's manifest or shard is malformed (names the file)."""


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class IncompleteStoreError(ValueError):
    """The folder holds an activation store whose writer never finished (crash, abort, or still running)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolve_store_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        name = _dtype_name(dtype)
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _STORE_DTYPES:
        raise ValueError(f"activation store dtype must be one of {sorted(_STORE_DTYPES)}, got {dtype!r}")
    return _STORE_DTYPES[name]


def _resolve_column_dtype(name: str, dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    key = _dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype).removeprefix("torch.")
    if key not in _COLUMN_DTYPES:
        raise ValueError(f"metadata column '{name}': dtype must be one of {sorted(_COLUMN_DTYPES)}, got {dtype!r}")
    return _COLUMN_DTYPES[key]


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreFormatError(path, f"activation store manifest is unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreFormatError(path, f"not an activation store manifest (expected format '{FORMAT}')")
    return manifest


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


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
