"""The benchmarks' harness: what every script in benchmarks/ measures, counts and records the same way.

    from harness import measure_case
    measure_case("cpu", groups=1, m=294_912, d=8, k=256, max_iter=5, dtype="float32")

    python benchmarks/harness.py --worker '<case json>'   # the fresh process measure_case starts

It holds, once each:
- the inputs' regime: PAPER_TAU, ITERATIONS, WEIGHT_STD, trained_like_weights;
- the naive method's memory: naive_attention_bytes (what it keeps for backward, a lower bound) and
  naive_peak_bytes (the model behind every cap that skips a `reference` case);
- the counted floor: passes_per_direction, counted_work and time_floor at given Rates (H100_SXM);
- peak memory: ResidentPeak (CPU, the process's resident high-water mark) and CudaPeak (GPU,
  torch.cuda.max_memory_allocated); fresh processes for the CPU one: run_worker, serve_worker;
- timing: time_forward_backward, median_times;
- metadata: machine (CPU), gpu_machine, git_commit, utc_now_iso, triton_version;
- JSON: results_path, write_json;
- the scripts' command line: script_parser (the options they share).

Method of measure_case
----------------------
Each case runs in a fresh Python subprocess, so that one case's allocator caches and peak memory
never leak into another's.

- Inputs: weights (G, M, d) ~ N(0, WEIGHT_STD^2), centroids = k random rows, tau = PAPER_TAU,
  epsilon = 0 so that every group runs all max_iter iterations. The weights require grad; the
  upstream gradient is a fixed random tensor.
- Time: `repeats` runs of forward, then backward; forward, backward and forward+backward times
  are the medians over the runs (wall clock, time.perf_counter). One untimed warm-up run comes
  first. The process CPU time of forward+backward is recorded too: on a machine shared with other
  work, wall time includes waiting for a core, CPU time does not.
- Peak memory (after the warm-up run, so that loading code and starting threads are not counted):
  with MALLOC_MMAP_THRESHOLD_ = 64 KiB (every tensor its own mapping, returned to the system when
  freed), the resident set (RSS) high-water mark of the process over the timed runs, minus the RSS
  just before the first run (after imports and after the inputs exist, so the inputs are not
  counted, the op's outputs and everything it allocates are). See ResidentPeak.
- Cap: a `reference` case whose naive_peak_bytes exceeds `cap_bytes` is not run and comes back as
  {"skipped": "over cap", ...}, so that no case can take the machine down.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# The backends in the order tables list them: the baseline first, then the portable one, then the
# fused kernels.
BACKENDS = ("reference", "torch", "cpu", "triton")

# The paper's regime: tau = 2e-5 with weights of a trained layer's scale (std 0.02), where the
# attention is nearly hard; L = 5 iterations.
PAPER_TAU = 2e-5
WEIGHT_STD = 0.02
ITERATIONS = 5

# Caps on the naive method's predicted peak (naive_peak_bytes), so that a skipped case never takes
# the machine down. On the 24 GB machine the results in results/ were recorded on, both CPU caps
# admit every reference case the scripts run (at most 5.6 GiB predicted: 294,912 x 256, measured
# 3.4 GiB) and keep out 294,912 x 4096 (90 GiB); the suite's is the looser. On a GPU, half of an
# 80 GB H100.
DEFAULT_CAP_BYTES = 8 * 2**30
SUITE_MEMORY_CAP_GIB = 12.0
GPU_REFERENCE_CAP_GIB = 40.0

FLOAT32_BYTES = 4

# Allocations of this size or more get their own mappings (glibc's MALLOC_MMAP_THRESHOLD_), so that
# memory freed before a measurement (at import, say) leaves the resident set instead of being
# silently reused by the op; 64 KiB keeps small Python objects on the heap.
SEPARATE_MAPPING_BYTES = 64 * 2**10


# --- inputs -----------------------------------------------------------------------------------


def trained_like_weights(shape, generator, device=None):
    """Random weights at a trained layer's scale: N(0, WEIGHT_STD^2)."""
    import torch

    return torch.randn(shape, generator=generator, device=device) * WEIGHT_STD


