import os

import pytest
import torch

# Small ops dominate these tests; one thread avoids oversubscription on the 2-core CI machine.
torch.set_num_threads(int(os.environ.get("CTRLDIFF_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
