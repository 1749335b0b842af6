"""Each of the cpu backend's pass ops alone, for one checkout's build, beside torch.mm's rate.

    python benchmarks/cpu_passes.py --m 2359296 --d 1 --k 4 --threads 1
    python benchmarks/cpu_passes.py --root /work/other-checkout --m 294912 --d 8 --k 256

Prints the best of 7 calls (ms) of cpu_attention_sums, cpu_output and cpu_gradient_pass (without
and with grad_out, the first backward step), and the per-pass floor M k (3d + 10) / rate at the
torch.mm multiply-add rate measured in the same process (see cpu_floor.py for the counting).
Nothing is written: a quick look at which pass a change moved.
"""
from __future__ import annotations

import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose dkm_kernels is imported")
    parser.add_argument("--m", type=int, default=294_912)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))
    import torch

    import dkm_kernels

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    m, d, k, tau = args.m, args.d, args.k, 2e-5
    w = torch.randn(1, m, d, generator=gen) * 0.02
    c = dkm_kernels.random_rows(w, k, generator=gen)
    active = torch.ones(1, dtype=torch.bool)
    grad_over_mass, grad_dot_next = torch.randn(1, k, d, generator=gen), torch.randn(1, k, generator=gen)
    dw = torch.zeros_like(w)
    ops = torch.ops.dkm_kernels
    times = dict(
        attention_sums=best_ms(lambda: ops.cpu_attention_sums(w, w, c, active, tau)),
        output=best_ms(lambda: ops.cpu_output(w, c, c, tau)),
        gradient=best_ms(lambda: ops.cpu_gradient_pass(w, None, c, grad_over_mass, grad_dot_next, c, active, dw, tau)),
        gradient_first=best_ms(lambda: ops.cpu_gradient_pass(w, w, c, grad_over_mass, grad_dot_next, c, active, dw,
                                                             tau)),
    )
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    rate = n**3 / (best_ms(lambda: torch.mm(a, b)) / 1e3)
    floor_ms = m * k * (3 * d + 10) / rate * 1e3
    print(f"{dkm_kernels.__file__}: M={m:,} d={d} k={k} threads={args.threads}, torch.mm {rate / 1e9:.1f} G/s, "
          f"floor per pass {floor_ms:.2f} ms")
    for name, ms in times.items():
        print(f"  {name:<15} {ms:9.2f} ms  {ms / floor_ms:5.2f}x the floor")


if __name__ == "__main__":
    main()
