"""Kernel tests rerun with the autotuner on (GPU only).

Before it picks a config for a new shape, Triton's autotuner runs every config of the space on the same
buffers. A config that leaves part of an output to the allocation's zeros then reads what an earlier config
left there: the SSD backward's dA and dt were 2-4% off on an H100 that way while every config passed alone
(test_ssd.py::test_every_autotune_config) and the interpreter, which runs one config, never saw it. GPU runs
of the suite often set MAMBATRAIN_AUTOTUNE=0 (one config per kernel, no tuning per shape), so these cases
run in a subprocess with it on, at shapes that use the full tile space (the SSD's head_dim 64, d_state 128).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

SELECTIONS = {
    "test_ssd.py": "benchmark_shape or L128 or every_autotune_config or one_block or column_scan or fused or segments_of_several",
    "test_selective_scan.py": "lengths_fp32 or half_precision or long_fp32 or documents_at_segment_starts",
    "test_conv1d.py": "matches_naive and T1000 or walk_backward or block_backward",
    "test_rmsnorm.py": "matches_naive and d768",
    "test_cross_entropy.py": "matches_naive and r1000",
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner runs on a GPU only")
@pytest.mark.parametrize("module", sorted(SELECTIONS))
def test_with_the_autotuner_on(module):
    env = {**os.environ, "MAMBATRAIN_AUTOTUNE": "1", "MAMBATRAIN_KERNEL_DEBUG": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / module),
                             "-k", SELECTIONS[module]], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
