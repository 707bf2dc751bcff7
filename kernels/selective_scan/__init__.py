from .naive import selective_scan_naive, selective_state_update

__all__ = ["selective_scan", "selective_scan_naive", "selective_state_update"]


def __getattr__(name):
    # Lazy: importing the package must not need triton (CPU-only installs);
    # selective_scan itself does, and fails loudly without it.
    if name == "selective_scan":
        from .triton import selective_scan

        return selective_scan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
