"""Converter of a pickled Fisher (the published SD v1.4 one) to our Fisher files.

:func:`convert_fisher_pickle` turns a pickled ``{name: tensor}`` Fisher into our safetensors
format (:func:`sae_core.amnesia.fisher.save_fisher`), keeping only the LoRA targets. It never
unpickles without restriction:

* a ``torch.save`` file is read with ``torch.load(weights_only=True)``;
* a plain ``pickle.dump`` file (how the reference's ``combine_fisher_dict.py`` writes the
  published SD v1.4 Fisher) pickles each tensor as a call to ``torch.storage._load_from_bytes``,
  which would run ``torch.load(weights_only=False)`` on the embedded bytes, so weights-only
  loading refuses the file. :func:`load_plain_tensor_pickle` reads it with an allow-list
  unpickler instead: dicts, ``OrderedDict``, the tensor rebuild function and storages, each
  storage's bytes read with ``torch.load(weights_only=True)``. Any other global is refused.

Command line: ``python -m sae_core.amnesia.convert SRC DST --targets xattn``.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional, Union

import torch

from .ewc import fisher_key
from .fisher import save_fisher
from .lora import TARGET_PRESETS, UNET_PREFIX, preset_matches

__all__ = ["convert_fisher_pickle", "load_plain_tensor_pickle", "main"]

PathLike = Union[str, os.PathLike]


def _storage_from_bytes(data: bytes) -> object:
    """A storage pickled by ``torch.save`` inside a plain pickle, read weights-only."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"storage payload must be bytes, got {type(data).__name__}")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (text codecs only)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode(encoding, errors)


_PLAIN_PICKLE_GLOBALS: dict[tuple[str, str], Callable[..., object]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("_codecs", "encode"): _encode,
}


def _refuse_build(unpickler: pickle._Unpickler) -> None:
    raise pickle.UnpicklingError("the BUILD opcode (setting an object's state) is not allowed in a tensor pickle: "
                                 "it could change the attributes of an allowed function for the whole process")


class _TensorDictUnpickler(pickle._Unpickler):
    """Resolves only the globals a pickled ``{name: tensor}`` dict needs; anything else is refused.

    The pure-Python unpickler, so that its opcode table can drop BUILD: a tensor dict never needs it, and
    BUILD on an allowed global (a function) would set that function's attributes process-wide.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _refuse_build

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        try:
            return _PLAIN_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a tensor pickle") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed in a plain tensor pickle")


def load_plain_tensor_pickle(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a ``{name: tensor}`` dict written with plain ``pickle.dump``, without running code.

    Only dicts, ``OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and storages are
    accepted; every storage's embedded ``torch.save`` bytes are read with
    ``torch.load(weights_only=True)``. Raises ``ValueError`` for anything else.
    """
    src = os.fspath(path)
    try:
        with open(src, "rb") as f:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                obj = _TensorDictUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{src}: not a plain pickle of tensors ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{src}: expected a dict of name -> tensor, got {type(obj).__name__}")
    return dict(obj)


_REFUSAL_ADVICE = (
    "This converter never falls back to unrestricted unpickling, which can run arbitrary code. "
    "Re-save the dict with torch.save() in an isolated environment if you trust its source, "
    "or compute the Fisher for your model with compute_fisher()."
)


