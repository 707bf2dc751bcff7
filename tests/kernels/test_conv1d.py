"""The fused causal conv1d + SiLU (Triton) against its naive twin: outputs and every gradient.

The naive loop runs on float64 copies of the very inputs the kernel sees
(bf16-rounded ones included), so the error measured is the kernel's own. The
naive loop is in turn held equal to the model's PyTorch path
(``silu(causal_conv1d(...))``). Without a GPU the kernels run in Triton's
interpreter; shapes are small so the file takes seconds.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["MAMBATRAIN_KERNEL_DEBUG"] = "1"
# on a GPU: one config per kernel instead of autotuning every shape and flag set
os.environ.setdefault("MAMBATRAIN_AUTOTUNE", "0")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mambatrain_kernels.conv1d.triton as ct  # noqa: E402
from mambatrain_kernels import settings as kernel_settings  # noqa: E402
from mambatrain.models import scan  # noqa: E402
from mambatrain_kernels.conv1d import causal_conv1d_silu, causal_conv1d_silu_naive  # noqa: E402
from compare import assert_close, assert_compiles_like_eager  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ("x", "weight", "bias", "prefix")
# outputs the host allocates start as NaN: an unwritten element fails a test
kernel_settings.DEBUG_NAN = True


def make_inputs(batch, length, channels, width, dtype=torch.float32, *, bias=True, prefix=True, seq=None,
                strided=False, device=DEVICE):
    """Random inputs; ``seq`` lists the steps of x where a new document starts (0: right after the prefix).

    Row b of seq_idx has its boundaries b steps later, so rows differ.
    """
    g = torch.Generator().manual_seed(zlib.crc32(repr((batch, length, channels, width, dtype, seq)).encode()))
    if strided == "aligned":  # rows 16-byte aligned, stride not a multiple of 16: as xBC in the 130M Mamba-2
        x = torch.randn(batch, length, channels + 8, generator=g)[..., 8:8 + channels]
    elif strided:  # a slice of a wider projection, odd offset and stride
        x = torch.randn(batch, length, channels + 9, generator=g)[..., 5:5 + channels]
    else:
        x = torch.randn(batch, length, channels, generator=g)
    inp = dict(
        x=x.to(dtype),
        weight=torch.randn(channels, width, generator=g) / width ** 0.5,
        bias=torch.randn(channels, generator=g) if bias else None,
        prefix=torch.randn(batch, width - 1, channels, generator=g).to(dtype) if prefix else None,
    )
    seq_idx = None
    if seq is not None:
        p = width - 1 if prefix else 0
        seq_idx = torch.zeros(batch, p + length, dtype=torch.int32)
        for b in range(batch):
            for t in seq:
                seq_idx[b, p + min(t + b, length):] += 1
        seq_idx = seq_idx.to(device)
    return {k: v.to(device) if v is not None else None for k, v in inp.items()}, seq_idx


def run(fn, inp, seq_idx, gy):
    """Output and input gradients of ``fn`` under the output gradient gy."""
    # detach() keeps the strides of views (clone() would not)
    leaves = {k: v.detach().requires_grad_() if v is not None else None for k, v in inp.items()}
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], seq_idx, leaves["prefix"])
    assert y.dtype == inp["x"].dtype and y.shape == inp["x"].shape
    (y.to(gy.dtype) * gy).sum().backward()
    for k, v in leaves.items():
        if v is not None:
            assert v.grad.shape == v.shape and v.grad.dtype == v.dtype, k
    return y, {k: v.grad for k, v in leaves.items() if v is not None}


def reference(inp, seq_idx):
    """(output gradient, naive output and gradients in float64)."""
    torch.manual_seed(0)
    gy = torch.randn(inp["x"].shape, device=inp["x"].device)
    # the gradient reaching a bf16 output is bf16: compare kernels, not that rounding
    gy = gy.to(inp["x"].dtype).float()
    inp64 = {k: v.double() if v is not None else None for k, v in inp.items()}
    return gy, run(causal_conv1d_silu_naive, inp64, seq_idx, gy.double())


def check(inp, seq_idx, tol):
    gy, (y0, g0) = reference(inp, seq_idx)
    y, g = run(causal_conv1d_silu, inp, seq_idx, gy)
    return assert_close({"y": y, **{"d" + k: g[k] for k in g0}}, {"y": y0, **{"d" + k: v for k, v in g0.items()}},
                        tol)


CASES = [
    # (batch, length, channels, width, dtype, options)
    (2, 1, 40, 4, torch.float32, dict(seq=[0])),
    (2, 2, 40, 4, torch.float32, dict(seq=[1])),  # shorter than the prefix
    (2, 17, 40, 4, torch.float32, dict(seq=[0, 5, 6])),  # a one-step document
    (2, 17, 100, 4, torch.float32, dict(bias=False, prefix=False)),
    (1, 255, 100, 3, torch.float32, dict(bias=False, prefix=False, seq=[64, 100], strided=True)),
    (2, 255, 100, 2, torch.float32, dict(strided="aligned")),
    (1, 1000, 40, 4, torch.float32, dict(seq=[1, 2, 500, 998], strided=True)),
    (1, 50, 40, 6, torch.float32, dict(seq=[0, 3, 30])),
    (2, 255, 100, 4, torch.bfloat16, dict(seq=[0, 64, 200], strided=True)),
    (1, 1000, 40, 3, torch.bfloat16, dict(bias=False, prefix=False, seq=[300])),
    (1, 100, 40, 4, torch.float16, dict(strided=True)),
    # lengths at the backward's block edges (BT = 32 in the interpreter), W-1 rows and one row
    (1, 1, 40, 4, torch.float32, dict(prefix=False)),
    (2, 3, 40, 4, torch.float32, dict(seq=[2])),
    (1, 32, 40, 4, torch.float32, dict(prefix=False)),
    (1, 29, 40, 4, torch.float32, dict(seq=[1])),  # 32 rows of xin with the prefix
    (1, 33, 40, 2, torch.bfloat16, dict(bias=False)),
]


def _id(case):
    b, t, c, w, dtype, o = case
    return f"b{b}-T{t}-C{c}-W{w}-{str(dtype)[6:]}-" + "-".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_naive(case):
    batch, length, channels, width, dtype, opts = case
    inp, seq_idx = make_inputs(batch, length, channels, width, dtype, **opts)
    check(inp, seq_idx, TOL[dtype])


WALK_CASES = [c for c in CASES if c[3] <= ct.WALK_MAX_WIDTH]  # widths whose backward walks by default


@pytest.mark.parametrize("case", WALK_CASES, ids=[_id(c) for c in WALK_CASES])
def test_block_backward_matches_naive(case, monkeypatch):
    """MAMBATRAIN_CONV1D_WALK_BWD=0: the block backward at the widths the walk takes by default (the walk must
    not run)."""
    class _Refused:
        def __getitem__(self, grid):
            raise AssertionError("the walk backward ran")

    monkeypatch.setattr(ct, "WALK_BWD", False)
    monkeypatch.setattr(ct, "conv1d_silu_bwd_walk_kernel", _Refused())
    batch, length, channels, width, dtype, opts = case
    inp, seq_idx = make_inputs(batch, length, channels, width, dtype, **opts)
    check(inp, seq_idx, TOL[dtype])


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "no-prefix"])
def test_walk_backward_chunk_edges(width, prefix, monkeypatch):
    """The walk's chunks (here 64 rows: several programs per batch row) with documents starting on, just before
    and just after their edges; each program owns its rows' dweight pairs and dx."""
    monkeypatch.setattr(ct, "WALK_PROGRAMS", 10**6)
    monkeypatch.setattr(ct, "WALK_ALIGN", 64)
    p = width - 1 if prefix else 0
    starts = [63, 64, 65, 127, 129]  # rows of xin, batch row 0
    inp, seq_idx = make_inputs(3, 150, 40, width, prefix=prefix, seq=[r - p for r in starts])
    check(inp, seq_idx, TOL[torch.float32])


