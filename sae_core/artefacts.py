"""The one I/O and identity layer of ``sae_core``: atomic writes, tensor files, fingerprints and the
artefact policy (reuse, resume or redo a file a long computation produced).

Every file the library or the nodes write goes through :func:`atomic_write`: the content is written to a
temp file in the destination's folder and moved into place with ``os.replace``, so a reader sees either the
old file or the whole new one, and a crash leaves at most a hidden ``.<name>.*.tmp`` that no listing shows.

Fingerprints identify what an artefact was built from. :func:`tensor_fingerprint` hashes named tensors
(optionally rounded to a dtype, optionally sub-sampled), :func:`file_fingerprint` identifies a file by path,
size and modification time.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file

__all__ = [
    "TEMP_PREFIX",
    "ArtefactError",
    "Action",
    "ArtefactDecision",
    "atomic_write",
    "decide_artefact",
    "file_fingerprint",
    "is_temp_name",
    "load_json",
    "load_tensors",
    "read_metadata",
    "remove_stale_temps",
    "keep_sae_fingerprint",
    "sae_fingerprint",
    "sae_fingerprint_hint",
    "save_json",
    "save_tensors",
    "tensor_fingerprint",
    "write_bytes",
    "write_text",
]

PathLike = Union[str, os.PathLike]

TEMP_PREFIX = "."
"""Temp files are hidden (``.<name>.<pid>.<random>.tmp``) so that file lists (e.g. ComfyUI dropdowns) skip them."""


class ArtefactError(ValueError):
    """A file the pack reads is missing a part, malformed, truncated or holds values it cannot use.

    Every loader raises this (or a subclass) for any problem with a file's content, naming the file.
    """

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def is_temp_name(name: str) -> bool:
    """True for the name of a temp file :func:`atomic_write` makes (and leaves behind only when killed)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(".tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(path: PathLike) -> list[str]:
    """Delete the temp files that killed writes of ``path`` left beside it (their process is gone).

    Returns the removed names. Temp files of live processes (a write in progress) are kept.
    """
    path = Path(path)
    removed = []
    prefix = f"{TEMP_PREFIX}{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_part = name[len(prefix):].split(".", 1)[0]
        if pid_part.isdigit() and not _pid_alive(int(pid_part)):
            try:
                entry.unlink()
                removed.append(name)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temp file in ``path``'s folder, then ``os.replace`` it into place.

    The folder is created if needed. On any error (or interrupt) the temp file is removed and ``path`` is
    left as it was; temp files that killed writes of ``path`` left are removed first. The content is flushed
    to disk before the rename, and the new file gets the usual permissions (``0o666`` minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def save_json(path: PathLike, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON (with a final newline) atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def load_json(path: PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing file or invalid JSON raises an error naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtefactError(path, f"{what} is not valid JSON ({err})") from err


def _metadata_strings(metadata: Optional[Mapping[str, Any]]) -> Optional[dict[str, str]]:
    if metadata is None:
        return None
    return {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, Any]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically.

    Tensors are detached, made contiguous and moved to the CPU; ``dtype`` (if given) casts the floating
    ones. Non-string metadata values are stored as JSON.
    """
    clean = {}
    for key, value in tensors.items():
        t = value.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        clean[key] = t.to("cpu").contiguous()
    meta = _metadata_strings(metadata)
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=meta))


def load_tensors(path: PathLike, device: Union[str, torch.device] = "cpu", what: str = "tensor file") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or unreadable file raises an error naming ``what`` and the path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtefactError(path, f"{what} is not a readable safetensors file, possibly truncated or corrupt ({err})") from err


def read_metadata(path: PathLike, what: str = "tensor file") -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty when it has none)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtefactError(path, f"{what} is not a readable safetensors file, possibly truncated or corrupt ({err})") from err


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def tensor_fingerprint(named: Iterable[tuple[str, torch.Tensor]], *, dtype: Optional[torch.dtype] = torch.float32,
                       shapes: bool = False, max_values: Optional[int] = None, header: str = "",
                       digits: int = 16) -> str:
    """Hex digits of a SHA-256 over named tensors, in the order given.

    Per tensor the hash takes the name, optionally its shape (``shapes``), and its values: floating tensors
    cast to ``dtype`` (``None`` keeps their own; fp16 makes fp16/fp32 copies of one file agree), other
    tensors as they are. ``max_values`` hashes an evenly strided sample of at most about that many values
    (fast for SD-sized weights). ``header`` is hashed first.
    """
    h = hashlib.sha256()
    if header:
        h.update(header.encode())
    for name, tensor in named:
        t = tensor.detach()
        h.update(name.encode())
        if shapes:
            h.update(str(tuple(t.shape)).encode())
        if max_values is not None:
            flat = t.reshape(-1)
            t = flat[:: max(1, flat.numel() // max_values)]
        if dtype is not None and t.is_floating_point():
            t = t.to(device="cpu", dtype=dtype)
        h.update(t.to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:digits]


@torch.no_grad()
def _fingerprint_parts(sae: Any, rows: int = 256) -> tuple[torch.Tensor, ...]:
    """What :func:`sae_fingerprint` hashes: both biases and ``rows`` evenly spaced encoder/decoder rows."""
    n = sae.W_dec.shape[0]
    pick = torch.arange(0, n, max(1, n // max(1, rows)), device=sae.W_dec.device)[:rows]
    return sae.b_dec, sae.encoder.bias, sae.encoder.weight[pick], sae.W_dec[pick]


def _weight_state(sae: Any) -> tuple:
    """A cheap check that the fingerprinted weights are still the ones a kept fingerprint was given for: their
    dtype, shape and float64 sums (any change to them moves a sum)."""
    parts = _fingerprint_parts(sae)
    return (str(sae.W_dec.dtype), tuple(sae.W_dec.shape), int(sae.cfg.k),
            *(float(t.detach().double().sum()) for t in parts))


def keep_sae_fingerprint(sae: Any, fingerprint: str) -> None:
    """Let ``sae`` answer :func:`sae_fingerprint` with ``fingerprint`` (that of the copy it was cast from) while its
    weights stay as they are: a loader that narrows a file's weights to bfloat16 keeps the file's identity, so files
    built with the float32 copy still match. Any later in-place change or replaced tensor drops it."""
    sae._kept_fingerprint = (fingerprint, _weight_state(sae))


def sae_fingerprint(sae: Any, rows: int = 256) -> str:
    """The identity of an SAE's weights that files built with it record (concept statistics, ItD concepts).

    Hashes the shape, ``k``, both biases and ``rows`` evenly spaced encoder/decoder rows, rounded to
    float16, so the fp32 and fp16 copies of one file agree. Fast for any width. A bfloat16 copy rounds
    differently; one made by :func:`sae_core.formats.load_sae` answers with its file's fingerprint
    (:func:`keep_sae_fingerprint`).
    """
    kept = getattr(sae, "_kept_fingerprint", None)
    if kept is not None and rows == 256 and kept[1] == _weight_state(sae):
        return kept[0]
    n, d = sae.W_dec.shape
    parts = _fingerprint_parts(sae, rows)
    return tensor_fingerprint((("", t) for t in parts), dtype=torch.float16, header=f"{n}x{d}:k={int(sae.cfg.k)}")


def sae_fingerprint_hint(sae: Any) -> str:
    """What to add to a refusal of ``sae`` for a fingerprint that differs: a bfloat16 copy of an SAE rounds its
    weights away from the fp32/fp16 copies that :func:`sae_fingerprint` makes agree (e.g. Load SAE's dtype
    bfloat16 with a file built by the float32 SAE), so the refusal says how to load it; else ``""``."""
    if getattr(getattr(sae, "W_dec", None), "dtype", None) != torch.bfloat16:
        return ""
    return (" (this SAE is held in bfloat16, which rounds its weights differently from a float32 or float16 copy "
            "of the same file: load it as float32 or float16, or load its file as bfloat16 with Load SAE, which keeps "
            "the file's identity, or build the file with this bfloat16 copy)")


def file_fingerprint(path: PathLike, companions: Iterable[PathLike] = ()) -> str:
    """Cheap identity of a file's content: path, size and modification time (ns).

    ``companions`` are files that change the meaning of ``path`` (e.g. the ``cfg.json`` beside a folder
    SAE); each counts when it exists. A missing ``path`` gives a fingerprint that says so, so a file that
    appears later counts as changed.
    """
    parts = []
    for i, p in enumerate((path, *companions)):
        p = os.fspath(p)
        try:
            st = os.stat(p)
        except OSError:
            if i == 0:
                parts.append(f"{p}:missing")
            continue
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


# ---------------------------------------------------------------------------------------------
# the artefact policy
# ---------------------------------------------------------------------------------------------


class Action(str, enum.Enum):
    """What to do with the artefact a long computation would produce."""

    CREATE = "create"
    """Nothing is there: compute it."""
    REUSE = "reuse"
    """A complete artefact built from the same inputs is there: use it as it is."""
    RESUME = "resume"
    """An unfinished run from the same inputs left a checkpoint: continue from it."""
    REDO = "redo"
    """``overwrite`` is on: compute again; the old file is replaced only once the new one is complete."""


@dataclass(frozen=True)
class ArtefactDecision:
    """The decision for one artefact and the sentence a node shows the user about it."""

    action: Action
    message: str


def _describe_difference(wanted: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    keys = sorted(set(wanted) | set(found), key=str)
    diff = [f"{k}: {found.get(k, '(unset)')!r} there, {wanted.get(k, '(unset)')!r} now"
            for k in keys if wanted.get(k) != found.get(k)]
    return "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")


OVERWRITE_REMEDY = "turn on overwrite to replace it, or choose another name"
"""What a refusal advises by default: the caller's ``overwrite`` switch, or another name."""


def decide_artefact(what: str, path: PathLike, wanted: Mapping[str, Any], found: Optional[Mapping[str, Any]],
                    *, complete: bool = True, overwrite: bool = False, resumable: bool = False,
                    remedy: str = OVERWRITE_REMEDY) -> ArtefactDecision:
    """The one rule for reusing, resuming or redoing an artefact, with the message to show.

    Args:
        what: what the artefact is, for messages ("Fisher estimate", "SAE checkpoint", ...).
        path: where it lives.
        wanted: the identity of the artefact the current inputs would produce (settings, fingerprints).
        found: the identity recorded in the file that is there, or ``None`` when nothing is there.
        complete: whether the file there is finished (``False``: a checkpoint of an unfinished run).
        overwrite: the user's explicit permission to replace what is there.
        resumable: whether an unfinished run with the same identity can continue.
        remedy: what the refusal advises (callers without an ``overwrite`` switch say what else to do).

    Returns:
        :class:`ArtefactDecision`. Raises ``FileExistsError`` when a file built from other inputs is there
        and ``overwrite`` is off: nothing a user made is replaced without their say.
    """
    if found is None:
        return ArtefactDecision(Action.CREATE, f"{what}: computing {path}")
    if overwrite:
        return ArtefactDecision(Action.REDO, f"{what}: overwrite is on, recomputing {path} (the old file stays until "
                                             "the new one is complete)")
    same = dict(wanted) == dict(found)
    if not same:
        raise FileExistsError(f"{what} {path} exists but was built from other inputs ({_describe_difference(wanted, found)}); "
                              f"{remedy}")
    if complete:
        return ArtefactDecision(Action.REUSE, f"{what}: reusing {path} (same inputs)")
    if resumable:
        return ArtefactDecision(Action.RESUME, f"{what}: resuming the unfinished run in {path}")
    return ArtefactDecision(Action.REDO, f"{what}: {path} is unfinished and cannot resume, computing it again")
