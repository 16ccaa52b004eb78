import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: on a 2-core machine shared by several jobs, two OpenMP threads per process
    spin against each other and make the many small ops of these tests 10-50x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
