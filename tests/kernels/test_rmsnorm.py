"""The fused norms (``rms_norm``, ``gated_rms_norm``) equal their naive twins, which equal the model's norms.

Outputs and the gradient of every input under a random output gradient are
compared with the naive reference run on float64 copies of the inputs.
Without a GPU the Triton kernels run in Triton's interpreter.
"""

import logging
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from mambatrain.models import backend  # noqa: E402
from mambatrain.models.blocks.norm import GatedRMSNorm, RMSNorm  # noqa: E402
from mambatrain_kernels.rmsnorm import gated_rms_norm, gated_rms_norm_naive, rms_norm, rms_norm_naive  # noqa: E402
from mambatrain_kernels import settings as kernel_settings  # noqa: E402
from compare import assert_close, assert_compiles_like_eager, rel  # noqa: E402

# outputs the host allocates start as NaN: an unwritten element fails a test
kernel_settings.DEBUG_NAN = True

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _tensor(shape, dtype, strided):
    """A random tensor, or a slice of the last dim of a wider one (as z is of the in-projection)."""
    if strided:
        return torch.randn(*shape[:-1], shape[-1] + 7, device=DEVICE).to(dtype)[..., 3:3 + shape[-1]]
    return torch.randn(*shape, device=DEVICE).to(dtype)


def make_inputs(lead, dim, dtype, gated, strided):
    torch.manual_seed(zlib.crc32(repr((lead, dim, dtype, gated, strided)).encode()))
    return dict(
        y=_tensor((*lead, dim), dtype, strided),
        z=_tensor((*lead, dim), dtype, strided) if gated else None,
        weight=1 + 0.5 * torch.randn(dim, device=DEVICE),
    )


def run(fn, inp, grad, **kw):
    """Output and input gradients of ``fn`` under the output gradient ``grad``."""
    # detach() keeps the strides of views (clone() would not)
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items() if v is not None}
    out = fn(leaves["y"], leaves.get("z"), leaves["weight"], **kw)
    assert out.dtype == inp["y"].dtype and out.shape == inp["y"].shape
    (out.double() * grad).sum().backward()
    for k, v in leaves.items():
        assert v.grad.shape == v.shape and v.grad.dtype == v.dtype, k
    return out, {k: v.grad for k, v in leaves.items()}


def reference(inp, **kw):
    """The output gradient (fixed per shape) and the naive norm's results in float64."""
    torch.manual_seed(0)
    grad = torch.randn(inp["y"].shape, device=DEVICE).to(inp["y"].dtype).double()  # the kernels get it rounded
    inp64 = {k: v.double() if v is not None else None for k, v in inp.items()}
    return grad, run(gated_rms_norm_naive, inp64, grad, **kw)


def check(got, ref, tol):
    (out, grads), (out0, grads0) = got, ref
    return assert_close({"out": out, **{"d" + k: grads[k] for k in grads0}},
                        {"out": out0, **{"d" + k: v for k, v in grads0.items()}}, tol)


def plain(y, z, weight, eps=1e-5, group_size=None):
    assert z is None and group_size is None
    return rms_norm(y, weight, eps)


CASES = [
    # (leading dims, dim, group_size (None: plain RMSNorm), dtype, strided)
    ((1,), 40, None, torch.float32, False),
    ((17,), 100, None, torch.float32, True),
    ((2, 500), 768, None, torch.float32, False),
    ((1,), 40, 40, torch.float32, False),
    ((17,), 100, 50, torch.float32, True),
    ((3, 333), 768, 192, torch.float32, True),
    ((2,), 8192, None, torch.float32, False),
    ((3,), 8192, 4096, torch.float32, True),
    ((17,), 768, None, torch.bfloat16, True),
    ((2, 17), 768, 384, torch.bfloat16, True),
    ((1000,), 100, 25, torch.bfloat16, False),
    ((33,), 256, 64, torch.float16, True),
]