# --- the naive method's memory ----------------------------------------------------------------

# Per iteration the reference (dkm_kernels/reference.py) builds the M x k distances and their
# softmax; autograd keeps two M x k float32 tensors of them (the softmax's output, the distances
# clamp_min saves), and the forward's transients and the backward's gradients of the same size come
# on top. The output pass adds none: it reuses the last iteration's attention. For a 512x512x3x3
# layer at 8/8 and 5 iterations the measured peak is 3,510 MiB, 2.4 such tensors per iteration;
# four per iteration (5,760 MiB) is an upper estimate, which is what a cap wants.
NAIVE_MK_TENSORS_PER_ITERATION = 4


def naive_attention_bytes(m: int, k: int, iterations: int = ITERATIONS, groups: int = 1) -> int:
    """The M x k float32 attention of every iteration, which the naive method keeps for backward:
    a lower bound of its memory, L * M * k * 4 bytes per group."""
    return groups * iterations * m * k * FLOAT32_BYTES


def naive_peak_bytes(m: int, k: int, iterations: int = ITERATIONS, groups: int = 1) -> int:
    """The naive method's predicted peak: NAIVE_MK_TENSORS_PER_ITERATION M x k float32 tensors per
    iteration and group (an upper estimate; see the reasoning above)."""
    return NAIVE_MK_TENSORS_PER_ITERATION * naive_attention_bytes(m, k, iterations, groups)


# --- the counted floor ------------------------------------------------------------------------

# Each pass over W (docs/design.md §3) costs M * k exponentials (one softmax score per row and centroid)
# and about 3 * M * k * d fused multiply-adds.
MULTIPLY_ADDS_PER_PAIR_AND_DIM = 3


def passes_per_direction(iterations: int) -> int:
    """Passes over W one direction takes: a forward runs L iterations and the output pass, a
    backward goes back through the same L + 1."""
    return iterations + 1


def counted_work(m: int, d: int, k: int, passes: int, itemsize: int = FLOAT32_BYTES) -> dict:
    """Exponentials, multiply-adds and bytes of W read (once per pass) over `passes` passes."""
    return {"exps": passes * m * k,
            "fmas": passes * MULTIPLY_ADDS_PER_PAIR_AND_DIM * m * k * d,
            "bytes": passes * m * d * itemsize}


@dataclasses.dataclass(frozen=True)
class Rates:
    """A machine's peak rates: fused multiply-adds, exponentials and memory bytes per second."""

    fma_per_s: float
    exp_per_s: float
    bytes_per_s: float


H100_SXM = Rates(
    # fp32 FMA without tensor cores: 67 TFLOP/s = 33.5e12 FMA/s (132 SMs x 128 lanes x 1.98 GHz).
    fma_per_s=33.5e12,
    # exp2 on the MUFU units: 16 per clock per SM x 132 SMs x 1.98 GHz = 4.2e12 exp/s.
    exp_per_s=16 * 132 * 1.98e9,
    # HBM3.
    bytes_per_s=3.35e12,
)


def time_floor(work: dict, rates: Rates) -> dict:
    """Seconds each unit needs for `work` (from counted_work) and the floor: the largest of the
    three, since the units work in parallel."""
    times = {"exp_s": work["exps"] / rates.exp_per_s,
             "fma_s": work["fmas"] / rates.fma_per_s,
             "memory_s": work["bytes"] / rates.bytes_per_s}
    return {**times, "floor_s": max(times.values())}


