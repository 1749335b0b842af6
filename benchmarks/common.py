"""Shared benchmark helpers: one DKM case measured in a fresh process, and the machine's description.

    from common import measure_case
    measure_case("cpu", groups=1, m=294_912, d=8, k=256, max_iter=5, dtype="float32")

Method
------
Each case runs in a fresh Python subprocess (`python benchmarks/common.py --worker '<json>'`), so
that one case's allocator caches and peak memory never leak into another's.

- Inputs: weights (G, M, d) ~ N(0, 0.02^2) (the paper's weight scale), centroids = k random rows,
  tau = 2e-5 (the paper's regime), epsilon = 0 so that every group runs all max_iter iterations.
  The weights require grad; the upstream gradient is a fixed random tensor.
- Time: `repeats` runs of forward, then backward; forward, backward and forward+backward times
  are the medians over the runs (wall clock, time.perf_counter). One untimed warm-up run comes
  first. The process CPU time of forward+backward is recorded too: on a machine shared with other
  work, wall time includes waiting for a core, CPU time does not.
- Peak memory (after the warm-up run, so that loading code and starting threads are not counted):
  with MALLOC_MMAP_THRESHOLD_=64 KiB (every tensor its own mapping, returned to
  the system when freed), the resident set (RSS) high-water mark over the timed runs of the process during the runs, minus the
  RSS just before the first run (after imports and after the inputs exist, so the inputs are not
  counted, the op's outputs and everything it allocates are). On Linux the high-water mark is reset
  first (writing 5 to /proc/self/clear_refs) and read from VmHWM in /proc/self/status, so the
  import-time peak of torch cannot hide a smaller peak; elsewhere ru_maxrss is used (then the
  number can only be too high, never too low).
- Cap: a `reference` case whose predicted memory, L * M * k * 4 bytes * 4 per group (the attention,
  its softmax input and the temporaries autograd keeps, per iteration), exceeds `cap_bytes` is not
  run and comes back as {"skipped": "over cap", ...}, so that no case can take the machine down.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_CAP_BYTES = 8 * 2**30


def predicted_reference_bytes(groups: int, m: int, k: int, max_iter: int) -> int:
    """The naive DKM's memory for one case: ~4 float32 tensors of M x k per iteration."""
    return groups * max_iter * m * k * 4 * 4


def measure_case(backend: str, groups: int, m: int, d: int, k: int, max_iter: int = 5,
                 dtype: str = "float32", repeats: int = 3, cap_bytes: int = DEFAULT_CAP_BYTES,
                 threads: int | None = None, timeout: float = 3600) -> dict:
    """Measure one case in a fresh subprocess; see the module docstring for the method."""
    case = dict(backend=backend, groups=groups, m=m, d=d, k=k, max_iter=max_iter, dtype=dtype,
                repeats=repeats, threads=threads)
    predicted = predicted_reference_bytes(groups, m, k, max_iter)
    if backend == "reference" and predicted > cap_bytes:
        return dict(case, skipped="over cap", predicted_bytes=predicted, cap_bytes=cap_bytes)
    # Allocations of 64 KiB or more get their own mappings, so memory freed before the
    # measurement (at import, say) leaves the resident set instead of being silently reused.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if done.returncode != 0:
        return dict(case, error=done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                    f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(exact: bool) -> int:
    if exact:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(case: dict) -> dict:
    import torch

    import dkm_kernels

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(0)
    shape = (case["groups"], case["m"], case["d"])
    weights = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    centroids = dkm_kernels.random_rows(weights, case["k"], generator=gen)
    upstream = torch.randn(shape, generator=gen).to(dtype)
    tau, max_iter = 2e-5, case["max_iter"]

    def once():
        w = weights.detach().requires_grad_(True)
        t0, c0 = time.perf_counter(), time.process_time()
        result = dkm_kernels.dkm(w, centroids, tau, max_iter, 0.0, backend=case["backend"])
        t1 = time.perf_counter()
        result.weights.backward(upstream)
        t2, c2 = time.perf_counter(), time.process_time()
        return t1 - t0, t2 - t1, t2 - t0, c2 - c0, int(result.iterations.max())

    once()  # warm-up: first-call costs (dispatch, thread pool, code pages) are not the op's
    exact = sys.platform.startswith("linux") and _reset_peak()
    baseline = _rss_bytes()
    runs = [once() for _ in range(case["repeats"])]
    peak = _peak_bytes(exact)
    return dict(
        case,
        forward_s=statistics.median(r[0] for r in runs),
        backward_s=statistics.median(r[1] for r in runs),
        forward_backward_s=statistics.median(r[2] for r in runs),
        forward_backward_cpu_s=statistics.median(r[3] for r in runs),
        iterations=runs[0][4],
        peak_bytes=max(0, peak - baseline),
        peak_method="VmHWM after clear_refs" if exact else "ru_maxrss",
        threads_used=torch.get_num_threads(),
    )


def machine() -> dict:
    """Platform, CPU model, core count, torch version, git commit, date, load."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], stderr=subprocess.DEVNULL,
                               cwd=os.path.dirname(os.path.abspath(__file__))).returncode != 0
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = dict(
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        commit=commit,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        from dkm_kernels.backends import cpu as cpu_backend

        info["cpu_backend_isa"] = cpu_backend.isa()
    except Exception:  # the benchmark still describes the machine without the package
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return path


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python benchmarks/common.py --worker '<case json>' (used by measure_case)")
