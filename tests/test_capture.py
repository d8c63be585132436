"""Tests for sae_core.capture: module lookup, token layout, hooks and the activation collector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_core.capture import ActivationCollector, capture, get_submodule, to_tokens


class Block(nn.Module):
    """Returns a 1-tuple, like a diffusers Transformer2DModel."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return (self.proj(x) + x,)


class Net(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.output_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), Block(c)),
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), Block(c), nn.Upsample(scale_factor=2)),
        ])
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for blk in self.output_blocks:
            h = blk[0](h)
            h = blk[1](h)[0]
            for rest in blk[2:]:
                h = rest(h)
        return self.out(h)


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_get_submodule_and_suggestions(net):
    assert get_submodule(net, "output_blocks.1.1") is net.output_blocks[1][1]
    assert get_submodule(net, "") is net
    with pytest.raises(ValueError) as err:
        get_submodule(net, "output_blocks.1.5")
    msg = str(err.value)
    assert "output_blocks.1.5" in msg and "'output_blocks.1'" in msg
    assert "0, 1, 2" in msg  # the children of the deepest valid prefix
    with pytest.raises(ValueError, match=r"did you mean: .*'output_blocks.1.1'"):
        get_submodule(net, "output_block.1.1")
    with pytest.raises(ValueError, match="conv_in"):
        get_submodule(net, "conv_inn")


def test_to_tokens_layouts():
    t = torch.randn(2, 5, 3, 4)
    rows, b, pos = to_tokens(t, return_index=True)
    assert torch.equal(rows, t.permute(0, 2, 3, 1).reshape(2 * 12, 5))
    assert torch.equal(to_tokens(t), rows)
    # row r is element b[r] at spatial index pos[r] = h * W + w
    for r in range(rows.shape[0]):
        h, w = divmod(int(pos[r]), 4)
        assert torch.equal(rows[r], t[b[r], :, h, w])
    s = torch.randn(3, 7, 5)
    rows, b, pos = to_tokens(s, return_index=True)
    assert torch.equal(rows, s.reshape(21, 5))
    assert torch.equal(rows[b * 7 + pos], rows) and torch.equal(s[b, pos], rows)
    m = torch.randn(4, 5)
    rows, b, pos = to_tokens(m, return_index=True)
    assert rows is m and torch.equal(b, torch.arange(4)) and torch.equal(pos, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        to_tokens(torch.randn(5))


def test_capture_conv_output_matches_manual(net):
    x = torch.randn(2, 3, 4, 5)
    with capture(net, "output_blocks.0.0") as rec:
        y = net(x)
    assert rec.calls == 1 and len(rec.tensors) == 1
    manual = net.output_blocks[0][0](net.conv_in(x))
    assert torch.allclose(rec.tensors[0], manual)
    assert torch.allclose(to_tokens(rec.tensors[0]), manual.permute(0, 2, 3, 1).reshape(-1, manual.shape[1]))
    assert torch.equal(net(x), y)  # capturing did not change the result
    assert hook_count(net) == 0


def test_capture_tuple_output_and_input(net):
    x = torch.randn(1, 3, 4, 4)
    h0 = net.output_blocks[0][0](net.conv_in(x))
    with capture(net, "output_blocks.0.1") as out_rec, capture(net, "output_blocks.0.1", which="input") as in_rec:
        net(x)
    assert torch.allclose(in_rec.tensors[0], h0)
    assert torch.allclose(out_rec.tensors[0], net.output_blocks[0][1](h0)[0])
    # input hook on a module called with keywords only
    seen = []
    with capture(net.output_blocks[0][1], "proj", which="input", fn=seen.append):
        net.output_blocks[0][1].proj(input=h0)
    assert torch.equal(seen[0], h0)
    assert hook_count(net) == 0


def test_capture_diff_is_the_block_update(net):
    x = torch.randn(2, 3, 4, 4)
    h0 = net.output_blocks[0][0](net.conv_in(x))
    block = net.output_blocks[0][1]
    with capture(net, "output_blocks.0.1", which="diff") as rec:
        y = net(x)
    torch.testing.assert_close(rec.tensors[0], block.proj(h0), rtol=1e-6, atol=1e-6)  # (proj(h) + h) - h
    assert torch.equal(net(x), y) and hook_count(net) == 0
    # a module whose output has another shape than its input has no update
    with pytest.raises(ValueError, match="only defined for equal shapes"):
        with capture(net, "output_blocks.1.2", which="diff"):
            net(x)
    assert hook_count(net) == 0
    with pytest.raises(ValueError, match="which must be one of"):
        with capture(net, "output_blocks.0.1", which="delta"):
            pass


def test_capture_options_copy_cast_and_callback(net):
    x = torch.randn(2, 3, 4, 4)
    got = []
    with capture(net, "conv_in", fn=got.append, dtype=torch.float16) as rec:
        net(x)
    assert rec.tensors == [] and rec.calls == 1
    assert got[0].dtype == torch.float16 and not got[0].requires_grad
    # the copy protects the record against in-place edits made after the hook
    lin = nn.Linear(4, 4)
    with capture(lin, "") as rec:
        out = lin(torch.randn(2, 4))
        out.mul_(0)
    assert rec.tensors[0].abs().sum() > 0
    with pytest.raises(ValueError, match="which"):
        with capture(net, "conv_in", which="both"):
            pass


def test_hooks_removed_after_exception(net):
    class Boom(RuntimeError):
        pass

    def explode(_t):
        raise Boom("callback failed")

    with pytest.raises(Boom):
        with capture(net, "output_blocks.1.1", fn=explode):
            net(torch.randn(1, 3, 4, 4))
    assert hook_count(net) == 0
    with pytest.raises(Boom):
        with capture(net, "output_blocks.1.1", which="input"):
            raise Boom("user code failed")
    assert hook_count(net) == 0
    with pytest.raises(ValueError):
        with capture(net, "no.such.block"):
            pass
    assert hook_count(net) == 0


def test_collector_metadata_expansion_per_row(net):
    x = torch.randn(4, 3, 3, 5)
    col = ActivationCollector(net, "output_blocks.0.1")
    out = col.collect(lambda: net(x), step=7, sigma=torch.tensor([0.5, 0.5, 2.0, 2.0]),
                      cond=[0, 1, 0, 1], prompt_index=[3, 3, 9, 9])
    with capture(net, "output_blocks.0.1") as rec:
        net(x)
    ref = rec.tensors[0]  # [4, C, 3, 5]
    n_pos = 15
    assert out.rows.shape == (4 * n_pos, ref.shape[1])
    assert set(out.meta) == {"step", "sigma", "cond", "prompt_index", "position"}
    for r in range(out.rows.shape[0]):
        b, p = divmod(r, n_pos)
        h, w = divmod(p, 5)
        assert torch.allclose(out.rows[r], ref[b, :, h, w])
        assert out.meta["position"][r] == p
        assert out.meta["step"][r] == 7
        assert out.meta["cond"][r] == [0, 1, 0, 1][b]
        assert out.meta["prompt_index"][r] == [3, 3, 9, 9][b]
        assert out.meta["sigma"][r] == [0.5, 0.5, 2.0, 2.0][b]
    assert out.meta["sigma"].dtype == torch.float32 and out.meta["step"].dtype == torch.int64
    assert col.tokens_collected == out.rows.shape[0]
    assert hook_count(net) == 0


def test_collector_filters_and_sink():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8))
    tokens = torch.tensor([[0, 5, 6, 19, 19], [0, 7, 19, 19, 19], [0, 1, 2, 3, 4]])
    attn = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = attn.clone()
    keep[:, 0] = False  # drop BOS
    got = []
    col = ActivationCollector(emb, "1", sink=lambda rows, meta: got.append((rows, meta)), cond_only=True)
    assert col.collect(lambda: emb(tokens), cond=[1, 0, 1], prompt_index=[0, 1, 2],
                       positions_mask=keep) is None
    rows, meta = got[0]
    full = emb(tokens).detach()
    expected = [(b, p) for b in (0, 2) for p in range(5) if keep[b, p]]
    assert rows.shape[0] == len(expected) == col.tokens_collected
    for r, (b, p) in enumerate(expected):
        assert torch.allclose(rows[r], full[b, p])
        assert meta["prompt_index"][r] == b and meta["position"][r] == p and meta["cond"][r] == 1
    # a [P] mask applies to every element; a row_filter runs after it
    col2 = ActivationCollector(emb, "1", row_filter=lambda rows, meta: meta["position"] % 2 == 0)
    out = col2.collect(lambda: emb(tokens), positions_mask=[False, True, True, True, True])
    assert out.meta["position"].tolist() == [2, 4] * 3
    with pytest.raises(ValueError, match="positions_mask"):
        col2.collect(lambda: emb(tokens), positions_mask=[True, False])
    with pytest.raises(ValueError, match="one value per batch element"):
        col2.collect(lambda: emb(tokens), cond=[1, 0])
    with pytest.raises(ValueError, match="cond"):
        ActivationCollector(emb, "1", cond_only=True).collect(lambda: emb(tokens))
    assert hook_count(emb) == 0


