"""How the kernel tests compare a kernel's results with its naive twin's."""

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖, in float64 (on b's device)."""
    a, b = a.detach().double().to(b.device), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> dict[str, float]:
    """Every named result finite and within ``tol`` relative error of the reference's; returns the errors."""
    for name, t in got.items():
        assert torch.isfinite(t).all(), f"non-finite {name}"
    errs = {name: rel(got[name], ref[name]) for name in ref}
    bad = {name: e for name, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return errs


def assert_compiles_like_eager(fn, inputs: dict[str, torch.Tensor]) -> None:
    """``torch.compile(fn, fullgraph=True)`` traces without graph breaks and gives eager's gradients exactly.

    ``fn`` takes the tensors of ``inputs`` in order and returns a scalar loss.
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    traced = [t.detach().clone().requires_grad_() for t in inputs.values()]
    compiled(*traced).backward()
    eager = [t.detach().clone().requires_grad_() for t in inputs.values()]
    fn(*eager).backward()
    for name, a, b in zip(inputs, traced, eager):
        assert torch.equal(a.grad, b.grad), name