# --- peak memory ------------------------------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_resident_high_water_mark() -> bool:
    """Reset VmHWM to the current resident set (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def resident_high_water_bytes(since_reset: bool = False) -> int:
    """The process's resident high-water mark: VmHWM (since the last reset) where `since_reset`,
    else ru_maxrss (since the process started)."""
    if since_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class ResidentPeak:
    """The process's resident high-water mark inside the `with`, above its resident set at entry.

    On Linux the mark is reset at entry (writing 5 to /proc/self/clear_refs) and read from VmHWM,
    so the import-time peak of torch cannot hide a smaller peak; elsewhere ru_maxrss is used (then
    the number can only be too high, never too low). Run it in a fresh process started with
    run_worker, so that no earlier case's allocations are counted or reused.
    """

    def __enter__(self):
        self.exact = sys.platform.startswith("linux") and reset_resident_high_water_mark()
        self.baseline = resident_bytes()
        return self

    def __exit__(self, *exc_info):
        self.bytes = max(0, resident_high_water_bytes(self.exact) - self.baseline)
        self.method = "VmHWM after clear_refs" if self.exact else "ru_maxrss"

    def fields(self) -> dict:
        return dict(peak_bytes=self.bytes, peak_method=self.method)


class CudaPeak:
    """torch.cuda.max_memory_allocated inside the `with`: `bytes` above what was allocated at entry
    (the inputs), `total` including it. `device`: None for the current one."""

    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        import torch

        torch.cuda.synchronize(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc_info):
        import torch

        torch.cuda.synchronize(self.device)
        self.total = torch.cuda.max_memory_allocated(self.device)
        self.bytes = self.total - self.baseline


# --- fresh processes --------------------------------------------------------------------------

WORKER_FLAG = "--worker"


class WorkerFailed(RuntimeError):
    """A worker process exited with an error; the message is its stderr."""

    def __init__(self, stderr: str, returncode: int):
        super().__init__(stderr)
        self.summary = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"


def run_case(script: str, case: dict, timeout: float | None = None) -> dict:
    """run_worker on `case`; a worker that fails gives the case with its error instead."""
    try:
        return run_worker(script, case, timeout=timeout)
    except WorkerFailed as failure:
        return dict(case, error=failure.summary)


def run_worker(script: str, payload: dict, timeout: float | None = None,
               separate_mappings: bool = True) -> dict:
    """Run `python script --worker '<payload json>'` in a fresh process and return the dict its
    worker printed as the last line. With `separate_mappings`, every allocation of
    SEPARATE_MAPPING_BYTES or more is its own mapping (see there)."""
    env = dict(os.environ)
    if separate_mappings:
        env["MALLOC_MMAP_THRESHOLD_"] = str(SEPARATE_MAPPING_BYTES)
    done = subprocess.run([sys.executable, os.path.abspath(script), WORKER_FLAG, json.dumps(payload)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise WorkerFailed(done.stderr, done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_worker(worker) -> bool:
    """In a script's `__main__`: if started by run_worker, print worker(payload) as JSON and return
    True; otherwise return False."""
    if len(sys.argv) != 3 or sys.argv[1] != WORKER_FLAG:
        return False
    print(json.dumps(worker(json.loads(sys.argv[2]))))
    return True


# --- timing -----------------------------------------------------------------------------------

Timing = collections.namedtuple("Timing", "forward_s backward_s forward_backward_s forward_backward_cpu_s")


def time_forward_backward(forward, backward):
    """Run result = forward(), then backward(result); return (Timing, result). Wall times, and the
    process CPU time of both: on a shared machine wall time includes waiting for a core."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = forward()
    t1 = time.perf_counter()
    backward(result)
    t2, c2 = time.perf_counter(), time.process_time()
    return Timing(t1 - t0, t2 - t1, t2 - t0, c2 - c0), result


def median_times(timings) -> dict:
    """The median of each field of a list of Timing, by the field's name."""
    timings = list(timings)
    return {field: statistics.median(getattr(t, field) for t in timings) for field in Timing._fields}


# --- one DKM case -----------------------------------------------------------------------------


