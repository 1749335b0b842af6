"""Each of the cpu backend's pass ops alone, for one checkout's build, beside torch.mm's rate.

    python benchmarks/cpu_passes.py --m 2359296 --d 1 --k 4 --threads 1
    python benchmarks/cpu_passes.py --root /work/other-checkout --m 294912 --d 8 --k 256 --tau 4e-5
    python benchmarks/cpu_passes.py --baseline-library /tmp/base/dkm_kernels/_C.cpython-311-x86_64-linux-gnu.so

Prints the best of --repeats calls (ms) of cpu_attention_sums, cpu_output and cpu_gradient_pass
(without and with grad_out, the first backward step), and the per-pass floor M k (3d + 10) / rate
at the torch.mm multiply-add rate measured in the same process (see cpu_floor.py for the
counting). Weights ~ N(0, 0.02^2), as the floor benchmark's, and the shares of (row, centroid)
pairs attended at the starting centroids (exponential not flushed) and listed (above 2^-60, the
relevance of certified centroids, docs/design.md §8) and of one-hot rows: where d = 8 or 16 and
few pairs are listed, blocks take their pairs one by one. Each pass is timed two ways in
alternating calls (a process's speed drifts; alternating keeps the two comparable), with the best
of each and the median of the calls' ratios:
- by default, as built against every block dense (DKM_KERNELS_SPARSE=0);
- with --baseline-library, this checkout's build against another build of the ops loaded in the
  same process, whether their results are bit-identical too. Build the other one (a commit that
  has DKM_KERNELS_OPS_NAMESPACE) so that its ops do not collide with these:
      git worktree add /tmp/base <commit> && cd /tmp/base && \
          DKM_KERNELS_OPS_NAMESPACE=dkm_kernels_baseline python setup.py build_ext --inplace
  Then also the whole op: `dkm` forward and backward (L = 5, epsilon = 0) on the cpu backend,
  whose pass methods call one build's ops, then the other's, in turns.
Nothing is written: a quick look at which pass a change moved.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
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


def best_ms_alternating(ways: dict, repeats: int) -> dict:
    """Per way (name -> call), the best time of `repeats` calls in ms, the ways called in turns,
    and "ratio": the median over the turns of the first way's time over the second's."""
    best = {way: float("inf") for way in ways}
    ratios = []
    for i in range(repeats + 1):
        turn = {}
        for way, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            turn[way] = (time.perf_counter() - t0) * 1e3
        if i:  # the first turn warms up
            best = {way: min(best[way], turn[way]) for way in ways}
            first, second = turn.values()
            ratios.append(first / second)
    return dict(best, ratio=statistics.median(ratios))


def sparse_switch(fn, value):
    """fn with DKM_KERNELS_SPARSE set to value for the call."""
    def call():
        os.environ["DKM_KERNELS_SPARSE"] = value
        try:
            return fn()
        finally:
            os.environ.pop("DKM_KERNELS_SPARSE")
    return call


def with_masses(op, mass) -> tuple:
    """The masses as the gradient op's last argument where it takes them (a build before it did
    not): they let it skip pairs too small to count (docs/design.md §8, relevance)."""
    return (mass,) if any(argument.name == "mass" for argument in op.default._schema.arguments) else ()


def same_results(a, b) -> bool:
    """Whether two pass ops' results (a tensor or a tuple of them) are bit-identical."""
    import torch

    a, b = (x if isinstance(x, (tuple, list)) else (x,) for x in (a, b))
    return all(torch.equal(x, y) for x, y in zip(a, b))