def test_boundary_at_start_cuts_the_prefix_off():
    """A document starting at x's first step: the prefix gets no gradient and changes no output."""
    inp, seq_idx = make_inputs(2, 9, 40, 4, seq=[0])
    seq_idx[1] = 0  # the second row continues the prefix's document
    gy, _ = reference(inp, seq_idx)
    y, g = run(causal_conv1d_silu, inp, seq_idx, gy)
    assert torch.equal(g["prefix"][0], torch.zeros_like(g["prefix"][0]))
    assert g["prefix"][1].abs().min() > 0
    y_fresh, _ = run(causal_conv1d_silu, {**inp, "prefix": None}, seq_idx[:, 3:], gy)
    assert torch.equal(y[0], y_fresh[0]) and not torch.equal(y[1], y_fresh[1])


def test_empty_length():
    inp, _ = make_inputs(2, 0, 40, 4)
    y, g = run(causal_conv1d_silu, inp, None, torch.zeros(2, 0, 40, device=DEVICE))
    assert y.shape == (2, 0, 40)
    for k, v in g.items():
        assert torch.equal(v, torch.zeros_like(v)), k


@pytest.mark.parametrize("fwd,bwd,programs", [((16, 16), (16, 32), 1), ((128, 32), (64, 16), 10**6)],
                         ids=["small-tiles-one-chunk", "large-tiles-many-chunks"])
