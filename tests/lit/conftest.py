import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on a shared CPU: a second OpenMP thread only waits for a free core (10x slower, not faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