def _id(case):
    lead, dim, group, dtype, strided = case
    kind = "plain" if group is None else f"gated{group}"
    return f"{'x'.join(map(str, lead))}-d{dim}-{kind}-{str(dtype)[6:]}" + ("-strided" if strided else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_naive(case):
    lead, dim, group, dtype, strided = case
    inp = make_inputs(lead, dim, dtype, group is not None, strided)
    kw = {} if group is None else dict(group_size=group)
    grad, ref = reference(inp, **kw)
    check(run(plain if group is None else gated_rms_norm, inp, grad, **kw), ref, TOL[dtype])


def test_zero_and_large_rows():
    """Rows of zeros (rstd = eps^-1/2) and of large values stay finite and exact."""
    inp = make_inputs((6,), 96, torch.bfloat16, True, False)
    inp["y"][1] = 0
    inp["z"][2] = 0
    inp["y"][3] *= 1e4
    inp["z"][4] = -30  # silu's tail: gated values ~1e-12
    grad, ref = reference(inp, group_size=48)
    check(run(gated_rms_norm, inp, grad, group_size=48), ref, TOL[torch.bfloat16])


def test_deterministic():
    """Two backward passes give bitwise equal gradients (dweight: per-program partials, no atomics)."""
    inp = make_inputs((3, 331), 200, torch.bfloat16, True, True)
    torch.manual_seed(1)
    grad = torch.randn(inp["y"].shape, device=DEVICE, dtype=torch.float64)
    first = run(gated_rms_norm, inp, grad, group_size=100)
    second = run(gated_rms_norm, inp, grad, group_size=100)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


def test_torch_compile_fullgraph():
    """torch.compile traces through the custom ops without graph breaks, forward and backward."""
    inp = make_inputs((2, 9), 64, torch.float32, True, True)

    def f(y, z, weight, weight2):
        return (gated_rms_norm(y, z, weight, 1e-5, 32) * rms_norm(y, weight2)).sum()

    assert_compiles_like_eager(f, {"y": inp["y"], "z": inp["z"], "weight": inp["weight"],
                                   "weight2": inp["weight"].flip(0)})


def test_refuses_float64_and_bad_groups():
    x, w = torch.randn(3, 8, device=DEVICE, dtype=torch.float64), torch.ones(8, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        rms_norm(x, w)
    with pytest.raises(ValueError, match="group_size 3"):
        gated_rms_norm(x.float(), x.float(), w, group_size=3)


# ----------------------------------------------------------------------------- the model's norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_naive_equals_modules(dtype):
    """The naive references compute exactly what the model's PyTorch path does."""
    inp = make_inputs((2, 7), 48, dtype, True, True)
    norm = RMSNorm(48, eps=1e-4, backend="reference").to(DEVICE)
    gated = GatedRMSNorm(48, eps=1e-4, group_size=12, backend="reference").to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(inp["weight"])
        gated.weight.copy_(inp["weight"].flip(0))
        assert torch.equal(norm(inp["y"]), rms_norm_naive(inp["y"], norm.weight, 1e-4))
        assert torch.equal(gated(inp["y"], inp["z"]),
                           gated_rms_norm_naive(inp["y"], inp["z"], gated.weight, 1e-4, 12))


def _announcements(caplog):
    return [r.getMessage() for r in caplog.records if r.name == backend.__name__]


def test_modules_take_the_kernels_when_asked(monkeypatch, caplog):
    """backend="triton" runs the kernels (here: the interpreter), once announced; under autocast the
    norm gets bf16 activations and the fp32 weight and returns the input's dtype, as the PyTorch path does."""
    monkeypatch.setattr(backend, "_announced", set())
    inp = make_inputs((2, 5), 64, torch.bfloat16, True, True)
    results = {}
    for kind in ("reference", "triton"):
        norm, gated = RMSNorm(64, backend=kind).to(DEVICE), GatedRMSNorm(64, group_size=32, backend=kind).to(DEVICE)
        with caplog.at_level(logging.INFO, logger="mambatrain"), torch.autocast(DEVICE, dtype=torch.bfloat16):
            for _ in range(2):
                results[kind] = (norm(inp["y"]), gated(inp["y"], inp["z"]), norm(inp["y"].float()))
    for got, want in zip(results["triton"], results["reference"]):
        assert got.dtype == want.dtype
        assert rel(got, want) < TOL[got.dtype]
    assert [o.dtype for o in results["triton"]] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert _announcements(caplog) == [
        "rms_norm: reference implementation", "gated rms_norm: reference implementation",
        "rms_norm: triton implementation", "gated rms_norm: triton implementation",
    ]


def test_module_backend_choice(monkeypatch):
    """auto: kernels for CUDA tensors of fp32/bf16/fp16 only; forcing them where they cannot run is an error."""
    x = torch.randn(2, 8)
    assert not backend.use_triton("auto", x, "rms_norm", "RMSNorm.backend", (torch.float32,))
    if torch.cuda.is_available():
        assert backend.use_triton("auto", x.cuda(), "rms_norm", "RMSNorm.backend", (torch.float32,))
        assert not backend.use_triton("auto", x.cuda().double(), "rms_norm", "RMSNorm.backend", (torch.float32,))
    with pytest.raises(TypeError, match="RMSNorm.backend is 'triton' but the rms_norm input is torch.float64"):
        RMSNorm(8, backend="triton")(x.double().to(DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="GatedRMSNorm.backend is 'triton' but the gated rms_norm input is on cpu"):
        GatedRMSNorm(8, backend="triton")(x, x)


def test_module_compiles_fullgraph():
    """The backend choice (and its log line) does not break a fullgraph compile of the module."""
    inp = make_inputs((2, 9), 64, torch.float32, True, True)
    gated = GatedRMSNorm(64, group_size=32, backend="triton").to(DEVICE)
    torch._dynamo.reset()
    y = inp["y"].detach().requires_grad_()
    torch.compile(gated, fullgraph=True, backend="aot_eager")(y, inp["z"]).sum().backward()
    y0 = inp["y"].detach().requires_grad_()
    gated(y0, inp["z"]).sum().backward()
    assert torch.equal(y.grad, y0.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs ~30 GB of GPU memory")
def test_offsets_past_2_to_the_31():
    """Rows x dim beyond 2^31 elements (1M tokens x 3072 would be): the last rows equal the reference."""
    dim = 3072
    rows = 2 ** 31 // dim + 64
    y = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(rows, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(dim, device=DEVICE, requires_grad=True)
    out = gated_rms_norm(y, z, w, 1e-5, dim // 2)
    grad = torch.randn(128, dim, device=DEVICE, dtype=torch.bfloat16)
    out[-128:].backward(grad)
    tail = {"y": y[-128:].detach(), "z": z[-128:].detach(), "weight": w.detach()}
    ref = run(gated_rms_norm_naive, {k: v.double() for k, v in tail.items()}, grad.double(), group_size=dim // 2)
    check((out[-128:], {"y": y.grad[-128:], "z": z.grad[-128:], "weight": w.grad}), ref, 1e-2)
    assert not y.grad[:-128].any() and not z.grad[:-128].any()