def _raw_pickle_protocol(path: str) -> Optional[int]:
    """Protocol of a file that starts like a plain ``pickle.dump`` (not a torch.save zip)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80:
        return head[1]
    return None


def _selected_keys(fisher: Mapping[str, torch.Tensor], targets: Union[str, Iterable[str]], prefix: str, src: str) -> list[str]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"unknown target preset {targets!r}; expected one of {', '.join(TARGET_PRESETS)} or module names")
        keys = []
        for key, v in fisher.items():
            if not (key.startswith(prefix) and key.endswith(".weight")):
                continue
            kind = {2: "linear", 4: "conv2d"}.get(v.dim())
            if kind and preset_matches(targets, key[len(prefix):-len(".weight")], kind):
                keys.append(key)
        if not keys:
            raise ValueError(f"{src}: target preset {targets!r} selects no weight (keys look like {sorted(fisher)[:3]})")
        return keys
    keys = [fisher_key(n, prefix) for n in targets]
    if not keys:
        raise ValueError("convert_fisher_pickle: the list of target module names is empty")
    missing = [k for k in keys if k not in fisher]
    if missing:
        raise ValueError(f"{src}: no Fisher entry for {len(missing)} target(s), e.g. {missing[:3]}")
    return keys


def convert_fisher_pickle(
    src: PathLike,
    dst: PathLike,
    targets: Union[str, Iterable[str]] = "xattn",
    *,
    prefix: str = UNET_PREFIX,
    metadata: Optional[Mapping[str, object]] = None,
) -> dict[str, tuple[int, ...]]:
    """Convert a pickled ``{name: tensor}`` Fisher (e.g. the SD v1.4 one) to our safetensors format.

    A ``torch.save`` file is read with ``torch.load(weights_only=True, map_location="cpu")``; a
    plain ``pickle.dump`` file (the published SD v1.4 Fisher) with :func:`load_plain_tensor_pickle`.
    Nothing else is tried; if both fail, a ValueError explains why and nothing is written.
    Keys ``model.diffusion_model.*`` are renamed ``diffusion_model.*``; a file whose keys have
    no ``diffusion_model.`` prefix is taken to be UNet-relative. Only the weights of
    ``targets`` (a preset, matched by name and by tensor rank: 2-D Linear, 4-D Conv2d, or a
    list of module names) are kept, as fp32.

    Returns:
        ``{kept key: shape}``.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    if not os.path.isfile(src_s):
        raise FileNotFoundError(f"Fisher pickle not found: {src_s}")
    is_zip = zipfile.is_zipfile(src_s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protocol notices; failures raise below
            obj = torch.load(src_s, weights_only=True, map_location="cpu", mmap=is_zip)
    except Exception as exc:  # noqa: BLE001 - any failure means "not safely loadable this way"
        reason = str(exc).strip().splitlines()
        reason_s = next((ln for ln in reversed(reason) if "WeightsUnpickler error" in ln or "Unsupported" in ln), reason[0] if reason else type(exc).__name__)
        proto = None if is_zip else _raw_pickle_protocol(src_s)
        if proto is None:
            raise ValueError(
                f"{src_s}: cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: {reason_s}). " + _REFUSAL_ADVICE
            ) from exc
        try:
            obj = load_plain_tensor_pickle(src_s)
        except ValueError as exc2:
            raise ValueError(
                f"{src_s}: cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: {reason_s}), "
                f"nor as a plain pickle.dump() file of tensors (protocol {proto}): {exc2}. " + _REFUSAL_ADVICE
            ) from exc2
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{src_s}: expected a non-empty dict of name -> tensor, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{src_s}: expected a dict of name -> tensor; offending entries: {bad[:3]}")

    fisher: dict[str, torch.Tensor] = {}
    has_prefix = any(k.startswith(prefix) or k.startswith("model." + prefix) for k in obj)
    for k, v in obj.items():
        if k.startswith("model." + prefix):
            k = k[len("model."):]
        elif not has_prefix:
            k = prefix + k
        fisher[k] = v
    keys = _selected_keys(fisher, targets, prefix, src_s)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        v = fisher[key].to(torch.float32)
        if not torch.isfinite(v).all():
            raise ValueError(f"{src_s}: Fisher entry {key} has non-finite values")
        if (v < 0).any():
            raise ValueError(f"{src_s}: Fisher entry {key} has negative values (a Fisher diagonal is >= 0); is this a Fisher file?")
        out[key] = v
    meta: dict[str, object] = {
        "source": os.path.basename(src_s),
        "origin": "converted",
        "targets": json.dumps(keys),
        "target_spec": targets if isinstance(targets, str) else json.dumps(list(targets)),
    }
    meta.update(metadata or {})
    save_fisher(dst_s, out, meta)
    return {k: tuple(v.shape) for k, v in out.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sae_core.amnesia.convert SRC DST --targets xattn``."""
    parser = argparse.ArgumentParser(prog="python -m sae_core.amnesia.convert",
                                     description="Convert a pickled {name: tensor} Fisher (torch.save or plain pickle, e.g. "
                                                 "the published SD v1.4 one) to a Selective Amnesia Fisher file (safetensors).")
    parser.add_argument("src", help="source .pkl/.pt file (never unpickled without restriction)")
    parser.add_argument("dst", help="destination .safetensors file")
    parser.add_argument("--targets", default="xattn",
                        help=f"a preset ({', '.join(TARGET_PRESETS)}) or comma-separated module names (default: xattn)")
    args = parser.parse_args(argv)

    targets: Union[str, list[str]] = args.targets
    if args.targets not in TARGET_PRESETS:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if os.path.isdir(args.dst) or args.dst.endswith(("/", os.sep)):
        print(f"error: {args.dst} is a folder; give the destination file, e.g. {os.path.join(args.dst, 'fisher.safetensors')}",
              file=sys.stderr)
        return 2
    try:
        kept = convert_fisher_pickle(args.src, args.dst, targets)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(math.prod(s) for s in kept.values())
    print(f"wrote {args.dst}: {len(kept)} tensors, {n:,} values ({n * 4 / 2**20:.1f} MiB fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
