"""The dtype reductions, norms and scans compute in: float32 at least, float64 when the model is float64.

``.float()`` would round a float64 model down to float32 in places, and float32 rounding of a gradient that
is summed over tokens differs with how the tokens are split (whole sequence vs windows): float64 tests of
exactness (``tests/models/test_windowed.py``) need float64 throughout. bf16 and float32 models are unaffected.
"""

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))