def test_collector_stop_forward_nan_and_never_fired(net):
    x = torch.randn(2, 3, 4, 4)
    calls = []
    net.out.register_forward_hook(lambda *a: calls.append(1))
    col = ActivationCollector(net, "conv_in", stop_forward=True)
    out = col.collect(lambda: net(x), step=0)
    assert out.rows.shape == (2 * 16, 6) and calls == []  # the rest of the forward was skipped
    net.out._forward_hooks.clear()

    bad = x.clone()
    bad[1, :, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*'conv_in'"):
        ActivationCollector(net, "conv_in").collect(lambda: net(bad), step=3)
    with pytest.raises(RuntimeError, match="never fired"):
        ActivationCollector(net, "output_blocks.1.2").collect(lambda: net.conv_in(x))
    with pytest.raises(ValueError, match="did you mean"):
        ActivationCollector(net, "output_blocks.1.11")
    assert hook_count(net) == 0


def test_collector_streams_into_writer(tmp_path, net):
    from sae_core.store import ActivationReader, ActivationWriter

    x = torch.randn(2, 3, 4, 4)
    with ActivationWriter(tmp_path / "s", d=6, dtype="float32", shard_tokens=10,
                          metadata_columns=("step", "cond", "position"), attrs={"hookpoint": "conv_in"}) as w:
        col = ActivationCollector(net, "conv_in", sink=w)
        for step in range(3):
            col.collect(lambda: net(x), step=step, cond=[0, 1])
    r = ActivationReader(tmp_path / "s")
    assert len(r) == 3 * 2 * 16 == col.tokens_collected
    everything = r.read_all(columns=("step", "cond", "position"))
    ref = to_tokens(net.conv_in(x).detach())
    assert torch.allclose(everything.activations[:32], ref)
    assert everything.meta["step"].tolist() == [0] * 32 + [1] * 32 + [2] * 32
