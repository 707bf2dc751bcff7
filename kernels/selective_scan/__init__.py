from .naive import selective_scan_naive, selective_state_update

__all__ = ["selective_scan_naive", "selective_state_update"]
