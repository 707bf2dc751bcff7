from .chunked import ssd_chunked_torch
from .naive import ssd_naive, ssd_state_update

__all__ = ["ssd_chunked_torch", "ssd_naive", "ssd_scan", "ssd_state_update"]


def __getattr__(name):
    # Lazy: importing the package must not need triton (CPU-only installs);
    # ssd_scan itself does, and fails loudly without it.
    if name == "ssd_scan":
        from .triton import ssd_scan

        return ssd_scan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
