"""The fast SAeUron path (sae_core.saeuron.fast) against the screened path it replaces on GPUs."""

from __future__ import annotations

import pytest
import torch

from sae_core.capture import to_tokens
from sae_core.config import SaeConfig
from sae_core.sae import SparseAutoencoder
from sae_core.saeuron import SAeUronHook, SelectionTable, StepSelection
from sae_core.saeuron.fast import COUNT_LIMIT

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = dict(d=16, n=96, k=6)
MEDIUM = dict(d=128, n=2048, k=32)


def random_sae(d: int, n: int, k: int, seed: int, device: str) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k), generator=gen)
    with torch.no_grad():
        sae.encoder.bias.normal_(0.0, 0.2, generator=gen)
        sae.b_dec.normal_(0.0, 0.5, generator=gen)
    return sae.to(device)


def random_table(sae: SparseAutoencoder, steps: int, per_step: int, seed: int, thr: float = 0.05) -> SelectionTable:
    """Random latents per step, scales in [-3, 1], thresholds around ``thr``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(steps):
        idx = torch.randperm(sae.cfg.num_latents, generator=gen)[:per_step]
        scales = torch.rand(per_step, generator=gen) * 4 - 3
        rows.append(StepSelection(idx, scales, torch.rand(per_step, generator=gen) * 2 * thr,
                                  torch.zeros(per_step, dtype=torch.int64)))
    return SelectionTable(["x"], rows, num_latents=sae.cfg.num_latents)


def pair(sae, table, **kw) -> tuple[SAeUronHook, SAeUronHook]:
    return (SAeUronHook(sae, table, path="fast", check_sae=False, **kw),
            SAeUronHook(sae, table, path="screened", check_sae=False, **kw))


def assert_same(fast: SAeUronHook, y_fast: torch.Tensor, screened: SAeUronHook, y_ref: torch.Tensor,
                tol: float = 1e-5) -> None:
    assert y_fast.dtype == y_ref.dtype and y_fast.shape == y_ref.shape
    assert torch.equal(fast.last_fired, screened.last_fired)
    torch.testing.assert_close(y_fast.float(), y_ref.float(), rtol=tol, atol=tol)
    assert int(fast.fast_unresolved) == 0


def decide_by(hook: SAeUronHook, x: torch.Tensor, count: bool) -> None:
    """Build ``hook``'s fast engine for ``x`` and make it decide membership by counting or by top-k."""
    hook(x, 0)
    engine = hook._fast[x.device]
    engine.count = count
    engine._captured.clear()  # CUDA graphs hold the old choice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [True, False], ids=["count", "topk"])
@pytest.mark.parametrize("sizes,seed", [(SMALL, 0), (SMALL, 1), (MEDIUM, 2), (MEDIUM, 3)])
def test_fast_equals_screened_on_random_saes(device, count, sizes, seed):
    sae = random_sae(**sizes, seed=seed, device=device)
    table = random_table(sae, steps=3, per_step=4, seed=seed + 10)
    fast, screened = pair(sae, table)
    x = torch.randn(4, sizes["d"], 5, 3, generator=torch.Generator().manual_seed(seed)).to(device)
    decide_by(fast, x, count)
    screened(x, 0)  # the same calls on both, so that their fired-token totals compare
    assert fast._fast[x.device].count is count
    some = False
    for t in range(3):
        y_fast, y_ref = fast(x, t), screened(x, t)
        assert_same(fast, y_fast, screened, y_ref)
        assert not screened.last_fired.all()
        some |= bool(screened.last_fired.any())
    assert some, "the case under test needs edited tokens"
    assert int(fast.fired_tokens) == int(screened.fired_tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_nothing_fires_returns_an_equal_copy(device):
    sae = random_sae(**SMALL, seed=4, device=device)
    table = random_table(sae, steps=1, per_step=3, seed=5, thr=1e6)
    fast, screened = pair(sae, table)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, SMALL["d"], 4, 4, generator=torch.Generator().manual_seed(6)).to(device, dtype)
        y = fast(x, 0)
        assert screened(x, 0) is x and not fast.last_fired.any()
        assert y is not x and y.dtype == dtype and torch.equal(y, x)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_every_token_fires(device):
    """Every latent selected with threshold 0: each token's positive top-k latents are edited."""
    sae = random_sae(**SMALL, seed=7, device=device)
    n = SMALL["n"]
    scales = torch.linspace(-2.0, 0.5, n)
    table = SelectionTable(["x"], [StepSelection(torch.arange(n), scales, torch.zeros(n),
                                                 torch.zeros(n, dtype=torch.int64))], num_latents=n)
    fast, screened = pair(sae, table)
    x = torch.randn(3, SMALL["d"], 4, 2, generator=torch.Generator().manual_seed(8)).to(device)
    y_fast, y_ref = fast(x, 0), screened(x, 0)
    assert screened.last_fired.all()
    assert_same(fast, y_fast, screened, y_ref)
    # the float16 pass settles nearly all of the ~24 x 6 top-k pairs on its own
    assert int(fast._fast[x.device](to_tokens(x), 0).counts[1]) < 10


