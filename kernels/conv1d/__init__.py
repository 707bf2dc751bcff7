from .naive import causal_conv1d_silu_naive

__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_naive"]


def __getattr__(name):
    # Lazy: importing the package must not need triton (CPU-only installs);
    # causal_conv1d_silu itself does, and fails loudly without it.
    if name == "causal_conv1d_silu":
        from .triton import causal_conv1d_silu

        return causal_conv1d_silu
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
