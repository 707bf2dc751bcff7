"""The launchers' integer helpers give Triton's results (they replace triton.cdiv / next_power_of_2 on the host);
the autotuner of ``settings.autotune`` compiles a new key's configs concurrently (unless switched off)."""

import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from mambatrain_kernels import settings
from mambatrain_kernels.settings import autotune, cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert next_power_of_2(2**40 + 1) == 2**41


@autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w) for b in (64, 128) for w in (1, 2, 4)], key=["n"])
@triton.jit
def _scaled(x, y, n, scale, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n) * scale, mask=o < n)


def test_autotune_is_tritons_autotuner():
    # the subclass adds the concurrent compile only, on unless MAMBATRAIN_PARALLEL_COMPILE=0
    assert isinstance(_scaled, Autotuner) and len(_scaled.configs) == 6
    assert settings.PARALLEL_COMPILE == (os.environ.get("MAMBATRAIN_PARALLEL_COMPILE", "1") == "1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles for the GPU at hand")
def test_parallel_compile_fills_the_kernel_cache_before_timing(monkeypatch):
    monkeypatch.setattr(settings, "PARALLEL_COMPILE", True)
    compiled_before_timing = []

    def timed(*args, config, **kwargs):  # what was compiled when the autotuner times its first config
        if not compiled_before_timing:
            compiled_before_timing.append(len(next(iter(_scaled.fn.device_caches.values()))[0]))
        return original(*args, config=config, **kwargs)
    original = _scaled._bench
    monkeypatch.setattr(_scaled, "_bench", timed)
    n = 1000 + 7 * len(_scaled.cache)  # a key this process has not tuned yet
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    _scaled[lambda meta: (cdiv(n, meta["BLOCK"]),)](x, y, n, 3.0)
    torch.testing.assert_close(y, 3.0 * x)
    assert compiled_before_timing and compiled_before_timing[0] >= 6