def test_tile_configs(monkeypatch, fwd, bwd, programs):
    """Other tile shapes than the default config; the backward in one chunk per row, or one block per chunk."""
    import triton

    monkeypatch.setattr(ct, "WALK_BWD", False)  # the block backward's tiles

    fwd_cfg = [triton.Config({"BT": fwd[0], "BC": fwd[1]}, num_warps=4)]
    bwd_cfg = [triton.Config({"BT": bwd[0], "BC": bwd[1]}, num_warps=4)]
    monkeypatch.setattr(ct, "BWD_CONFIGS", bwd_cfg)
    monkeypatch.setattr(ct.conv1d_silu_fwd_kernel, "configs", fwd_cfg)
    monkeypatch.setattr(ct.conv1d_silu_bwd_kernel, "configs", bwd_cfg)
    monkeypatch.setattr(ct, "BWD_PROGRAMS", programs)
    monkeypatch.setattr(ct, "CHUNK_ALIGN", bwd[0])
    inp, seq_idx = make_inputs(2, 150, 40, 5, seq=[0, 70])
    check(inp, seq_idx, TOL[torch.float32])


@pytest.mark.parametrize("width", [4, 6])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "no-prefix"])
def test_documents_at_block_edges(width, prefix, monkeypatch):
    """Documents starting on, just before and just after the block backward's block and chunk edges.

    The block backward reads dpre of a block and of the W-1 rows after it (its halo) from scratch shifted by
    k rows: a document starting inside the halo or on the first row of the next block or chunk must cut
    exactly the taps that cross it. Batch row b has its boundaries b steps later.
    """
    monkeypatch.setattr(ct, "WALK_BWD", False)
    bt = ct.BWD_CONFIGS[0].kwargs["BT"]
    p = width - 1 if prefix else 0
    starts = [bt - 2, ct.CHUNK_ALIGN - 2]  # rows of xin, batch row 0
    inp, seq_idx = make_inputs(4, ct.CHUNK_ALIGN + bt + 7, 40, width, prefix=prefix, seq=[r - p for r in starts])
    check(inp, seq_idx, TOL[torch.float32])


def test_strided_bias():
    """A bias that is a view with a stride (a slice, an expanded scalar) is read as such, not as a
    contiguous vector."""
    inp, seq_idx = make_inputs(2, 20, 8, 4, seq=[5])
    inp["bias"] = torch.randn(16, device=DEVICE)[::2]
    check(inp, seq_idx, TOL[torch.float32])


def test_deterministic():
    """Two backward passes give bitwise equal gradients (no float atomics)."""
    inp, seq_idx = make_inputs(2, 150, 100, 4, torch.bfloat16, seq=[100])
    gy = torch.randn(inp["x"].shape, device=DEVICE)
    first, second = run(causal_conv1d_silu, inp, seq_idx, gy), run(causal_conv1d_silu, inp, seq_idx, gy)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


def test_rejects_bad_shapes():
    inp, seq_idx = make_inputs(1, 10, 8, 4, seq=[3])
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d_silu(inp["x"], inp["weight"], inp["bias"], seq_idx[:, 3:], inp["prefix"])
    with pytest.raises(ValueError, match="prefix"):
        causal_conv1d_silu(inp["x"], inp["weight"], inp["bias"], None, inp["prefix"][:, 1:])


def test_torch_compile_fullgraph():
    """torch.compile traces through the custom op without graph breaks, forward and backward."""
    inp, seq_idx = make_inputs(1, 40, 40, 4, seq=[0, 20])

    def f(x, weight, bias, prefix):
        return (causal_conv1d_silu(x, weight, bias, seq_idx, prefix) ** 2).sum()

    assert_compiles_like_eager(f, {k: inp[k] for k in NAMES})


