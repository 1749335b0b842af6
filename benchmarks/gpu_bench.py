"""GPU benchmark of the DKM backends on ResNet-50 layer shapes: time and peak memory.

One command on a CUDA machine:

    python benchmarks/gpu_bench.py

measures forward, backward and forward+backward (triton.testing.do_bench, median) and the peak of
torch.cuda.max_memory_allocated for `reference`, `torch` and `triton` (atomic and deterministic
reductions) in the same run, so that ratios hold; prints a markdown table and writes JSON to
benchmarks/results/gpu_<device>_<date>.json with the device, versions, commit and date.

`--dry-run` needs no GPU: it lists the cases, the reference's predicted memory and the counted floor.
`--compile-check` needs no GPU either: it compiles the Triton kernels of each case for sm_90 and
prints ptxas's registers and spills per kernel.

The floor of a case is counted, not measured. Each pass over W (DESIGN §3) costs M*k exponentials
and about 3*M*k*d fused multiply-adds; a forward runs L+1 passes, a backward L+1. On an H100 SXM:
- fp32 FMA without tensor cores: 67 TFLOP/s = 33.5e12 FMA/s (132 SMs x 128 lanes x 1.98 GHz);
- exp2 on the MUFU units: 16 per clock per SM x 132 SMs x 1.98 GHz = 4.2e12 exp/s;
- HBM3: 3.35 TB/s, W read once per pass.
The floor is the largest of the three times (the units work in parallel).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

H100_FMA_PER_S = 33.5e12
H100_EXP_PER_S = 16 * 132 * 1.98e9
H100_BYTES_PER_S = 3.35e12

ITERATIONS = 5
TAU = 2e-5  # the paper's temperature; weights are drawn with std 0.02 like a trained layer

# name, M rows, d, k. ResNet-50's 512x512x3x3 convolutions have 2,359,296 weights: M = 294,912
# rows at d = 8 (8 bits per centroid index, 1 bit per weight) or 2,359,296 at d = 1; the small
# case is a layer of 102,400 weights (M = 12,800 at d = 8).
CASES = [
    ("conv3x3-512 d8 k256", 294_912, 8, 256),
    ("small-layer d8 k256", 12_800, 8, 256),
    ("conv3x3-512 d1 k4", 2_359_296, 1, 4),
    ("conv3x3-512 d1 k16", 2_359_296, 1, 16),
    ("conv3x3-512 d8 k4096", 294_912, 8, 4096),
    ("small-layer d8 k4096", 12_800, 8, 4096),
]

BACKENDS = ("reference", "torch", "triton", "triton-deterministic")


def counted_floor(m: int, d: int, k: int, passes: int, itemsize: int = 4) -> dict:
    exps = passes * m * k
    fmas = passes * 3 * m * k * d
    bytes_read = passes * m * d * itemsize
    times = {
        "exp_s": exps / H100_EXP_PER_S,
        "fma_s": fmas / H100_FMA_PER_S,
        "memory_s": bytes_read / H100_BYTES_PER_S,
    }
    return {"exps": exps, "fmas": fmas, "bytes": bytes_read, **times, "floor_s": max(times.values())}


def reference_predicted_bytes(m: int, d: int, k: int, iterations: int) -> int:
    """The reference keeps, per iteration, the M x k attention and about three same-size tensors
    (distances, scores, softmax grad) for autograd, plus the backward's transients."""
    return 4 * (iterations + 1) * m * k * 4 + 4 * m * d * 4


