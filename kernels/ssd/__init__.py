from .naive import ssd_naive, ssd_state_update

__all__ = ["ssd_naive", "ssd_state_update"]
