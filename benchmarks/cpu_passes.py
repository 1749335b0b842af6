"""Each of the cpu backend's pass ops alone, for one checkout's build, beside torch.mm's rate.

    python benchmarks/cpu_passes.py --m 2359296 --d 1 --k 4 --threads 1
    python benchmarks/cpu_passes.py --root /work/other-checkout --m 294912 --d 8 --k 256 --tau 4e-5

Prints the best of 7 calls (ms) of cpu_attention_sums, cpu_output and cpu_gradient_pass (without
and with grad_out, the first backward step), and the per-pass floor M k (3d + 10) / rate at the
torch.mm multiply-add rate measured in the same process (see cpu_floor.py for the counting).
Weights ~ N(0, 0.02^2), as the floor benchmark's. Each pass is also timed with every block dense
(DKM_KERNELS_SPARSE=0), the two ways in alternating calls, and the share of (row, centroid) pairs
attended at the starting centroids is printed: where d = 8 or 16 and few pairs are attended,
blocks take their pairs one by one. Nothing is written: a quick look at which pass a change moved.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time


def best_ms(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def best_ms_both_ways(fn, repeats=7):
    """Best of `repeats` calls with sparse blocks taken pair by pair and with every block dense,
    in alternating calls (a process's speed drifts; alternating keeps the two comparable)."""
    best = {"sparse": float("inf"), "dense": float("inf")}
    for i in range(repeats + 1):
        for way in ("sparse", "dense"):
            os.environ["DKM_KERNELS_SPARSE"] = "1" if way == "sparse" else "0"
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                best[way] = min(best[way], (time.perf_counter() - t0) * 1e3)
    os.environ.pop("DKM_KERNELS_SPARSE")
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose dkm_kernels is imported")
    parser.add_argument("--m", type=int, default=294_912)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--tau", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))
    import torch

    import dkm_kernels

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    m, d, k, tau = args.m, args.d, args.k, args.tau
    w = torch.randn(1, m, d, generator=gen) * 0.02
    c = dkm_kernels.random_rows(w, k, generator=gen)
    active = torch.ones(1, dtype=torch.bool)
    grad_over_mass, grad_dot_next = torch.randn(1, k, d, generator=gen), torch.randn(1, k, generator=gen)
    dw = torch.zeros_like(w)
    ops = torch.ops.dkm_kernels
    times = dict(
        attention_sums=best_ms_both_ways(lambda: ops.cpu_attention_sums(w, w, c, active, tau)),
        output=best_ms_both_ways(lambda: ops.cpu_output(w, c, c, tau)),
        gradient=best_ms_both_ways(
            lambda: ops.cpu_gradient_pass(w, None, c, grad_over_mass, grad_dot_next, c, active, dw, tau)),
        gradient_first=best_ms_both_ways(
            lambda: ops.cpu_gradient_pass(w, w, c, grad_over_mass, grad_dot_next, c, active, dw, tau)),
    )
    sample = w[0, :4096].double()
    dist = torch.cdist(sample, c[0].double()) ** 2
    exponent = (dist.min(1, keepdim=True).values - dist) * (math.log2(math.e) / tau)
    attended = (exponent > -126).double().mean().item()  # float32's flush (kernel_impl.h, vexp2)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    rate = n**3 / (best_ms(lambda: torch.mm(a, b)) / 1e3)
    floor_ms = m * k * (3 * d + 10) / rate * 1e3
    print(f"{dkm_kernels.__file__}: M={m:,} d={d} k={k} tau={tau:g} threads={args.threads}, torch.mm "
          f"{rate / 1e9:.1f} G/s, floor per pass {floor_ms:.2f} ms, {attended:.1%} of the pairs attended")
    for name, ms in times.items():
        print(f"  {name:<15} {ms['sparse']:9.2f} ms  {ms['sparse'] / floor_ms:5.2f}x the floor   every block dense "
              f"{ms['dense']:9.2f} ms  {ms['dense'] / floor_ms:5.2f}x  (sparse / dense {ms['sparse'] / ms['dense']:.2f})")


if __name__ == "__main__":
    main()
