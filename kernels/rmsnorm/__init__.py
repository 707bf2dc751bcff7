from .naive import gated_rms_norm_naive, rms_norm_naive

__all__ = ["gated_rms_norm", "gated_rms_norm_naive", "rms_norm", "rms_norm_naive"]


def __getattr__(name):
    # Lazy: importing the package must not need triton (CPU-only installs);
    # the fused kernels themselves do, and fail loudly without it.
    if name in ("rms_norm", "gated_rms_norm"):
        from . import triton

        return getattr(triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
