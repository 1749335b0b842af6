"""The DKM clustering of every ResNet-50 weight at cv:8/8 fc:8/8, forward and backward, no network.

    python benchmarks/resnet50_clustering.py                      # cpu backend; writes results/cpu_resnet50_clustering.json
    python benchmarks/resnet50_clustering.py --measure-reference  # also the reference, per layer shape (minutes)

What runs: the 54 weights of benchmarks/resnet50_shapes.py (53 convolutions and the classifier;
k = 256; d = 8, or d = 1 for the two weights under 10,000 elements), random weights with
He-initialisation scales (std = sqrt(2 / fan_in)), random-row warm starts, tau = 2e-5, 5 iterations
with epsilon = 0 (every layer runs all 5: the most work). As in a training step, the forward of all
layers runs first and keeps its autograd graphs, then one backward through all of them with a
random upstream gradient. All of it in one fresh process: peak memory is that process's resident
high-water mark above its state once the weights and upstream gradients exist (see
benchmarks/common.py for the method). Targets: under 1 GB peak and under 16 s on a 2-core CPU.

The naive DKM (`reference`) keeps L * M * k float32 attention values per layer for backward; summed
over the model that bound is printed (the DESIGN's measurement: 19.1 GB peak, ~160 s). With
--measure-reference each distinct layer shape is measured once with the reference in a fresh
process (skipped above the cap), and the per-layer times are summed over the model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEFAULT_CAP_BYTES,
    _peak_bytes,
    _reset_peak,
    _rss_bytes,
    machine,
    measure_case,
    mib,
    write_json,
)
from resnet50_shapes import clustering_plan, numel  # noqa: E402

TAU, MAX_ITER = 2e-5, 5


def _worker(backend: str, repeats: int, threads: int | None) -> dict:
    import torch

    import dkm_kernels

    if threads:
        torch.set_num_threads(threads)
    plan = clustering_plan()
    gen = torch.Generator().manual_seed(0)
    layers = []
    for layer in plan:
        fan_in = numel(layer["shape"][1:])
        weight = torch.randn(layer["shape"], generator=gen) * math.sqrt(2.0 / fan_in)
        rows = weight.reshape(layer["m"], layer["d"])
        centroids = dkm_kernels.random_rows(rows, layer["k"], generator=gen)
        upstream = torch.randn(rows.shape, generator=gen)
        layers.append((rows, centroids, upstream))
    # First-call costs (thread pool, dispatch) are not the clustering's.
    tiny = torch.randn(64, 8, requires_grad=True)
    dkm_kernels.dkm(tiny, tiny[:4].detach(), 0.1, backend=backend).weights.sum().backward()

    exact = sys.platform.startswith("linux") and _reset_peak()
    baseline = _rss_bytes()
    runs = []
    for _ in range(repeats):
        params = [rows.detach().requires_grad_(True) for rows, _, _ in layers]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = [dkm_kernels.dkm(p, c, TAU, MAX_ITER, 0.0, backend=backend).weights
                for p, (_, c, _) in zip(params, layers)]
        t1 = time.perf_counter()
        torch.autograd.backward(outs, [u for _, _, u in layers])
        t2, c2 = time.perf_counter(), time.process_time()
        runs.append((t1 - t0, t2 - t1, t2 - t0, c2 - c0))
        del outs, params
    peak = _peak_bytes(exact)
    return dict(
        backend=backend,
        forward_s=statistics.median(r[0] for r in runs),
        backward_s=statistics.median(r[1] for r in runs),
        forward_backward_s=statistics.median(r[2] for r in runs),
        forward_backward_cpu_s=statistics.median(r[3] for r in runs),
        repeats=repeats,
        peak_bytes=max(0, peak - baseline),
        peak_method="VmHWM after clear_refs" if exact else "ru_maxrss",
        threads_used=torch.get_num_threads(),
    )


def run_model(backend: str, repeats: int, threads: int | None) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", backend, str(repeats), str(threads or 0)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_per_shape(cap_bytes: int) -> dict:
    """The reference on each distinct (M, d, k) once, fresh process each; times summed over the model."""
    counts: dict[tuple, int] = {}
    for layer in clustering_plan():
        key = (layer["m"], layer["d"], layer["k"])
        counts[key] = counts.get(key, 0) + 1
    cases, total, complete = [], 0.0, True
    for (m, d, k), count in sorted(counts.items(), key=lambda item: -item[0][0]):
        print(f"  reference M={m:,} d={d} k={k} (x{count}) ...", flush=True)
        case = measure_case("reference", 1, m, d, k, MAX_ITER, repeats=1, cap_bytes=cap_bytes)
        case["layers_of_this_shape"] = count
        cases.append(case)
        if "forward_backward_s" in case:
            total += count * case["forward_backward_s"]
        else:
            complete = False
    return dict(cases=cases, summed_forward_backward_s=total, complete=complete)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure-reference", action="store_true")
    parser.add_argument("--cap-gib", type=float, default=DEFAULT_CAP_BYTES / 2**30)
    parser.add_argument("--out", default="cpu_resnet50_clustering.json")
    args = parser.parse_args(argv)

    plan = clustering_plan()
    attention_bound = sum(MAX_ITER * p["m"] * p["k"] * 4 for p in plan)
    pairs = sum(p["m"] * p["k"] for p in plan)
    print(f"ResNet-50 cv:8/8 fc:8/8: {len(plan)} weights, {sum(p['numel'] for p in plan):,} elements, "
          f"sum of M*k = {pairs:,}")
    print(f"measuring {args.backend} (all layers, forward then backward, one process) ...", flush=True)
    ours = run_model(args.backend, args.repeats, args.threads)
    result = dict(benchmark="resnet50_clustering", tau=TAU, max_iter=MAX_ITER, epsilon=0.0,
                  machine=machine(), layers=plan, backend_result=ours,
                  reference_attention_bytes_lower_bound=attention_bound,
                  reference_design_measurement=dict(peak_bytes=19.1e9, forward_backward_s=160))
    # Work per pass: M*k exponentials and ~3*M*k*d multiply-adds, L+1 passes each way.
    passes = 2 * (MAX_ITER + 1)
    result["work"] = dict(passes=passes, exponentials=passes * pairs,
                          multiply_adds=passes * 3 * sum(p["m"] * p["k"] * p["d"] for p in plan))

    print(f"\n{args.backend}: forward {ours['forward_s']:.2f} s, backward {ours['backward_s']:.2f} s, "
          f"forward+backward {ours['forward_backward_s']:.2f} s (process CPU {ours['forward_backward_cpu_s']:.2f} s, "
          f"{ours['threads_used']} threads), peak {mib(ours['peak_bytes'])}")
    print(f"reference: keeps >= {attention_bound / 1e9:.1f} GB of attention for backward "
          f"(sum of L*M*k*4 bytes); measured in DESIGN: 19.1 GB peak, ~160 s")
    print(f"targets: peak < 1 GB ({'met' if ours['peak_bytes'] < 1e9 else 'NOT met'}), "
          f"time < 16 s ({'met' if ours['forward_backward_s'] < 16 else 'NOT met'})")
    if args.measure_reference:
        print("measuring the reference per layer shape ...", flush=True)
        ref = reference_per_shape(int(args.cap_gib * 2**30))
        result["reference_per_shape"] = ref
        note = "" if ref["complete"] else " (some shapes skipped: over cap)"
        print(f"reference, summed over layers: {ref['summed_forward_backward_s']:.1f} s{note}; "
              f"speedup {ref['summed_forward_backward_s'] / ours['forward_backward_s']:.1f}x")
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) or None)))
    else:
        main()