def floors(m: int, d: int, k: int, iterations: int) -> dict:
    return {
        "forward": counted_floor(m, d, k, iterations + 1),
        "backward": counted_floor(m, d, k, iterations + 1),
        "forward+backward": counted_floor(m, d, k, 2 * iterations + 2),
    }


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dry_run(cases, iterations: int, cap_bytes: int) -> None:
    print(f"{len(cases)} cases, L = {iterations} iterations, tau = {TAU}; floors on an H100 "
          f"({H100_FMA_PER_S / 1e12:.1f}e12 FMA/s, {H100_EXP_PER_S / 1e12:.2f}e12 exp/s, "
          f"{H100_BYTES_PER_S / 1e12:.2f} TB/s)\n")
    print("| case | M | d | k | reference memory (predicted) | fwd floor | bwd floor | fwd+bwd floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m, d, k in cases:
        predicted = reference_predicted_bytes(m, d, k, iterations)
        note = "" if predicted <= cap_bytes else " (skipped: over cap)"
        f = floors(m, d, k, iterations)
        print(f"| {name} | {m} | {d} | {k} | {predicted / 2**30:.1f} GiB{note} | "
              f"{f['forward']['floor_s'] * 1e3:.3f} ms | {f['backward']['floor_s'] * 1e3:.3f} ms | "
              f"{f['forward+backward']['floor_s'] * 1e3:.3f} ms |")


def compile_check(cases) -> None:
    """Compile every kernel of every case's launch plan for sm_90 (no GPU needed) and print what
    ptxas reports: registers per thread and spilled bytes."""
    os.environ.pop("TRITON_INTERPRET", None)  # must be off before the kernels are defined
    import glob
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dkm_kernels.backends import triton_kernels as tk

    # Triton ships ptxas builds for several PTX versions: use the first that takes its PTX.
    ptxas_builds = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                                 "nvidia", "bin", "ptxas*"))) or ["ptxas"]
    scalar_types = {"neg_log2e_over_tau": "fp32", "two_over_tau": "fp32"}
    int_pointers = {"active_ptr", "last_ptr"}

    def report(kernel, constexprs, num_warps):
        signature = {name: "constexpr" if name in constexprs else
                     ("*i32" if name in int_pointers else "*fp32") if name.endswith("_ptr") else
                     scalar_types.get(name, "i32") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": 1})
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            for ptxas in ptxas_builds:
                result = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", ptx + ".cubin"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
        usage = [line.split("info    : ")[-1] for line in result.stderr.splitlines()
                 if "registers" in line or "spill" in line]
        print(f"  {kernel.__name__:24s} BLOCK_M={constexprs['BLOCK_M']:3d} "
              f"BLOCK_K={constexprs['BLOCK_K']:3d} warps={num_warps}: {'; '.join(usage)}")

    for name, m, d, k in cases:
        print(name)
        for backward in (False, True):
            tile = {"tile": tk.BACKWARD_SINGLE_BLOCK_TILE} if backward else {}
            plan = tk._Plan(1, m, k, d, True, torch.device("cpu"), **tile)
            blocks = dict(D=d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_m, BLOCK_K=plan.block_k)
            flags = dict(SINGLE_BLOCK=plan.single_block, ATOMIC=False)
            kernel = tk._backward_kernel if backward else tk._attention_sums_kernel
            report(kernel, {**blocks, **flags}, plan.num_warps)
            if not backward:
                report(tk._output_kernel, dict(blocks, BLOCK_M=plan.output_block_m,
                                               BLOCK_K=plan.output_block_k), plan.output_warps)


def measure(backend: str, weights, centroids, iterations: int, do_bench) -> dict:
    """Median times of forward, backward, forward+backward and the peak memory of one
    forward+backward above what was allocated before (inputs included in the baseline)."""
    import dkm_kernels

    name = "triton" if backend.startswith("triton") else backend
    deterministic = backend == "triton-deterministic"
    w = weights.detach().clone().requires_grad_(True)
    grad = torch.randn_like(w)

    def forward():
        return dkm_kernels.dkm(w, centroids, TAU, iterations, 0.0, backend=name,
                               deterministic=deterministic).weights

    def forward_backward():
        forward().backward(grad)

    forward_backward()  # compile and warm up
    torch.cuda.synchronize()
    w.grad = None
    forward_ms = do_bench(forward, return_mode="median")
    out = forward()
    backward_ms = do_bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=[w],
                           return_mode="median")
    del out
    both_ms = do_bench(forward_backward, grad_to_none=[w], return_mode="median")

    w.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    w.grad = None
    return {"forward_ms": forward_ms, "backward_ms": backward_ms,
            "forward+backward_ms": both_ms, "peak_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="list cases, predicted reference memory and floors; needs no GPU")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile the kernels for sm_90 and print registers/spills; no GPU")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--reference-cap-gb", type=float, default=40.0,
                        help="skip the reference where its predicted memory is above this")
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    cases = [c for c in CASES if args.cases in c[0]]
    cap_bytes = int(args.reference_cap_gb * 2**30)
    if args.dry_run:
        dry_run(cases, args.iterations, cap_bytes)
        return 0
    if args.compile_check:
        compile_check(cases)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to list the cases", file=sys.stderr)
        return 1

    import triton
    from triton.testing import do_bench

    import dkm_kernels

    backends = [b for b in args.backends.split(",") if b]
    device = torch.device("cuda")
    rows = []
    for name, m, d, k in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        weights = torch.randn(m, d, device=device, generator=gen) * 0.02
        centroids = dkm_kernels.kmeans_plus_plus(weights, k, generator=gen)
        case_floors = floors(m, d, k, args.iterations)
        for backend in backends:
            row = {"case": name, "M": m, "d": d, "k": k, "backend": backend,
                   "iterations": args.iterations, "floors": case_floors}
            predicted = reference_predicted_bytes(m, d, k, args.iterations)
            if backend == "reference" and predicted > cap_bytes:
                row["skipped"] = (f"predicted memory {predicted / 2**30:.1f} GiB is above the "
                                  f"cap of {args.reference_cap_gb} GiB")
            else:
                try:
                    row.update(measure(backend, weights, centroids, args.iterations, do_bench))
                except torch.cuda.OutOfMemoryError as error:
                    row["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                    torch.cuda.empty_cache()
            rows.append(row)
            print(_format_row(row), flush=True)
        del weights, centroids
        torch.cuda.empty_cache()

    now = datetime.datetime.now(datetime.timezone.utc)
    properties = torch.cuda.get_device_properties(device)
    record = {
        "device": torch.cuda.get_device_name(device),
        "sm_count": properties.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "tau": TAU,
        "assumed_h100": {"fma_per_s": H100_FMA_PER_S, "exp_per_s": H100_EXP_PER_S,
                         "bytes_per_s": H100_BYTES_PER_S},
        "results": rows,
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"gpu_{_slug(record['device'])}_{now.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print()
    print(markdown_table(rows))
    print(f"\nwritten to {out}")
    return 0


def _slug(text: str) -> str:
    return "".join(ch.lower() if ch.isalnum() else "-" for ch in text).strip("-")


def _format_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['case']:24s} {row['backend']:22s} skipped: {row['skipped']}"
    return (f"{row['case']:24s} {row['backend']:22s} fwd {row['forward_ms']:9.3f} ms  "
            f"bwd {row['backward_ms']:9.3f} ms  fwd+bwd {row['forward+backward_ms']:9.3f} ms  "
            f"peak {row['peak_bytes'] / 2**20:9.1f} MiB")


def markdown_table(rows) -> str:
    lines = ["| case | backend | fwd ms | bwd ms | fwd+bwd ms | floor fwd+bwd ms | x floor | "
             "peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        floor_ms = row["floors"]["forward+backward"]["floor_s"] * 1e3
        if "skipped" in row:
            lines.append(f"| {row['case']} | {row['backend']} | skipped: {row['skipped']} "
                         f"| | | {floor_ms:.3f} | | |")
            continue
        ratio = row["forward+backward_ms"] / floor_ms if floor_ms > 0 else math.nan
        lines.append(f"| {row['case']} | {row['backend']} | {row['forward_ms']:.3f} | "
                     f"{row['backward_ms']:.3f} | {row['forward+backward_ms']:.3f} | "
                     f"{floor_ms:.3f} | {ratio:.1f} | {row['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
