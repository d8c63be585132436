"""sae_core.hub.download_sae against a fake local Hub repo (no network)."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

from sae_core.config import SaeConfig
from sae_core.formats import load_sae, save_sae
from sae_core.hub import check_hookpoint, download_sae, local_folder_name
from sae_core.sae import SparseAutoencoder

torch.set_num_threads(1)

HOOKS = ("unet.up_blocks.1.attentions.1", "unet.up_blocks.1.attentions.2", "coco/unet.up_blocks.1.attentions.1")


def _sae(seed: int) -> SparseAutoencoder:
    return SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fake_repo(tmp_path: Path) -> tuple[Path, dict[str, SparseAutoencoder]]:
    """A local folder laid out like the SAeUron Hub repo (one SAE folder per hook point, extra files)."""
    repo = tmp_path / "hub" / "owner" / "SAeUron"
    saes = {}
    for i, hook in enumerate(HOOKS):
        saes[hook] = _sae(i)
        save_sae(saes[hook], repo / hook, layout="folder")
    (repo / "README.md").write_text("model card")
    (repo / "unet.up_blocks.1.attentions.1.txt").write_text("a file beside, not inside, the folder")
    return repo, saes


class FakeHub:
    """Stands in for snapshot_download: copies the files matching allow_patterns into local_dir."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, repo_id: str, **kwargs) -> str:
        self.calls.append((repo_id, kwargs))
        src = self.repos[repo_id]
        dst = Path(kwargs["local_dir"])
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in kwargs["allow_patterns"]):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst / rel)
        return str(dst)


def _same(a: SparseAutoencoder, b: SparseAutoencoder) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_downloads_only_the_requested_hookpoint(tmp_path, fake_repo):
    repo, saes = fake_repo
    hub = FakeHub({"owner/SAeUron": repo})
    dest = tmp_path / "models" / "sae"
    got = download_sae("owner/SAeUron", "unet.up_blocks.1.attentions.2", dest, revision="main", download_fn=hub)

    assert got.downloaded and got.folder == dest / "owner__SAeUron" / "unet.up_blocks.1.attentions.2"
    (repo_id, kwargs), = hub.calls
    assert repo_id == "owner/SAeUron" and kwargs["allow_patterns"] == ["unet.up_blocks.1.attentions.2/*"]
    assert kwargs["local_dir"] == str(dest / "owner__SAeUron") and kwargs["revision"] == "main"
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["owner__SAeUron/unet.up_blocks.1.attentions.2/.download.json",
                     "owner__SAeUron/unet.up_blocks.1.attentions.2/cfg.json",
                     "owner__SAeUron/unet.up_blocks.1.attentions.2/sae.safetensors"]
    loaded = load_sae(got.folder)
    assert _same(loaded, saes["unet.up_blocks.1.attentions.2"])
    assert not _same(loaded, saes["unet.up_blocks.1.attentions.1"])


def test_nested_hookpoint_and_reuse(tmp_path, fake_repo):
    repo, saes = fake_repo
    hub = FakeHub({"owner/SAeUron": repo})
    dest = tmp_path / "sae"
    first = download_sae("owner/SAeUron", "coco/unet.up_blocks.1.attentions.1", dest, download_fn=hub)
    assert first.folder == dest / "owner__SAeUron" / "coco" / "unet.up_blocks.1.attentions.1"
    assert "revision" not in hub.calls[0][1]
    assert _same(load_sae(first.folder), saes["coco/unet.up_blocks.1.attentions.1"])
    # a complete copy is reused without asking the hub; force downloads again
    again = download_sae("owner/SAeUron", "coco/unet.up_blocks.1.attentions.1", dest, download_fn=hub)
    assert not again.downloaded and again.folder == first.folder and len(hub.calls) == 1
    forced = download_sae("owner/SAeUron", "coco/unet.up_blocks.1.attentions.1", dest, force=True, download_fn=hub)
    assert forced.downloaded and len(hub.calls) == 2 and hub.calls[1][1]["force_download"] is True


def test_missing_hookpoint_is_a_clear_error(tmp_path, fake_repo):
    repo, _ = fake_repo
    hub = FakeHub({"owner/SAeUron": repo})
    with pytest.raises(FileNotFoundError, match=r"owner/SAeUron has no SAE under 'unet.mid_block.attentions.0/'"):
        download_sae("owner/SAeUron", "unet.mid_block.attentions.0", tmp_path / "sae", download_fn=hub)
    # a folder with only a cfg.json is not an SAE either
    (repo / "broken").mkdir()
    (repo / "broken" / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"found \['cfg.json'\]"):
        download_sae("owner/SAeUron", "broken", tmp_path / "sae", download_fn=hub)


@pytest.mark.parametrize("bad", ["", "../x", "/abs/path", "a/../b", "unet.*", "a b"])
def test_bad_hookpoints_are_refused(tmp_path, bad):
    def never(*_a, **_k):
        raise AssertionError("must not download")

    with pytest.raises(ValueError, match="hookpoint"):
        download_sae("owner/SAeUron", bad, tmp_path, download_fn=never)


@pytest.mark.parametrize("bad", ["", "SAeUron", "owner/", "a/b/c", "../x", "owner/na me"])
def test_bad_repo_ids_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="repo_id"):
        download_sae(bad, "unet.up_blocks.1.attentions.1", tmp_path, download_fn=lambda *a, **k: None)


def test_names():
    assert local_folder_name("bcywinski/SAeUron") == "bcywinski__SAeUron"
    assert check_hookpoint(" coco/unet.up_blocks.1.attentions.1/") == "coco/unet.up_blocks.1.attentions.1"


def test_another_revision_is_downloaded_not_relabelled(fake_repo, tmp_path):
    hub, dest = FakeHub({"owner/SAeUron": fake_repo[0]}), tmp_path / "models" / "sae"
    hook = HOOKS[0]
    first = download_sae("owner/SAeUron", hook, dest, download_fn=hub)
    assert first.downloaded
    again = download_sae("owner/SAeUron", hook, dest, download_fn=hub)
    assert not again.downloaded and len(hub.calls) == 1
    other = download_sae("owner/SAeUron", hook, dest, revision="v2", download_fn=hub)
    assert other.downloaded and hub.calls[-1][1]["revision"] == "v2" and hub.calls[-1][1].get("force_download")
    # the v2 copy is now recorded as v2: asking for the default branch downloads again
    assert download_sae("owner/SAeUron", hook, dest, download_fn=hub).downloaded


def test_a_corrupt_local_copy_is_downloaded_again(fake_repo, tmp_path):
    repo, saes = fake_repo
    hub, dest, hook = FakeHub({"owner/SAeUron": repo}), tmp_path / "models" / "sae", HOOKS[1]
    got = download_sae("owner/SAeUron", hook, dest, download_fn=hub)
    weights = got.folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    again = download_sae("owner/SAeUron", hook, dest, download_fn=hub)
    assert again.downloaded and _same(load_sae(again.folder), saes[hook])
