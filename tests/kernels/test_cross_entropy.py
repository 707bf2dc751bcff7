"""The fused linear + cross-entropy (``linear_cross_entropy``) equals its naive twin, which equals the model's loss.

The loss and the gradients of hidden and weight under a random incoming gradient are compared with the
naive reference run on float64 copies of the inputs (bf16-rounded hidden included), so the error measured
is the kernel path's own. Without a GPU the Triton kernel runs in Triton's interpreter; shapes are small.
"""

import logging
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# on a GPU: one config per kernel instead of autotuning every shape
os.environ.setdefault("MAMBATRAIN_AUTOTUNE", "0")

import pytest  # noqa: E402

from mambatrain.models import backend  # noqa: E402
from mambatrain.models.loss import chunked_cross_entropy, chunked_cross_entropy_sum  # noqa: E402
from mambatrain_kernels.cross_entropy import (  # noqa: E402
    IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_naive)
from mambatrain_kernels.cross_entropy import triton as cet  # noqa: E402
from mambatrain_kernels import settings as kernel_settings  # noqa: E402
from compare import assert_close, assert_compiles_like_eager  # noqa: E402

# outputs the host allocates start as NaN: an unwritten element fails a test
kernel_settings.DEBUG_NAN = True

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_inputs(rows, d, vocab, dtype, ignored=0.2, lead=()):
    """hidden (*lead, rows, d) in ``dtype``, the fp32 head (vocab, d), labels with a share ``ignored`` of -100."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((rows, d, vocab, dtype, ignored, lead)).encode()))
    labels = torch.randint(0, vocab, (*lead, rows), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignored] = IGNORE_INDEX
    return dict(hidden=torch.randn(*lead, rows, d, generator=g).to(dtype).to(DEVICE),
                weight=(2 * torch.randn(vocab, d, generator=g) / d ** 0.5).to(DEVICE),
                labels=labels.to(DEVICE))


def run(fn, inp, chunk_size, dloss=0.37):
    """Loss and the gradients of hidden and weight of ``fn`` under the incoming gradient ``dloss``."""
    h, w = (inp[k].detach().requires_grad_() for k in ("hidden", "weight"))
    loss = fn(h, w, inp["labels"], chunk_size)
    assert loss.shape == () and loss.dtype == torch.promote_types(h.dtype, torch.float32)
    loss.backward(torch.tensor(dloss, dtype=loss.dtype, device=loss.device))
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
    return {"loss": loss.detach(), "dhidden": h.grad, "dweight": w.grad}


def reference(inp, chunk_size):
    return run(linear_cross_entropy_naive, {k: v.double() if v.is_floating_point() else v for k, v in inp.items()},
               chunk_size)


CASES = [
    # (rows, d_model, vocab, chunk_size, dtype)
    (1, 16, 257, 8192, torch.float32),
    (17, 32, 1000, 5, torch.float32),
    (1000, 16, 257, 300, torch.float32),
    (17, 24, 1000, 8192, torch.bfloat16),
    (1000, 16, 257, 333, torch.bfloat16),
    (33, 16, 100, 16, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}-d{c[1]}-v{c[2]}-c{c[3]}-{str(c[4])[6:]}")
def test_matches_naive(case):
    rows, d, vocab, chunk, dtype = case
    inp = make_inputs(rows, d, vocab, dtype)
    assert_close(run(linear_cross_entropy, inp, chunk), reference(inp, chunk), TOL[dtype])


def test_leading_dims_and_bf16_weight():
    """(batch, time, d) hidden with (batch, time) labels; a bf16 head gets a bf16 gradient."""
    inp = make_inputs(9, 16, 257, torch.bfloat16, lead=(3,))
    inp["weight"] = inp["weight"].bfloat16()
    assert_close(run(linear_cross_entropy, inp, 7), reference(inp, 7), TOL[torch.bfloat16])


def test_int32_labels_in_both():
    """Any integer labels, in the kernel and its reference alike."""
    inp = make_inputs(17, 16, 257, torch.float32)
    narrow = {**inp, "labels": inp["labels"].int()}
    assert_close(run(linear_cross_entropy, narrow, 5), reference(inp, 5), TOL[torch.float32])
    assert_close(run(linear_cross_entropy_naive, narrow, 5), reference(inp, 5), TOL[torch.float32])


def test_all_ignored():
    """Every label -100: loss and both gradients exactly zero (not NaN)."""
    inp = make_inputs(17, 16, 257, torch.float32, ignored=1.0)
    got = run(linear_cross_entropy, inp, 5)
    for name, t in got.items():
        assert torch.equal(t, torch.zeros_like(t)), name


def test_no_grad_computes_the_loss_only(monkeypatch):
    """Under no_grad (and for inputs that do not require grad) the op is asked for no gradient: no gradient
    matmuls, no second pass; the loss is bitwise that of the training path."""
    inp = make_inputs(40, 16, 257, torch.bfloat16)
    asked = []
    fwd = cet.linear_cross_entropy_fwd

    def spy(*args):
        asked.append(args[-2:])
        return fwd(*args)

    monkeypatch.setattr(cet, "linear_cross_entropy_fwd", spy)
    trained = run(linear_cross_entropy, inp, 16)["loss"]
    h, w = inp["hidden"].requires_grad_(), inp["weight"].requires_grad_()
    with torch.no_grad():
        evaluated = linear_cross_entropy(h, w, inp["labels"], 16)
    frozen_head = linear_cross_entropy(h, w.detach(), inp["labels"], 16)
    assert asked == [(True, True), (False, False), (True, False)]
    assert torch.equal(evaluated, trained) and not evaluated.requires_grad
    frozen_head.backward()
    assert w.grad is None and h.grad is not None


def test_deterministic():
    """Two runs give bitwise equal loss and gradients (per-row losses summed by torch, dW summed chunk by chunk)."""
    inp = make_inputs(100, 16, 257, torch.bfloat16)
    first, second = run(linear_cross_entropy, inp, 30), run(linear_cross_entropy, inp, 30)
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_torch_compile_fullgraph():
    """torch.compile traces through the custom op without graph breaks, forward and backward."""
    inp = make_inputs(21, 16, 100, torch.float32)

    def f(hidden, weight):
        return 0.5 * linear_cross_entropy(hidden, weight, inp["labels"], 8)

    assert_compiles_like_eager(f, {"hidden": inp["hidden"], "weight": inp["weight"]})


def test_refuses_float64_and_bad_shapes():
    inp = make_inputs(5, 8, 10, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        linear_cross_entropy(inp["hidden"], inp["weight"], inp["labels"])
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(inp["hidden"].float(), inp["weight"].t(), inp["labels"])
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(inp["hidden"].float(), inp["weight"], inp["labels"][:3])


# ----------------------------------------------------------------------------- the model's loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_naive_equals_the_reference_path(dtype):
    """The naive twin computes exactly what the model's checkpointed PyTorch path does, gradients included."""
    inp = make_inputs(50, 16, 100, dtype)
    got = run(lambda *a: chunked_cross_entropy_sum(*a, backend="reference"), inp, 16)
    want = run(linear_cross_entropy_naive, inp, 16)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _announcements(caplog):
    return [r.getMessage() for r in caplog.records if r.name == backend.__name__]


