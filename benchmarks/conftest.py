"""pytest options of the benchmark suite (test_suite.py) and the versions its JSON records."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SUITE_MEMORY_CAP_GIB, triton_version  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu or cuda")
    parser.addoption("--quick", action="store_true", help="a few small cases only")
    parser.addoption("--memory-cap-gib", type=float, default=SUITE_MEMORY_CAP_GIB,
                     help="skip reference cases predicted to need more than this")


@pytest.fixture
def memory_cap_bytes(request):
    return int(request.config.getoption("--memory-cap-gib") * 2**30)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the versions and the device beside pytest-benchmark's machine description."""
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton_version()
    device = config.getoption("--device")
    machine_info["device"] = device
    if device == "cuda" and torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
