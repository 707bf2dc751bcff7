from .naive import IGNORE_INDEX, chunk_cross_entropy_sum, linear_cross_entropy_naive

__all__ = ["IGNORE_INDEX", "chunk_cross_entropy_sum", "linear_cross_entropy", "linear_cross_entropy_naive"]


def __getattr__(name):
    # Lazy: importing the package must not need triton (CPU-only installs);
    # linear_cross_entropy itself does, and fails loudly without it.
    if name == "linear_cross_entropy":
        from .triton import linear_cross_entropy

        return linear_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
