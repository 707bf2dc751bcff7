"""The Triton selective scan against the naive loop: outputs and every gradient.

Without a GPU the kernels run in Triton's interpreter; shapes are kept small
so the whole file takes well under two minutes on a CPU.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["MAMBATRAIN_KERNEL_DEBUG"] = "1"
# on a GPU: one config per kernel instead of autotuning every shape and flag set
os.environ.setdefault("MAMBATRAIN_AUTOTUNE", "0")

import mambatrain_kernels.selective_scan.triton as sst  # noqa: E402
from mambatrain_kernels import settings as kernel_settings  # noqa: E402
from mambatrain_kernels.selective_scan import selective_scan, selective_scan_naive  # noqa: E402
from compare import assert_close, rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fold_along_axis(self, inputs):
    """Triton 3.x interpreter's generic scan, one slice along the axis at a time.

    The stock version calls the combine function once per element from Python
    (seconds per tile); this is the same left fold, on whole slices.
    """
    datas = [t.handle.data for t in inputs]
    dtypes = [t.dtype for t in inputs]
    outs = [np.empty_like(d) for d in datas]
    acc = None
    for i in range(datas[0].shape[self.axis]):
        cur = [np.take(d, i, axis=self.axis) for d in datas]
        if acc is None:
            acc = cur
        else:
            ret = self.combine_fn.fn(*(self.to_tensor(a, dt) for a, dt in zip(acc, dtypes)),
                                     *(self.to_tensor(c, dt) for c, dt in zip(cur, dtypes)))
            ret = ret if isinstance(ret, tuple) else (ret,)
            acc = [np.broadcast_to(r.handle.data, c.shape).astype(c.dtype) for r, c in zip(ret, cur)]
        for o, a in zip(outs, acc):
            idx = [slice(None)] * o.ndim
            idx[self.axis] = i
            o[tuple(idx)] = a
    return [self.to_tensor(o, dt) for o, dt in zip(outs, dtypes)]


def _reduce_along_axis(self, inputs):
    """The interpreter's generic reduction (tl.flip's xor-sum uses it), slice-wise."""
    original_axis = self.axis
    inputs, axis = self.unravel(inputs, self.axis)
    datas = [t.handle.data for t in inputs]
    dtypes = [t.dtype for t in inputs]
    acc = None
    for i in range(datas[0].shape[axis]):
        cur = [np.take(d, i, axis=axis) for d in datas]
        if acc is None:
            acc = cur
            continue
        ret = self.combine_fn.fn(*(self.to_tensor(a, dt) for a, dt in zip(acc, dtypes)),
                                 *(self.to_tensor(c, dt) for c, dt in zip(cur, dtypes)))
        ret = ret if isinstance(ret, tuple) else (ret,)
        acc = [np.broadcast_to(r.handle.data, c.shape).astype(c.dtype) for r, c in zip(ret, cur)]
    out = []
    for a, dt in zip(acc, dtypes):
        if self.keep_dims:
            a = np.expand_dims(a, axis) if original_axis is not None else a.reshape((1,) * datas[0].ndim)
        elif original_axis is None:
            a = a.item()
        out.append(self.to_tensor(a, dt))
    return out


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter

    _STOCK_SCAN = interpreter.ScanOps.generic_scan
    _STOCK_REDUCE = interpreter.ReduceOps.generic_reduce
    interpreter.ScanOps.generic_scan = _fold_along_axis
    interpreter.ReduceOps.generic_reduce = _reduce_along_axis
# outputs the host allocates start as NaN: an unwritten element fails a test
kernel_settings.DEBUG_NAN = True

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(batch, length, channels, groups, d_state, *, z=True, D=True, bias=True, h0=True, seq=True,
                dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    if strided:  # x, z, dt sliced out of one projection, B and C out of another
        proj = randn(batch, length, 3 * channels + 5)
        x, zz, dt = proj[..., :channels], proj[..., channels:2 * channels], proj[..., 2 * channels + 5:]
        dt = dt * 0.5 - 1.0 if bias else torch.nn.functional.softplus(dt - 1.0)
        bc = randn(batch, length, groups, 2 * d_state + 3)
        B, C = bc[..., :d_state], bc[..., d_state + 3:]
    else:
        x, zz = randn(batch, length, channels), randn(batch, length, channels)
        # with softplus: a raw dt; without: already in softplus range
        dt = randn(batch, length, channels, scale=0.5, shift=-1.0)
        if not bias:
            dt = torch.nn.functional.softplus(dt)
        B, C = randn(batch, length, groups, d_state), randn(batch, length, groups, d_state)
    inputs = {
        "x": x, "dt": dt, "A": -torch.exp(randn(channels, d_state)), "B": B, "C": C,
        "D": randn(channels) if D else None,
        "z": zz if z else None,
        "dt_bias": randn(channels, scale=0.5) if bias else None,
        "initial_state": randn(batch, channels, d_state) if h0 else None,
    }
    cast = {"x", "dt", "B", "C", "z"}
    inputs = {k: (v.to(dtype) if k in cast and v is not None else v) for k, v in inputs.items()}
    seq_idx = None
    if seq:  # a few documents per row, boundaries at random places
        seq_idx = torch.sort(torch.randint(0, 4, (batch, length), generator=g), dim=1).values.to(torch.int32)
    return inputs, seq_idx


def leafs(inputs, dtype=None):
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
            continue
        v = v.detach().to(DEVICE)
        if dtype is not None:
            v = v.to(dtype)
        out[k] = v.requires_grad_()
    return out


def run(fn, inputs, seq_idx, softplus, gy, gh):
    y, hT = fn(**inputs, dt_softplus=softplus, seq_idx=seq_idx, return_final_state=True)
    grads = [gy.to(y.dtype)]
    outs = [y]
    if gh is not None:
        outs.append(hT)
        grads.append(gh.to(hT.dtype))
    torch.autograd.backward(outs, grads)
    return y, hT, {k: v.grad for k, v in inputs.items() if v is not None}


def check(batch, length, channels, groups, d_state, dtype=torch.float32, tol=1e-5, dhT=True, **kw):
    softplus = kw.get("bias", True)
    inputs, seq_idx = make_inputs(batch, length, channels, groups, d_state, dtype=dtype, **kw)
    seq_dev = seq_idx.to(DEVICE) if seq_idx is not None else None
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(batch, length, channels, generator=gen)
    gh = torch.randn(batch, channels, d_state, generator=gen) if dhT else None

    tri = leafs(inputs)
    y, hT, grads = run(selective_scan, tri, seq_dev, softplus, gy.to(DEVICE), None if gh is None else gh.to(DEVICE))
    # the reference sees the very same (possibly bf16-rounded) values, in float64
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y_ref, hT_ref, grads_ref = run(selective_scan_naive, ref, seq_idx, softplus, gy.double(),
                                   None if gh is None else gh.double())

    assert y.dtype == inputs["x"].dtype and hT.dtype == torch.float32
    for k in grads_ref:
        assert grads[k].shape == inputs[k].shape and grads[k].dtype == inputs[k].dtype, k
    return assert_close({"y": y, "final_state": hT, **{"d" + k: grads[k] for k in grads_ref}},
                        {"y": y_ref, "final_state": hT_ref, **{"d" + k: v for k, v in grads_ref.items()}}, tol)


@pytest.mark.parametrize("length", [1, 17, 255, 256])
def test_lengths_fp32(length):
    check(2, length, 16, 2, 8)


def test_long_fp32_multi_segment(monkeypatch):
    # 1000 steps over segments of 128: the backward recomputes 8 segments
    monkeypatch.setattr(sst, "CHECKPOINT_STEPS", 128)
    check(1, 1000, 16, 2, 8)


def test_long_fp32_one_segment():
    check(1, 1000, 8, 1, 16)


@pytest.mark.parametrize("walk", [False, True], ids=["parallel_segments", "walked_segments"])
def test_segments_boundaries(monkeypatch, walk):
    # segment boundaries inside documents, a last segment of one step; the
    # forward's segments in parallel (passes 1-3) or walked by one program each
    monkeypatch.setattr(sst, "CHECKPOINT_STEPS", 64)
    monkeypatch.setattr(sst, "FWD_WALK_CHANNELS", 0 if walk else 1 << 62)
    check(2, 193, 8, 1, 4)


@pytest.mark.parametrize("rounds,walk", [((1, 1, 1), False), ((1, 3, 2), False), ((2, 4, 3), True), ((2, 4, 1), False)],
                         ids=["1-1-1", "1-3-2", "2-4-3-walk", "2-4-1"])
def test_documents_at_segment_starts(monkeypatch, rounds, walk):
    # documents that start exactly where a segment does (the segment's decay
    # product must be zero) or one step later; the backward's pass C in rounds
    # of (rows, segments) with NG programs along them: one row and segment a
    # round, rounds of 3 segments (the last of 1), whole batches, programs
    # taking several segments each (scratch reused); the forward walking
    monkeypatch.setattr(sst, "CHECKPOINT_STEPS", 64)
    monkeypatch.setattr(sst, "FWD_WALK_CHANNELS", 0 if walk else 1 << 62)
    monkeypatch.setattr(sst, "_bwd_block_d", lambda gsize: 4)
    monkeypatch.setattr(sst, "_bwd_rounds", lambda batch, nblk, d_state, nseg: rounds)
    inputs, _ = make_inputs(2, 200, 16, 1, 4)
    seq_idx = torch.zeros(2, 200, dtype=torch.int32)
    seq_idx[0, 64:] += 1
    seq_idx[0, 129:] += 1
    seq_idx[1, 128:] += 1
    seq_idx[1, 150:] += 1
    softplus = True
    gy = torch.randn(2, 200, 16, generator=torch.Generator().manual_seed(3))
    gh = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(4))
    tri = leafs(inputs)
    y, hT, grads = run(selective_scan, tri, seq_idx.to(DEVICE), softplus, gy.to(DEVICE), gh.to(DEVICE))
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y_ref, hT_ref, grads_ref = run(selective_scan_naive, ref, seq_idx, softplus, gy.double(), gh.double())
    assert rel(y, y_ref) < 1e-5 and rel(hT, hT_ref) < 1e-5
    for k in grads_ref:
        assert not torch.isnan(grads[k]).any(), k
        assert rel(grads[k], grads_ref[k]) < 1e-5, k


@pytest.mark.parametrize(
    "opts",
    [
        dict(z=False, D=False, bias=False, h0=False, seq=False),
        dict(z=True, D=False, bias=False, h0=True, seq=False),
        dict(z=False, D=True, bias=True, h0=False, seq=True),
    ],
    ids=["plain", "z-h0", "D-bias-seq"],
)
def test_optional_inputs(opts):
    check(2, 45, 16, 1, 8, **opts)


@pytest.mark.parametrize(
    "batch,channels,groups,d_state",
    [(1, 8, 8, 4), (3, 12, 4, 5), (1, 64, 2, 16)],
    ids=["group-per-channel", "odd-sizes", "wide"],
)
def test_shapes(batch, channels, groups, d_state):
    check(batch, 23, channels, groups, d_state)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter: swaps the single config")
@pytest.mark.parametrize("bt,ni", [(16, 1), (64, 4), (16, 8)], ids=["bt16-ni1", "bt64-ni4", "bt16-ni8"])
def test_tile_configs(monkeypatch, bt, ni):
    # other tile shapes than the interpreter's default config: time tiles of
    # 16 and 64 steps, 1, 4 or 8 states per thread
    import triton

    fwd = [triton.Config({"BT": bt, "BD": 8, "NI": ni}, num_warps=1)]
    bwd = [triton.Config({"BT": bt, "NI": ni}, num_warps=1)]
    monkeypatch.setattr(sst, "_FWD_CONFIGS", fwd)
    monkeypatch.setattr(sst, "_BWD_CONFIGS", bwd)
    monkeypatch.setattr(sst, "_BWD_C_CONFIGS", bwd)
    monkeypatch.setattr(sst._fwd_kernel, "configs", fwd)
    monkeypatch.setattr(sst._bwd_kernel, "configs", bwd)
    monkeypatch.setattr(sst, "CHECKPOINT_STEPS", 128)
    check(2, 160, 16, 2, 8)


def test_strided_inputs():
    check(2, 40, 16, 2, 8, strided=True)


def test_no_final_state_gradient():
    check(2, 40, 16, 2, 8, dhT=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    errs = check(2, 50, 16, 2, 8, dtype=dtype, tol=1e-2)
    assert errs["y"] < 1e-2


def test_return_types():
    inputs, _ = make_inputs(1, 5, 8, 1, 4, seq=False)
    inputs = {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()}
    y = selective_scan(**inputs)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 5, 8)
    y2, hT = selective_scan(**inputs, return_final_state=True)
    assert torch.equal(y, y2) and hT.shape == (1, 8, 4) and hT.dtype == torch.float32


def test_refuses_float64():
    """float64 would run in fp32 and come back as float64, quietly 1e-7 off: the kernels refuse it, as the
    other ops' do (float64 takes selective_scan_naive)."""
    inputs, _ = make_inputs(1, 5, 8, 1, 4, seq=False)
    inputs = {k: (v.to(DEVICE, torch.float64) if v is not None else None) for k, v in inputs.items()}
    with pytest.raises(TypeError, match="float64"):
        selective_scan(**inputs)


