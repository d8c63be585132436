"""Tests for sae_core.store: sharded writing with bounded RAM, validation, and shuffled reading."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from sae_core.store import (
    ActivationBatch,
    ActivationReader,
    ActivationWriter,
    IncompleteStoreError,
)

D = 256
SHARD = 1024  # 1024 x 256 x float32 = 1 MiB per shard


def make_rows(start: int, n: int, d: int = D) -> torch.Tensor:
    """Deterministic rows that differ per id (row i depends only on i)."""
    g = torch.Generator().manual_seed(start * 7919 + n)
    return torch.randn(n, d, generator=g) * 3


def write_store(folder, dtype="float32", chunks=(1000, 3000, 17, 900, 5000, 4000, 2563, 4003), d=D):
    """Write sum(chunks) rows in uneven add() calls; returns (rows by id, writer)."""
    parts = []
    start = 0
    with ActivationWriter(folder, d=d, dtype=dtype, shard_tokens=SHARD,
                          metadata_columns=("id", "step", "sigma"),
                          attrs={"hookpoint": "output_blocks.5.1", "prompts": ["a star", "a moon"]}) as w:
        for n in chunks:
            rows = make_rows(start, n, d)
            ids = torch.arange(start, start + n)
            w.add(rows, id=ids, step=ids % 50, sigma=ids.float() / 10)
            parts.append(rows)
            start += n
            assert w.buffered_rows <= SHARD
    return torch.cat(parts), w


@pytest.fixture(scope="module")
def store32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s32") / "store"
    rows, w = write_store(folder)
    return folder, rows, w


def test_writer_bounded_ram_and_layout(store32):
    folder, rows, w = store32
    total = rows.shape[0]
    assert total > 20 * SHARD  # more data than any single buffer
    assert 0 < w.peak_buffered_rows <= SHARD
    files = sorted(p.name for p in folder.iterdir())
    n_shards = -(-total // SHARD)
    assert files == ["manifest.json"] + [f"shard-{i:05d}.safetensors" for i in range(n_shards)]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["total_tokens"] == total and manifest["d"] == D
    assert [s["rows"] for s in manifest["shards"]] == [SHARD] * (n_shards - 1) + [total - SHARD * (n_shards - 1)]
    assert manifest["attrs"]["prompts"] == ["a star", "a moon"]
    assert manifest["columns"] == {"id": "int64", "step": "int64", "sigma": "float32"}


def test_every_row_once_per_epoch_bit_exact(store32):
    folder, rows, _ = store32
    r = ActivationReader(folder)
    assert len(r) == rows.shape[0] and r.d == D
    for epoch in (0, 1):
        seen = Counter()
        sizes = []
        for batch in r.iter_batches(512, seed=5, epoch=epoch, columns=("id", "sigma")):
            assert isinstance(batch, ActivationBatch)
            ids = batch.meta["id"]
            sizes.append(ids.shape[0])
            seen.update(ids.tolist())
            assert torch.equal(batch.activations, rows[ids])  # float32 store: bit-exact
            assert torch.equal(batch.meta["sigma"], ids.float() / 10)
        assert seen == Counter(range(rows.shape[0]))  # each id exactly once
        assert all(s == 512 for s in sizes[:-1]) and 0 < sizes[-1] <= 512
    drop = [b.shape[0] for b in r.iter_batches(512, drop_last=True)]
    assert set(drop) == {512} and len(drop) == rows.shape[0] // 512 == r.num_batches(512, drop_last=True)
    assert len(list(r.iter_batches(512))) == r.num_batches(512)


def test_shuffle_deterministic_and_epoch_dependent(store32):
    folder, rows, _ = store32
    r = ActivationReader(folder)

    def order(**kw):
        return torch.cat([b.meta["id"] for b in r.iter_batches(1000, columns=("id",), shuffle_shards=2, **kw)])

    a, b = order(seed=1, epoch=0), order(seed=1, epoch=0)
    assert torch.equal(a, b)
    c, d = order(seed=1, epoch=1), order(seed=2, epoch=0)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert torch.equal(a.sort().values, c.sort().values)
    # rows are really mixed: the first batch draws from more than one shard
    assert len(set((a[:1000] // SHARD).tolist())) > 1
    # without shuffle the order is the write order
    assert torch.equal(order(shuffle=False), torch.arange(rows.shape[0]))
    # resuming mid-epoch continues exactly where the full pass would be
    tail = torch.cat([x.meta["id"] for x in r.iter_batches(1000, seed=1, epoch=0, columns=("id",),
                                                         shuffle_shards=2, start_batch=7)])
    assert torch.equal(tail, a[7000:])


def test_epochs_iterator_and_read_all(store32):
    folder, rows, _ = store32
    r = ActivationReader(folder)
    per_epoch = r.num_batches(4096)
    seen = Counter()
    epochs = Counter()
    for epoch, batch in r.iter_epochs(4096, num_epochs=2, seed=3, columns=("id",)):
        epochs[epoch] += 1
        seen.update(batch.meta["id"].tolist())
    assert epochs == {0: per_epoch, 1: per_epoch}
    assert set(seen.values()) == {2} and len(seen) == rows.shape[0]
    endless = r.iter_epochs(8192, drop_last=True)
    got = [next(endless)[0] for _ in range(3 * (rows.shape[0] // 8192) + 1)]
    assert got[-1] == 3  # keeps going past the data
    everything = r.read_all(columns=("id",))
    assert torch.equal(everything.activations, rows) and torch.equal(everything.meta["id"], torch.arange(rows.shape[0]))
    assert r.read_all(dtype=None).dtype == torch.float32
    with pytest.raises(MemoryError, match="iter_batches"):
        r.read_all(max_bytes=1000)
    with pytest.raises(ValueError, match="no column"):
        next(r.iter_batches(10, columns=("nope",)))


def test_float16_store_within_rounding(tmp_path):
    rows, w = write_store(tmp_path / "s16", dtype="float16", chunks=(700, 1500, 333))
    r = ActivationReader(tmp_path / "s16")
    assert r.dtype == torch.float16
    for batch in r.iter_batches(256, columns=("id",)):
        assert batch.activations.dtype == torch.float32
        ref = rows[batch.meta["id"]]
        assert torch.equal(batch.activations, ref.half().float())  # exactly round-to-nearest fp16
        assert torch.allclose(batch.activations, ref, rtol=2 ** -11, atol=2 ** -24)
    raw = next(iter(r.iter_batches(256, dtype=None, shuffle=False)))
    assert raw.dtype == torch.float16


def test_truncated_and_missing_shards(tmp_path):
    folder = tmp_path / "s"
    write_store(folder, chunks=(3000,))
    shard = folder / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors.*truncated"):
        ActivationReader(folder)
    # same size but a broken header is still caught when opened
    shard.write_bytes(b"\0" * len(data))
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors.*invalid"):
        ActivationReader(folder)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.safetensors.*missing"):
        ActivationReader(folder)


def test_shape_mismatch_detected(tmp_path):
    folder = tmp_path / "s"
    write_store(folder, chunks=(1500,), d=8)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["d"] = 16
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard-00000.*expected F32 \[1024, 16\]"):
        ActivationReader(folder)


def test_exception_leaves_incomplete_store_without_temp_files(tmp_path):
    folder = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        with ActivationWriter(folder, d=8, shard_tokens=100, metadata_columns=("id",)) as w:
            w.add(torch.randn(250, 8), id=torch.arange(250))
            raise KeyboardInterrupt
    names = [p.name for p in folder.iterdir()]
    assert not [n for n in names if n.startswith(".tmp-")]
    assert json.loads((folder / "manifest.json").read_text())["complete"] is False
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        ActivationReader(folder)
    # without any manifest, leftover shards are also recognised as unfinished
    (folder / "manifest.json").unlink()
    with pytest.raises(IncompleteStoreError, match="no manifest.json"):
        ActivationReader(folder)
    # an unfinished store is simply replaced by a new run
    with ActivationWriter(folder, d=8, shard_tokens=100, metadata_columns=("id",)) as w:
        w.add(torch.randn(50, 8), id=torch.arange(50))
    assert len(ActivationReader(folder)) == 50
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard-00000.safetensors"]


def test_nan_rows_rejected_with_source(tmp_path):
    rows = torch.randn(20, 8)
    rows[13, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*output_blocks\.4\.1.*row 13"):
        with ActivationWriter(tmp_path / "s", d=8, attrs={"hookpoint": "output_blocks.4.1"}) as w:
            w.add(rows)
    with pytest.raises(IncompleteStoreError):
        ActivationReader(tmp_path / "s")
    with pytest.raises(ValueError, match="float16 range"):
        with ActivationWriter(tmp_path / "s2", d=8, dtype="float16") as w:
            w.add(torch.full((2, 8), 1e6))


def test_refuse_overwrite(tmp_path):
    folder = tmp_path / "s"
    with ActivationWriter(folder, d=4, shard_tokens=10) as w:
        w.add(torch.randn(35, 4))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ActivationWriter(folder, d=4)
    assert len(ActivationReader(folder)) == 35  # untouched
    with ActivationWriter(folder, d=4, shard_tokens=10, overwrite=True) as w:
        w.add(torch.randn(12, 4))
    r = ActivationReader(folder)
    assert len(r) == 12 and r.num_shards == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]


def test_writer_input_errors(tmp_path):
    with ActivationWriter(tmp_path / "s", d=4, metadata_columns=("cond",)) as w:
        with pytest.raises(ValueError, match=r"\[N, 4\]"):
            w.add(torch.randn(3, 5), cond=1)
        with pytest.raises(ValueError, match="missing"):
            w.add(torch.randn(3, 4))
        with pytest.raises(ValueError, match="unexpected"):
            w.add(torch.randn(3, 4), cond=1, step=2)
        with pytest.raises(ValueError, match="3 values"):
            w.add(torch.randn(3, 4), cond=[1, 0])
        w.add(torch.randn(3, 4), cond=True)
    assert ActivationReader(tmp_path / "s").read_all(columns=("cond",)).meta["cond"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="JSON"):
        ActivationWriter(tmp_path / "t", d=4, attrs={"bad": object()})
    with pytest.raises(ValueError, match="dtype"):
        ActivationWriter(tmp_path / "t", d=4, dtype="int8")


# ---------------------------------------------------------------------------------------------
# reliability: a store this code cannot read is kept; malformed manifests name the file
# ---------------------------------------------------------------------------------------------
def _small_store(folder):
    from sae_core.store import ActivationWriter

    w = ActivationWriter(folder, d=4, shard_tokens=8)
    w.add(torch.randn(10, 4))
    w.close()


def _edit_manifest(folder, **changes):
    import json as _json

    path = folder / "manifest.json"
    data = _json.loads(path.read_text())
    data.update(changes)
    path.write_text(_json.dumps(data))


def test_writer_keeps_a_store_of_another_version_without_overwrite(tmp_path):
    from sae_core.store import ActivationWriter

    folder = tmp_path / "s"
    _small_store(folder)
    _edit_manifest(folder, version=99, complete=False)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match="version 99"):
        ActivationWriter(folder, d=4)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("changes", [{"shards": [{"file": "../outside.safetensors", "rows": 10}]},
                                     {"shards": [{"file": "/etc/passwd", "rows": 10}]},
                                     {"d": "four"}, {"total_tokens": None}, {"shards": 3}])
def test_malformed_manifest_is_a_store_format_error_naming_it(tmp_path, changes):
    from sae_core.store import ActivationReader, StoreFormatError

    folder = tmp_path / "s"
    _small_store(folder)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    _edit_manifest(folder, **changes)
    with pytest.raises(StoreFormatError) as err:
        ActivationReader(folder)
    assert err.value.path.endswith("manifest.json")


def test_fingerprint_tells_a_recollected_store_from_the_old_one(tmp_path):
    import time

    from sae_core.store import ActivationReader, ActivationWriter

    folder = tmp_path / "s"
    _small_store(folder)
    first = ActivationReader(folder).fingerprint
    assert ActivationReader(folder).fingerprint == first
    time.sleep(0.01)
    w = ActivationWriter(folder, d=4, shard_tokens=8, overwrite=True)  # same row count, collected again
    w.add(torch.randn(10, 4))
    w.close()
    assert len(ActivationReader(folder)) == 10 and ActivationReader(folder).fingerprint != first


def test_overwrite_keeps_the_old_store_until_the_new_one_is_complete(tmp_path):
    from sae_core.store import ActivationReader, ActivationWriter

    folder = tmp_path / "s"
    w = ActivationWriter(folder, d=4, shard_tokens=4)
    old_rows = torch.randn(10, 4)
    w.add(old_rows)
    w.close()
    old_fp = ActivationReader(folder).fingerprint

    w = ActivationWriter(folder, d=4, shard_tokens=4, overwrite=True)
    w.add(torch.randn(6, 4))  # one shard written, the run is not finished
    reader = ActivationReader(folder)  # the old store is still whole meanwhile
    assert reader.fingerprint == old_fp and len(reader) == 10
    w.abort("cancelled")
    reader = ActivationReader(folder)
    assert reader.fingerprint == old_fp
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard-00000.safetensors",
                                                        "shard-00001.safetensors", "shard-00002.safetensors"]

    w = ActivationWriter(folder, d=4, shard_tokens=4, overwrite=True)
    new_rows = torch.randn(5, 4)
    w.add(new_rows)
    w.close()
    reader = ActivationReader(folder)
    assert len(reader) == 5 and reader.num_shards == 2 and reader.fingerprint != old_fp
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard-00000.safetensors",
                                                        "shard-00001.safetensors"]
    got = torch.cat(list(reader.iter_batches(5, shuffle=False)))
    assert torch.equal(got, new_rows.half().float())
