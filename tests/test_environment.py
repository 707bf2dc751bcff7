"""What this test environment can run, said as a skip rather than left out silently."""

import pytest

from conftest import TRITON_INTERPRETER_TOO_OLD


def test_kernel_tests_can_run_here():
    if TRITON_INTERPRETER_TOO_OLD:
        pytest.skip(TRITON_INTERPRETER_TOO_OLD)