def measure_case(backend: str, groups: int, m: int, d: int, k: int, max_iter: int = ITERATIONS,
                 dtype: str = "float32", repeats: int = 3, cap_bytes: int = DEFAULT_CAP_BYTES,
                 threads: int | None = None, timeout: float = 3600) -> dict:
    """Measure one case in a fresh subprocess; see the module docstring for the method."""
    case = dict(backend=backend, groups=groups, m=m, d=d, k=k, max_iter=max_iter, dtype=dtype,
                repeats=repeats, threads=threads)
    predicted = naive_peak_bytes(m, k, max_iter, groups)
    if backend == "reference" and predicted > cap_bytes:
        return dict(case, skipped="over cap", predicted_bytes=predicted, cap_bytes=cap_bytes)
    return run_case(__file__, case, timeout)


def _case_worker(case: dict) -> dict:
    import torch

    import dkm_kernels

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(0)
    shape = (case["groups"], case["m"], case["d"])
    weights = trained_like_weights(shape, gen).to(dtype)
    centroids = dkm_kernels.random_rows(weights, case["k"], generator=gen)
    upstream = torch.randn(shape, generator=gen).to(dtype)

    def once():
        w = weights.detach().requires_grad_(True)
        timing, result = time_forward_backward(
            lambda: dkm_kernels.dkm(w, centroids, PAPER_TAU, case["max_iter"], 0.0, backend=case["backend"]),
            lambda result: result.weights.backward(upstream))
        return timing, int(result.iterations.max())

    once()  # warm-up: first-call costs (dispatch, thread pool, code pages) are not the op's
    with ResidentPeak() as peak:
        runs = [once() for _ in range(case["repeats"])]
    return dict(
        case,
        **median_times(timing for timing, _ in runs),
        iterations=runs[0][1],
        **peak.fields(),
        threads_used=torch.get_num_threads(),
    )


# --- metadata ---------------------------------------------------------------------------------


def git_commit(short: bool = True) -> str:
    """HEAD of this checkout, "+dirty" where tracked files differ from it; outside git (a copy
    of the tree on a lent machine) $DKM_COMMIT, or "unknown"."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                                         text=True, stderr=subprocess.DEVNULL, cwd=HERE).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], stderr=subprocess.DEVNULL,
                               cwd=HERE).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DKM_COMMIT", "unknown")
    return commit + ("+dirty" if dirty else "")


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


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
    info = dict(
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        commit=git_commit(),
        date=utc_now_iso(),
    )
    try:
        from dkm_kernels.backends import cpu as cpu_backend

        info["cpu_backend_isa"] = cpu_backend.isa()
    except Exception:  # the benchmark still describes the machine without the package
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def gpu_machine(device) -> dict:
    """The GPU, its SM count, the versions of torch, Triton, CUDA and Python, the full commit, date."""
    import torch

    return {
        "device": torch.cuda.get_device_name(device),
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(short=False),
        "date": utc_now_iso(),
    }


# --- JSON -------------------------------------------------------------------------------------


def results_path(name: str) -> str:
    """`name` under benchmarks/results/ (an absolute `name` stays as it is)."""
    return os.path.join(RESULTS, name)


def write_json(path: str, payload: dict) -> str:
    """Write `payload` as indented JSON to `path`, creating its folder, and say where; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
    return path


def script_parser(doc: str, *, device: bool = False, backend: str | None = None,
                  repeats: int | None = None, reference_cap: bool = False,
                  out: str | None = None) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the help text, and those of the options the scripts
    share that it asks for, each meaning the same in every script: --device (cpu by default),
    --backend and --repeats (with the script's default), --cap-gib (the cap on the reference's
    predicted memory, DEFAULT_CAP_BYTES by default), --out (a file name under results/)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if device:
        parser.add_argument("--device", default="cpu")
    if backend is not None:
        parser.add_argument("--backend", default=backend)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    if reference_cap:
        parser.add_argument("--cap-gib", type=float, default=DEFAULT_CAP_BYTES / 2**30,
                            help="skip the reference if its predicted memory exceeds this")
    if out is not None:
        parser.add_argument("--out", default=out, help="file name under benchmarks/results/")
    return parser


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


if __name__ == "__main__":
    if not serve_worker(_case_worker):
        sys.exit(f"usage: python benchmarks/harness.py {WORKER_FLAG} '<case json>' (used by measure_case)")