def whole_op_times(dkm_kernels, w, c, tau, repeats) -> dict:
    """dkm forward and backward (as "forward" and "backward" rows), this build against the baseline
    in turns: the cpu backend's Passes call the one build's ops or the other's."""
    import torch

    from dkm_kernels.backends import cpu

    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    own = {name: getattr(cpu.Passes, name) for name in ("attention_sums", "output", "gradient")}

    def on(ops):
        def attention_sums(self, values, centroids, active):
            return ops.cpu_attention_sums(self.weights, values, centroids, active, self.tau)

        def output(self, attention_centroids, final_centroids):
            return ops.cpu_output(self.weights, attention_centroids, final_centroids, self.tau)

        def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids, active,
                     grad_weights, mass):
            return ops.cpu_gradient_pass(self.weights, grad_out, centroids, grad_over_mass, grad_dot_next,
                                         final_centroids, active, grad_weights, self.tau,
                                         *with_masses(ops.cpu_gradient_pass, mass))
        return dict(attention_sums=attention_sums, output=output, gradient=gradient)

    builds = dict(this=on(torch.ops.dkm_kernels), baseline=on(torch.ops.dkm_kernels_baseline))
    spent = {build: dict(forward=[], backward=[]) for build in builds}

    def run(build):
        def call():
            for name, method in builds[build].items():
                setattr(cpu.Passes, name, method)
            try:
                weights = w.detach().requires_grad_(True)
                t0 = time.perf_counter()
                result = dkm_kernels.dkm(weights, c, tau, 5, 0.0, backend="cpu")
                t1 = time.perf_counter()
                result.weights.backward(upstream)
                spent[build]["forward"].append((t1 - t0) * 1e3)
                spent[build]["backward"].append((time.perf_counter() - t1) * 1e3)
            finally:
                for name, method in own.items():
                    setattr(cpu.Passes, name, method)
        return call

    best_ms_alternating(dict(this=run("this"), baseline=run("baseline")), repeats)
    rows = {}
    for part in ("forward", "backward"):
        this, baseline = (spent[build][part][1:] for build in builds)  # the first turn warms up
        rows[part] = dict(this=min(this), baseline=min(baseline),
                          ratio=statistics.median(a / b for a, b in zip(this, baseline)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose dkm_kernels is imported")
    parser.add_argument("--m", type=int, default=294_912)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--tau", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each way (after a warm-up)")
    parser.add_argument("--baseline-library", metavar="PATH",
                        help="the _C library of another build, whose ops register as "
                             "torch.ops.dkm_kernels_baseline: compared with this build instead of all-dense")
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
    mass = torch.ops.dkm_kernels.cpu_attention_sums(w, w, c, active, tau)[1]

    def passes(ops):
        dw = torch.zeros_like(w)  # the gradient pass adds into it: one per build
        masses = with_masses(ops.cpu_gradient_pass, mass)
        return dict(
            attention_sums=lambda: ops.cpu_attention_sums(w, w, c, active, tau),
            output=lambda: ops.cpu_output(w, c, c, tau),
            gradient=lambda: ops.cpu_gradient_pass(w, None, c, grad_over_mass, grad_dot_next, c, active, dw, tau,
                                                   *masses),
            gradient_first=lambda: ops.cpu_gradient_pass(w, w, c, grad_over_mass, grad_dot_next, c, active, dw,
                                                         tau, *masses),
        )

    this = passes(torch.ops.dkm_kernels)
    if args.baseline_library:
        torch.ops.load_library(args.baseline_library)
        baseline = passes(torch.ops.dkm_kernels_baseline)
        names = ("this", "baseline")
        ways = {name: dict(this=fn, baseline=baseline[name]) for name, fn in this.items()}
        identical = {name: same_results(fn(), baseline[name]()) for name, fn in this.items()}
    else:
        names, identical = ("sparse", "dense"), {}
        ways = {name: dict(sparse=sparse_switch(fn, "1"), dense=sparse_switch(fn, "0")) for name, fn in this.items()}
    times = {name: best_ms_alternating(pair, args.repeats) for name, pair in ways.items()}
    if args.baseline_library:
        times.update(whole_op_times(dkm_kernels, w, c, tau, args.repeats))
    sample = w[0, :4096].double()
    dist = torch.cdist(sample, c[0].double()) ** 2
    exponent = (dist.min(1, keepdim=True).values - dist) * (math.log2(math.e) / tau)
    attended = (exponent > -126).double().mean().item()  # float32's flush (kernel_impl.h, vexp2)
    listed = exponent >= -60  # csrc/kernels.h, kRelevanceExponent
    one_hot = (listed.sum(1) == 1).double().mean().item()
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    rate = n**3 / (best_ms(lambda: torch.mm(a, b)) / 1e3)
    floor_ms = m * k * (3 * d + 10) / rate * 1e3
    print(f"{dkm_kernels.__file__}: M={m:,} d={d} k={k} tau={tau:g} threads={args.threads}, torch.mm "
          f"{rate / 1e9:.1f} G/s, floor per pass {floor_ms:.2f} ms, {attended:.1%} of the pairs attended, "
          f"{listed.double().mean().item():.1%} listed, {one_hot:.1%} of the rows one-hot")
    first, second = names
    label = "every block dense" if second == "dense" else "baseline"
    for name, ms in times.items():
        floor = floor_ms * (6 if name in ("forward", "backward") else 1)  # L + 1 = 6 passes each
        line = (f"  {name:<15} {ms[first]:9.2f} ms  {ms[first] / floor:5.2f}x the floor   {label} "
                f"{ms[second]:9.2f} ms  {ms[second] / floor:5.2f}x  ({first} / {second} best "
                f"{ms[first] / ms[second]:.3f}, median of turns {ms['ratio']:.3f})")
        if name in identical:
            line += "  identical" if identical[name] else "  results differ"
        print(line)
    if "backward" in times:
        print("  backward / forward: " + ", ".join(
            f"{build} {times['backward'][build] / times['forward'][build]:.3f}" for build in names))

if __name__ == "__main__":
    main()
