import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported (dkm_kernels imports it), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared checks from oracle.py
