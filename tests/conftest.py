import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported (dkm_kernels imports it), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import oracle.py, shared_models.py, export_files.py

from dkm_kernels.backends import cpu  # noqa: E402  (after TRITON_INTERPRET is set)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # tests/test_fuzz.py skips with the reason
    pass
else:
    # A bounded number of examples in the default run; HYPOTHESIS_PROFILE=thorough for long local
    # runs. No deadline: an example's time depends on the machine's load, not on the code.
    # derandomize: the default run draws the same examples every time (no flaky CI).
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    settings.register_profile("default", max_examples=20, **common)
    settings.register_profile("thorough", max_examples=1000, **common)
    settings.register_profile("long", max_examples=200, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def one_thread(request):
    """Small problems run on one thread: on a loaded machine, waking OpenMP threads for
    millisecond ops makes the reference take seconds. The kernels' results do not depend on the
    thread count (test_cpu_backend.py's test_deterministic_and_independent_of_thread_count), and
    tests that want threads ask for the `threads` fixture. Modules use it through oracle's
    CPU_EXTENSION_TESTS."""
    if "threads" in request.fixturenames:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def threads():
    return torch.get_num_threads()


@pytest.fixture(params=cpu.available_isas())
def isa(request, monkeypatch):
    """Every instruction set the C++ kernels have here, forced with DKM_KERNELS_ISA."""
    monkeypatch.setenv("DKM_KERNELS_ISA", request.param)
    assert cpu.isa() == request.param
    return request.param