@pytest.mark.parametrize("op", ["conv1d_silu_fwd", "conv1d_silu_bwd"])
def test_fake_matches_real(op):
    """Each custom op passes torch.library.opcheck: its fake (what torch.compile plans with) gives the real
    outputs' shapes, dtypes and strides; an fp32 dweight once came back as a transposed view."""
    inp, seq_idx = make_inputs(2, 20, 8, 4, seq=[5])
    args = (inp["x"], inp["weight"], inp["bias"], seq_idx, inp["prefix"])
    if op == "conv1d_silu_bwd":
        args = (torch.randn_like(inp["x"]), *args)
    torch.library.opcheck(getattr(torch.ops.mambatrain, op), args)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("bias,prefix,seq", [(True, True, [0, 4]), (False, False, [2, 9]), (True, False, None),
                                             (True, True, None)], ids=["prefix-docs", "docs", "plain", "prefix"])
def test_naive_equals_model_path(width, bias, prefix, seq):
    """The naive loop is the model's PyTorch path, silu(causal_conv1d(...)), in float64 (gradients too)."""
    inp, seq_idx = make_inputs(2, 13, 24, width, torch.float64, bias=bias, prefix=prefix, seq=seq, device="cpu")
    conv = nn.Conv1d(24, 24, width, groups=24, bias=bias).double()
    gy = torch.randn(inp["x"].shape, dtype=torch.float64)
    y0, g0 = run(causal_conv1d_silu_naive, {**inp, "weight": conv.weight[:, 0], "bias": conv.bias}, seq_idx, gy)
    x, pre = (inp[k].clone().requires_grad_() if inp[k] is not None else None for k in ("x", "prefix"))
    y1 = F.silu(scan.causal_conv1d(x, conv, seq_idx, pre))
    (y1 * gy).sum().backward()
    g1 = dict(x=x.grad, weight=conv.weight.grad[:, 0], bias=conv.bias.grad if bias else None,
              prefix=pre.grad if prefix else None)
    torch.testing.assert_close(y0, y1, rtol=1e-12, atol=1e-12)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-12, atol=1e-12)


def test_model_dispatch_uses_the_conv_module():
    """scan.conv1d_silu: backend triton (the kernel) and reference (the PyTorch path) agree, gradients too."""
    inp, seq_idx = make_inputs(2, 30, 40, 4, seq=[0, 11])
    conv = nn.Conv1d(40, 40, 4, groups=40).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        conv.zero_grad()
        x, prefix = inp["x"].clone().requires_grad_(), inp["prefix"].clone().requires_grad_()
        y = scan.conv1d_silu(backend, x, conv, seq_idx, prefix)
        (y * y).sum().backward()
        results[backend] = (y, x.grad, prefix.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles each autotune config for the GPU at hand")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_autotune_config(monkeypatch, dtype):
    """Autotuning picks one config per shape: every config of the GPU space must be right."""
    import triton

    def make(d):
        d = dict(d)
        return triton.Config(d, num_warps=d.pop("num_warps"), num_stages=1)

    fwd_space, bwd_space = [make(d) for d in ct._FWD_SPACE], [make(d) for d in ct._BWD_SPACE]
    inp, seq_idx = make_inputs(2, 1000, 1792, 4, dtype, seq=[0, 300, 512], strided="aligned")
    monkeypatch.setattr(ct, "WALK_BWD", False)  # every config of the block backward
    for r in range(max(len(fwd_space), len(bwd_space))):
        fwd, bwd = [fwd_space[r % len(fwd_space)]], [bwd_space[r % len(bwd_space)]]
        monkeypatch.setattr(ct, "BWD_CONFIGS", bwd)
        monkeypatch.setattr(ct.conv1d_silu_fwd_kernel, "configs", fwd)
        monkeypatch.setattr(ct.conv1d_silu_bwd_kernel, "configs", bwd)
        check(inp, seq_idx, TOL[dtype])
    monkeypatch.setattr(ct, "WALK_BWD", True)  # and every config of the row-walk backward
    for cfg in [make(d) for d in ct._WALK_SPACE]:
        monkeypatch.setattr(ct.conv1d_silu_bwd_walk_kernel, "configs", [cfg])
        check(inp, seq_idx, TOL[dtype])
