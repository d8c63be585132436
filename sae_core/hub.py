"""Downloading published SAEs from the Hugging Face Hub.

SAeUron (and EleutherAI-style trainers) publish one folder per hook point in a model repo::

    <repo_id>/
        unet.up_blocks.1.attentions.1/cfg.json
        unet.up_blocks.1.attentions.1/sae.safetensors
        unet.up_blocks.1.attentions.2/...
        coco/unet.up_blocks.1.attentions.1/...

:func:`download_sae` fetches exactly one such folder with
``huggingface_hub.snapshot_download(repo_id, allow_patterns=[f"{hookpoint}/*"], local_dir=...)``
into ``<dest_root>/<owner>__<name>/<hookpoint>/`` and checks that it is a readable SAE folder.
Only ``cfg.json`` and ``.safetensors`` files are ever read; nothing is unpickled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artefacts import ArtefactError, load_json, save_json
from .formats import CFG_NAME, WEIGHTS_NAME, detect_layout, load_sae

__all__ = ["HubDownload", "check_hookpoint", "check_repo_id", "download_sae", "local_folder_name"]

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class HubDownload:
    """Where :func:`download_sae` put an SAE and whether it had to download it.

    Attributes:
        folder: the hook-point folder holding ``cfg.json`` and ``sae.safetensors``.
        repo_id, hookpoint, revision: what was asked for.
        downloaded: False when a complete copy was already there and was reused.
    """

    def __init__(self, folder: Path, repo_id: str, hookpoint: str, revision: str | None, downloaded: bool) -> None:
        self.folder = folder
        self.repo_id = repo_id
        self.hookpoint = hookpoint
        self.revision = revision
        self.downloaded = downloaded

    def __repr__(self) -> str:
        return (f"HubDownload(folder={str(self.folder)!r}, repo_id={self.repo_id!r}, hookpoint={self.hookpoint!r}, "
                f"revision={self.revision!r}, downloaded={self.downloaded})")


def check_repo_id(repo_id: str) -> str:
    """``owner/name`` with the characters the Hub allows; ValueError naming the input otherwise."""
    repo_id = (repo_id or "").strip()
    if not _REPO_RE.match(repo_id) or ".." in repo_id:
        raise ValueError(f"repo_id: {repo_id!r} is not a Hugging Face repo id of the form 'owner/name'")
    return repo_id


def check_hookpoint(hookpoint: str) -> str:
    """A relative folder path inside the repo (``unet.up_blocks.1.attentions.1``,
    ``coco/unet.up_blocks.1.attentions.1``); no ``..``, no absolute paths, no wildcards."""
    text = (hookpoint or "").strip().replace("\\", "/").rstrip("/")
    parts = text.split("/") if text else []
    if not parts or text.startswith("/") or any(p in (".", "..") or not _PART_RE.match(p) for p in parts):
        raise ValueError(f"hookpoint: {hookpoint!r} is not a folder path inside the repo "
                         "(e.g. 'unet.up_blocks.1.attentions.1'; letters, digits, _ . - and / only)")
    return "/".join(parts)


def local_folder_name(repo_id: str) -> str:
    """The folder a repo is downloaded into: ``owner/name`` -> ``owner__name``."""
    return check_repo_id(repo_id).replace("/", "__")


SOURCE_NAME = ".download.json"
"""Written beside a downloaded SAE: the repo, hook point and revision its files came from."""


def _complete(folder: Path) -> bool:
    return (folder / CFG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def _reusable(folder: Path, repo_id: str, hookpoint: str, revision: str | None,
              verify: Callable[[Path], Any]) -> bool:
    """A complete copy that came from the asked revision and loads; a copy without a record counts only
    when no revision was asked for (copies made before records were kept)."""
    if not _complete(folder):
        return False
    try:
        source = load_json(folder / SOURCE_NAME, what="SAE download record")
    except FileNotFoundError:
        source = None
    except ArtefactError:
        return False
    if source is None:
        if revision is not None:
            return False
    elif source != {"repo_id": repo_id, "hookpoint": hookpoint, "revision": revision}:
        return False
    try:
        verify(folder)
    except ArtefactError:
        return False  # corrupt or truncated: download it again
    return True


def download_sae(
    repo_id: str,
    hookpoint: str,
    dest_root: str | os.PathLike,
    revision: str | None = None,
    *,
    force: bool = False,
    token: str | bool | None = None,
    download_fn: Callable[..., Any] | None = None,
    verify: Callable[[Path], Any] | None = None,
) -> HubDownload:
    """Download the SAE folder ``<repo_id>/<hookpoint>/`` into ``dest_root``.

    Args:
        repo_id: Hub model repo, e.g. ``bcywinski/SAeUron``.
        hookpoint: the folder inside the repo (the hook point the SAE was trained on).
        dest_root: where SAEs live (ComfyUI's ``models/sae``). The files land in
            ``<dest_root>/<owner>__<name>/<hookpoint>/``.
        revision: branch, tag or commit (``None``: the default branch).
        force: download again even when a complete copy is already there.
        token: Hub token for private repos (``None``: huggingface_hub's default).
        download_fn: stands in for ``huggingface_hub.snapshot_download`` (same keyword
            arguments); used by tests and offline mirrors.
        verify: loads the SAE folder, raising :class:`ArtefactError` when it is unreadable; it checks a
            local copy before reuse and a fresh download before it is recorded (``None``: :func:`load_sae`;
            a caller that keeps what it loads, such as the node's SAE cache, loads each copy once).

    Returns:
        :class:`HubDownload` with the hook-point folder.

    Raises:
        ValueError: malformed ``repo_id`` / ``hookpoint``, or the downloaded folder is not an SAE.
        FileNotFoundError: the repo has no ``cfg.json`` + ``sae.safetensors`` under ``hookpoint``.
    """
    repo_id = check_repo_id(repo_id)
    hookpoint = check_hookpoint(hookpoint)
    revision = (revision or "").strip() or None
    verify = verify or load_sae
    local_dir = Path(dest_root) / local_folder_name(repo_id)
    folder = local_dir.joinpath(*hookpoint.split("/"))
    if not force and _reusable(folder, repo_id, hookpoint, revision, verify):
        return HubDownload(folder, repo_id, hookpoint, revision, downloaded=False)
    if _complete(folder):
        force = True  # another revision, or an unreadable copy: the files must be fetched again, not reused
    if download_fn is None:
        try:
            from huggingface_hub import snapshot_download as download_fn
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ImportError("downloading SAEs needs the huggingface-hub package (pip install huggingface-hub)") from err
    local_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"allow_patterns": [f"{hookpoint}/*"], "local_dir": str(local_dir)}
    if revision is not None:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token
    if force:
        kwargs["force_download"] = True
    download_fn(repo_id, **kwargs)
    if not _complete(folder):
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise FileNotFoundError(
            f"{where} has no SAE under '{hookpoint}/' (expected {CFG_NAME} and {WEIGHTS_NAME}"
            + (f"; found {found}" if found else "; nothing was downloaded for that folder") + ")"
        )
    layout, _ = detect_layout(folder)
    if layout != "folder":  # pragma: no cover - _complete() implies the folder layout
        raise ValueError(f"{folder}: downloaded files are a {layout} SAE, expected cfg.json + sae.safetensors")
    verify(folder)  # a broken download is an error now, not at first use
    save_json(folder / SOURCE_NAME, {"repo_id": repo_id, "hookpoint": hookpoint, "revision": revision})
    return HubDownload(folder, repo_id, hookpoint, revision, downloaded=True)
