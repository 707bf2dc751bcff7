"""model.mamba.backend: the Mamba ops name the dtypes their kernels take, so auto sends float64 (a float64 model
on a GPU) to the PyTorch path and forcing the kernels on float64 is the backend setting's error."""

import re

import pytest
import torch
from torch import nn

from mambatrain.models import scan


def test_forcing_the_kernels_on_float64_names_the_setting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, as the kernel tests run
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    conv = nn.Conv1d(4, 4, 3, groups=4, dtype=torch.float64)
    calls = {"ssd scan": lambda: scan.ssd_scan("triton", x),
             "selective scan": lambda: scan.selective_scan("triton", x),
             "conv1d + silu": lambda: scan.conv1d_silu("triton", x, conv, None, None)}
    for op, call in calls.items():
        message = f"model.mamba.backend is 'triton' but the {op} input is torch.float64"
        with pytest.raises(TypeError, match=re.escape(message)):
            call()
