"""The launchers' integer helpers give Triton's results (they replace triton.cdiv / next_power_of_2 on the host)."""

import triton

from mambatrain_kernels.settings import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert next_power_of_2(2**40 + 1) == 2**41
