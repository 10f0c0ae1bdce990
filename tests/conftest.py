import os

import pytest
import torch

# Small ops dominate these tests; one thread avoids oversubscription on the 2-core CI machine.
torch.set_num_threads(int(os.environ.get("CTRLDIFF_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gpu_device() -> str:
    """The device of the tests marked ``gpu``: cuda; without CUDA they skip, unless CTRLDIFF_GPU_TESTS_ON_CPU=1
    (``python benchmarks/gpu_check.py --cpu``: the same tests on the CPU, so that they cannot rot unseen)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("CTRLDIFF_GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip("needs CUDA (python benchmarks/gpu_check.py runs these on a GPU)")