@pytest.mark.parametrize("device", DEVICES)
def test_fast_latent_positive_but_outside_top_k(device):
    sae = random_sae(**SMALL, seed=9, device=device)
    x = torch.randn(6, SMALL["d"], 3, 5, generator=torch.Generator().manual_seed(21)).to(device)
    latents = torch.tensor([3, 40, 77])
    table = SelectionTable(["x"], [StepSelection(latents, torch.tensor([-1.5, -0.5, 2.0]), torch.zeros(3),
                                                 torch.zeros(3, dtype=torch.int64))], num_latents=SMALL["n"])
    with torch.no_grad():
        pre = sae.pre_acts(to_tokens(x))
        in_top = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(SMALL["k"], dim=-1).indices, True)
    assert ((pre[:, latents] > 0) & ~in_top[:, latents.to(device)]).any(), "the case under test must occur"
    fast, screened = pair(sae, table)
    assert_same(fast, fast(x, 0), screened, screened(x, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[False, True, False, True], [True] * 4, [False] * 4, [True, False, False, False]])
def test_fast_cond_mask_subsets(device, mask):
    sae = random_sae(**SMALL, seed=11, device=device)
    table = random_table(sae, steps=2, per_step=5, seed=12)
    fast, screened = pair(sae, table, cond_only=True)
    x = torch.randn(4, SMALL["d"], 3, 3, generator=torch.Generator().manual_seed(13)).to(device)
    for cond in (mask, torch.tensor(mask, device=device)):
        y_fast, y_ref = fast(x, 1, cond), screened(x, 1, cond)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
        untouched = ~torch.tensor(mask, device=device)
        assert torch.equal(y_fast[untouched], x[untouched])
        if any(mask):
            edited_rows = fast.last_fired.view(4, -1)[torch.tensor(mask, device=device)]
            assert torch.equal(edited_rows.reshape(-1), screened.last_fired)
        else:
            assert not fast.last_fired.any()
    with pytest.raises(ValueError, match="cond_mask"):
        fast(x, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_on_update(device):
    sae = random_sae(**MEDIUM, seed=14, device=device)
    table = random_table(sae, steps=2, per_step=3, seed=15)
    fast, screened = pair(sae, table)
    gen = torch.Generator().manual_seed(16)
    x_in = torch.randn(2, MEDIUM["d"], 4, 4, generator=gen).to(device)
    out = x_in + torch.randn(2, MEDIUM["d"], 4, 4, generator=gen).to(device)
    for t in range(2):
        y_fast, y_ref = fast.on_update(x_in, out, t), screened.on_update(x_in, out, t)
        assert_same(fast, y_fast, screened, y_ref)
        kept = ~fast.last_fired
        assert torch.equal(to_tokens(y_fast)[kept], to_tokens(out)[kept])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_low_precision_inputs_on_cpu(dtype):
    sae = random_sae(**MEDIUM, seed=17, device="cpu")
    table = random_table(sae, steps=1, per_step=6, seed=18)
    fast, screened = pair(sae, table)
    x = torch.randn(3, MEDIUM["d"], 4, 3, generator=torch.Generator().manual_seed(19)).to(dtype)
    y_fast, y_ref = fast(x, 0), screened(x, 0)
    assert screened.last_fired.any()
    # the edit is computed in float32 and rounded once to the input dtype: at most one unit apart
    assert_same(fast, y_fast, screened, y_ref, tol=2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [True, False], ids=["count", "topk"])
def test_edge_pairs_are_settled_exactly(device, count):
    """A 30x wider error bound puts many pairs on the edge: the exact recount must agree."""
    sae = random_sae(**MEDIUM, seed=20, device=device)
    table = random_table(sae, steps=1, per_step=8, seed=21)
    x = torch.randn(2, MEDIUM["d"], 4, 4, generator=torch.Generator().manual_seed(22)).to(device)
    fast, screened = pair(sae, table)
    y_ref = screened(x, 0)
    fast(x, 0)  # builds the device tables
    engine = fast._fast[x.device]
    engine.tabs = engine.tabs._replace(q=engine.tabs.q * 30, nwq=engine.tabs.nwq * 30)
    engine.extra, engine.budget, engine.count = 200, 32, count
    engine._captured.clear()  # CUDA graphs hold the old settings
    y = fast(x, 0)
    assert_same(fast, y, screened, y_ref)
    tokens = to_tokens(x)
    counts = engine(tokens, 0).counts.tolist()
    assert counts[1] > 0 and counts[2] == 0, counts
    # with no recount budget the edge pairs are reported as unresolved
    engine.budget = 0
    engine._captured.clear()
    counts = engine(tokens, 0).counts.tolist()
    assert counts[2] == counts[1] > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_step", [COUNT_LIMIT, COUNT_LIMIT + 1])
def test_membership_is_counted_for_few_latents_per_step_on_cuda(device, per_step):
    sae = random_sae(**MEDIUM, seed=31, device=device)
    table = random_table(sae, steps=2, per_step=per_step, seed=32)
    fast, screened = pair(sae, table)
    x = torch.randn(2, MEDIUM["d"], 4, 4, generator=torch.Generator().manual_seed(33)).to(device)
    assert_same(fast, fast(x, 1), screened, screened(x, 1))
    assert fast._fast[x.device].count is (device == "cuda" and per_step <= COUNT_LIMIT)


def test_path_option():
    sae = random_sae(**SMALL, seed=23, device="cpu")
    table = random_table(sae, steps=1, per_step=2, seed=24)
    with pytest.raises(ValueError, match="path"):
        SAeUronHook(sae, table, path="quick", check_sae=False)
    with pytest.raises(ValueError, match="conventional"):
        SAeUronHook(sae, table, error_mode="reference", path="fast", check_sae=False)
    auto = SAeUronHook(sae, table, check_sae=False)
    assert not auto.uses_fast(torch.device("cpu")) and auto.uses_fast(torch.device("cuda"))
    assert not SAeUronHook(sae, table, error_mode="reference", check_sae=False).uses_fast(torch.device("cuda"))
    assert SAeUronHook(sae, table, path="fast", check_sae=False).uses_fast(torch.device("cpu"))
    with pytest.raises(ValueError, match="d_in"):
        SAeUronHook(sae, table, path="fast", check_sae=False)(torch.randn(1, SMALL["d"] + 1, 2, 2), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_outputs_are_not_overwritten_and_follow_the_step():
    sae = random_sae(**MEDIUM, seed=25, device="cuda")
    table = random_table(sae, steps=3, per_step=4, seed=26)
    fast, screened = pair(sae, table)
    assert fast._fast == {} and fast.uses_fast(torch.device("cuda"))
    x = torch.randn(2, MEDIUM["d"], 8, 8, generator=torch.Generator().manual_seed(27)).cuda()
    outs = [fast(x, t) for t in (0, 1, 2, 1)]
    kept = [o.clone() for o in outs]
    fast(x, 0)
    for t, o, k in zip((0, 1, 2, 1), outs, kept):
        assert torch.equal(o, k)
        torch.testing.assert_close(o, screened(x, t), rtol=1e-5, atol=1e-5)
    assert fast._fast[x.device].graphs and len(fast._fast[x.device]._captured) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("count", [True, False], ids=["count", "topk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_sd15_shape(dtype, count):
    """SAeUron's real shape: 2 x 1280 x 16 x 16 block output, 20480 latents, k 32."""
    sae = random_sae(d=1280, n=20480, k=32, seed=28, device="cuda")
    table = random_table(sae, steps=2, per_step=8, seed=29, thr=0.01)
    fast, screened = pair(sae, table)
    x = torch.randn(2, 1280, 16, 16, generator=torch.Generator().manual_seed(30)).cuda().to(dtype)
    decide_by(fast, x, count)
    edited = 0
    for t in range(2):
        y_fast, y_ref = fast(x, t), screened(x, t)
        assert_same(fast, y_fast, screened, y_ref, tol=1e-5 if dtype == torch.float32 else 2.0**-7)
        edited += int(screened.last_fired.sum())
    assert edited > 0
    assert fast._fast[x.device].mode == "graph"
