"""Suite-wide test settings.

The models under test are tiny: with more than one intra-op thread, OpenMP start-up and hand-off cost
more than the arithmetic, so every test runs single-threaded (benchmarks set their own thread count).
Each test starts from the same seed.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