def test_refuses_seq_idx_of_another_length():
    """A seq_idx shorter than the sequence would be read past its end by the kernels."""
    inputs, seq_idx = make_inputs(1, 20, 8, 1, 4)
    inputs = {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()}
    with pytest.raises(ValueError, match="seq_idx must be"):
        selective_scan(**inputs, seq_idx=seq_idx.to(DEVICE)[:, :10])


@pytest.mark.parametrize("batch,nblk,nseg", [(1, 96, 2048), (256, 96, 8), (4, 96, 2048), (1, 96, 3), (512, 96, 1),
                                              (2, 8192, 64)])
def test_backward_rounds_cover_everything_within_bounds(batch, nblk, nseg):
    # pass C's rounds: every (row, segment) in exactly one round; partial sums and programs within their bounds
    rows, segs, ng = sst._bwd_rounds(batch, nblk, 16, nseg)
    unit = sst.CHECKPOINT_STEPS * nblk * 16 * 8
    assert 1 <= rows <= batch and 1 <= ng <= segs <= nseg
    assert rows * segs * unit <= max(sst.BWD_ROUND_BYTES, ng * unit)
    assert nblk * rows * ng <= max(sst.BWD_PROGRAMS, nblk)
    covered = [(b, s) for b0 in range(0, batch, rows) for s0 in range(0, nseg, segs)
               for b in range(b0, min(batch, b0 + rows)) for s in range(s0, min(nseg, s0 + segs))]
    assert sorted(covered) == [(b, s) for b in range(batch) for s in range(nseg)]


