"""`python -m dkm_kernels`: the command line (dkm_kernels.cli)."""
import sys

from .cli import main

sys.exit(main())