def test_loss_takes_the_kernel_when_asked(monkeypatch, caplog):
    """backend="triton" runs the kernel (here: the interpreter), once announced. Under autocast the fp32
    hidden and head go through bf16 logits on both paths; the mean loss and gradients agree."""
    monkeypatch.setattr(backend, "_announced", set())
    inp = make_inputs(60, 16, 257, torch.float32, lead=(2,))
    results = {}
    for kind in ("reference", "triton"):
        with caplog.at_level(logging.INFO, logger="mambatrain"), torch.autocast(DEVICE, dtype=torch.bfloat16):
            results[kind] = run(lambda *a: chunked_cross_entropy(*a, backend=kind), inp, 50)
            run(lambda *a: chunked_cross_entropy(*a, backend=kind), inp, 50)
    assert results["triton"]["dhidden"].dtype == torch.float32
    assert_close(results["triton"], results["reference"], TOL[torch.bfloat16])
    assert _announcements(caplog) == ["linear + cross-entropy: reference implementation",
                                      "linear + cross-entropy: triton implementation"]


def test_loss_backend_choice(monkeypatch):
    """auto: the kernel for CUDA tensors of fp32/bf16/fp16 only; forcing it where it cannot run is an error."""
    inp = make_inputs(5, 8, 10, torch.float64)
    h, w, y = inp["hidden"].cpu(), inp["weight"].cpu(), inp["labels"].cpu()
    assert torch.equal(chunked_cross_entropy_sum(h, w, y), linear_cross_entropy_naive(h, w, y))  # auto, CPU
    with pytest.raises(TypeError, match="chunked_cross_entropy backend is 'triton' but the linear \\+ cross-entropy "
                                        "input is torch.float64"):
        # (on the kernel's device: the CPU under the interpreter, else the GPU; the device is checked first)
        chunked_cross_entropy_sum(h.to(DEVICE), w.to(DEVICE), y.to(DEVICE), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="chunked_cross_entropy backend is 'triton' but .* is on cpu"):
        chunked_cross_entropy_sum(h.float(), w, y, backend="triton")