def test_deterministic():
    inputs, seq_idx = make_inputs(2, 40, 16, 2, 8)
    gy = torch.randn(2, 40, 16).to(DEVICE)
    runs = []
    for _ in range(2):
        tri = leafs(inputs)
        y, _, grads = run(selective_scan, tri, seq_idx.to(DEVICE), True, gy, None)
        runs.append((y, grads))
    assert torch.equal(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


def test_torch_compile_fullgraph():
    # tracing is what is checked: aot_eager runs the custom ops as they are
    inputs, seq_idx = make_inputs(1, 20, 8, 1, 4)
    tri = leafs(inputs)
    seq_dev = seq_idx.to(DEVICE)

    def f(x, dt, A, B, C, D, z, dt_bias, initial_state):
        y, h = selective_scan(x, dt, A, B, C, D, z, dt_bias, True, initial_state, seq_dev, True)
        return y.sum() + h.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(*tri.values())
    out.backward()
    got = {k: v.grad.clone() for k, v in tri.items()}
    tri2 = leafs(inputs)
    ref = f(*tri2.values())
    ref.backward()
    assert torch.allclose(out, ref)
    for k in got:
        assert torch.equal(got[k], tri2[k].grad), k


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_fast_interpreter_scan_matches_stock():
    # the slice-wise folds this module installs give what Triton's own do
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def scan3(a, b, c, oa, ob, oc, REV: tl.constexpr):
        o = tl.arange(0, 8)[:, None, None] * 8 + tl.arange(0, 2)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
        ra, rb, rc = tl.associative_scan((tl.load(a + o), tl.load(b + o), tl.load(c + o)), 0,
                                         sst._adjoint_combine, reverse=REV)
        tl.store(oa + o, tl.flip(ra, 0))
        tl.store(ob + o, rb)
        tl.store(oc + o, rc)

    ins = [torch.rand(8, 2, 4) + 0.5 for _ in range(3)]
    for rev in (False, True):
        got = [torch.empty(8, 2, 4) for _ in range(3)]
        scan3[(1,)](*ins, *got, rev)
        stock = [torch.empty(8, 2, 4) for _ in range(3)]
        try:
            interpreter.ScanOps.generic_scan = _STOCK_SCAN
            interpreter.ReduceOps.generic_reduce = _STOCK_REDUCE
            scan3[(1,)](*ins, *stock, rev)
        finally:
            interpreter.ScanOps.generic_scan = _fold_along_axis
            interpreter.ReduceOps.generic_reduce = _reduce_along_axis
        for g, s in zip(got, stock):
            assert torch.equal(g, s)
