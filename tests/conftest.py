import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported (dkm_kernels imports it), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared checks from oracle.py

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
