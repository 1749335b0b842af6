"""One command for the benchmark suite: run it, record the JSON, write the table and the plots.

    python benchmarks/suite.py                 # CPU, every case (tens of minutes on 2 cores)
    python benchmarks/suite.py --quick         # a few small cases
    python benchmarks/suite.py --device cuda   # on a GPU
    python benchmarks/suite.py --quick --select "M12800-d1-k4 and cpu"   # a quick check of the script

Writes benchmarks/results/suite_<device>.json (pytest-benchmark's JSON: machine, versions, commit,
date), suite_<device>.md and the PNG plots beside them (report.py).
"""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402
from harness import SUITE_MEMORY_CAP_GIB, script_parser  # noqa: E402


def main(argv=None) -> int:
    parser = script_parser(__doc__, device=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-cap-gib", type=float, default=SUITE_MEMORY_CAP_GIB)
    parser.add_argument("--select", default=None, help="only the cases pytest -k selects")
    args = parser.parse_args(argv)
    name = f"suite_{args.device}" + ("_quick" if args.quick else "")
    json_path = os.path.join(HERE, "results", f"{name}.json")
    pytest_args = [
        os.path.join(HERE, "test_suite.py"), "-q", "-p", "no:cacheprovider",
        f"--device={args.device}", f"--memory-cap-gib={args.memory_cap_gib}",
        f"--benchmark-json={json_path}", "--benchmark-columns=median,min,max,rounds",
        "--benchmark-sort=name",
    ] + (["--quick"] if args.quick else []) + (["-k", args.select] if args.select else [])
    status = pytest.main(pytest_args)
    if status not in (0, 5) or not os.path.exists(json_path):
        return int(status)
    print(report.write_report(json_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
