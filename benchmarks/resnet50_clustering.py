"""The DKM clustering of every ResNet-50 weight at cv:8/8 fc:8/8, forward and backward, no network.

    python benchmarks/resnet50_clustering.py                      # cpu backend, per layer and in one
                                                                  # dkm_many call; writes results/cpu_resnet50_clustering.json
    python benchmarks/resnet50_clustering.py --measure-reference  # also the reference, per layer shape (minutes)
    python benchmarks/resnet50_clustering.py --layers 2 --measure-reference --out /tmp/c.json  # a quick check

What runs: the 54 weights of benchmarks/resnet50_shapes.py (53 convolutions and the classifier;
k = 256; d = 8, or d = 1 for the two weights under 10,000 elements), random weights with
He-initialisation scales (std = sqrt(2 / fan_in)), random-row warm starts, tau = 2e-5, 5 iterations
with epsilon = 0 (every layer runs all 5: the most work). As in a training step, the forward of all
layers runs first and keeps its autograd graphs, then one backward through all of them with a
random upstream gradient. All of it in one fresh process: peak memory is that process's resident
high-water mark above its state once the weights and upstream gradients exist (see
benchmarks/harness.py for the method; here without its separate mappings, as recorded). Targets:
under 1 GB peak and under 16 s on a 2-core CPU.

The naive DKM (`reference`) keeps L * M * k float32 attention values per layer for backward; summed
over the model that bound is printed (measured once for docs/design.md §2: 19.1 GB peak, ~160 s). With
--measure-reference each distinct layer shape is measured once with the reference in a fresh
process (skipped above the cap), and the per-layer times are summed over the model.
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ITERATIONS,
    PAPER_TAU,
    ResidentPeak,
    counted_work,
    machine,
    measure_case,
    median_times,
    mib,
    naive_attention_bytes,
    passes_per_direction,
    results_path,
    run_worker,
    script_parser,
    serve_worker,
    time_forward_backward,
    write_json,
)
from resnet50_shapes import clustering_plan, numel  # noqa: E402

# The naive DKM on the whole clustering as measured once (docs/design.md §2) (recorded, not rerun: over the cap).
REFERENCE_DESIGN_PEAK_BYTES = 19.1e9
REFERENCE_DESIGN_SECONDS = 160
# The targets on a 2-core CPU.
PEAK_TARGET_BYTES = 1e9
TIME_TARGET_SECONDS = 16


def _worker(job: dict) -> dict:
    import torch

    import dkm_kernels

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    gen = torch.Generator().manual_seed(0)
    layers = []
    for layer in clustering_plan()[:job["layer_count"]]:
        fan_in = numel(layer["shape"][1:])
        weight = torch.randn(layer["shape"], generator=gen) * math.sqrt(2.0 / fan_in)  # He init
        rows = weight.reshape(layer["m"], layer["d"])
        centroids = dkm_kernels.random_rows(rows, layer["k"], generator=gen)
        upstream = torch.randn(rows.shape, generator=gen)
        layers.append((rows, centroids, upstream))
    # First-call costs (thread pool, dispatch) are not the clustering's: any tiny problem pays them.
    tiny = torch.randn(64, 8, requires_grad=True)
    dkm_kernels.dkm(tiny, tiny[:4].detach(), 0.1, backend=job["backend"]).weights.sum().backward()

    runs = []
    with ResidentPeak() as peak:
        for _ in range(job["repeats"]):
            params = [rows.detach().requires_grad_(True) for rows, _, _ in layers]
            if job["one_call"]:  # every layer in one dkm_many call (docs/design.md §12)
                def forward():
                    problems = [(p, c, PAPER_TAU, ITERATIONS, 0.0) for p, (_, c, _) in zip(params, layers)]
                    return [r.weights for r in dkm_kernels.dkm_many(problems, backend=job["backend"])]
            else:
                def forward():
                    return [dkm_kernels.dkm(p, c, PAPER_TAU, ITERATIONS, 0.0, backend=job["backend"]).weights
                            for p, (_, c, _) in zip(params, layers)]
            timing, outs = time_forward_backward(
                forward, lambda outs: torch.autograd.backward(outs, [u for _, _, u in layers]))
            runs.append(timing)
            del outs, params
    return dict(
        backend=job["backend"],
        **median_times(runs),
        repeats=job["repeats"],
        **peak.fields(),
        threads_used=torch.get_num_threads(),
    )


def run_model(backend: str, repeats: int, threads: int | None, layer_count: int,
              one_call: bool = False) -> dict:
    # Without measure_case's separate mappings: the figure in results/ was recorded so.
    job = dict(backend=backend, repeats=repeats, threads=threads, layer_count=layer_count,
               one_call=one_call)
    return run_worker(__file__, job, separate_mappings=False)


def reference_per_shape(plan: list[dict], cap_bytes: int) -> dict:
    """The reference on each distinct (M, d, k) once, fresh process each; times summed over the model."""
    counts: dict[tuple, int] = {}
    for layer in plan:
        key = (layer["m"], layer["d"], layer["k"])
        counts[key] = counts.get(key, 0) + 1
    cases, total, complete = [], 0.0, True
    for (m, d, k), count in sorted(counts.items(), key=lambda item: -item[0][0]):
        print(f"  reference M={m:,} d={d} k={k} (x{count}) ...", flush=True)
        case = measure_case("reference", 1, m, d, k, ITERATIONS, repeats=1, cap_bytes=cap_bytes)
        case["layers_of_this_shape"] = count
        cases.append(case)
        if "forward_backward_s" in case:
            total += count * case["forward_backward_s"]
        else:
            complete = False
    return dict(cases=cases, summed_forward_backward_s=total, complete=complete)


def main(argv=None) -> dict:
    parser = script_parser(__doc__, backend="cpu", repeats=1, reference_cap=True,
                           out="cpu_resnet50_clustering.json")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure-reference", action="store_true")
    parser.add_argument("--layers", type=int, default=len(clustering_plan()),
                        help="only the first N weights, for a quick check of the script")
    args = parser.parse_args(argv)

    plan = clustering_plan()[:args.layers]
    attention_bound = sum(naive_attention_bytes(p["m"], p["k"]) for p in plan)
    pairs = sum(p["m"] * p["k"] for p in plan)
    print(f"ResNet-50 cv:8/8 fc:8/8: {len(plan)} weights, {sum(p['numel'] for p in plan):,} elements, "
          f"sum of M*k = {pairs:,}")
    print(f"measuring {args.backend} (all layers, forward then backward, one process) ...", flush=True)
    ours = run_model(args.backend, args.repeats, args.threads, args.layers)
    result = dict(benchmark="resnet50_clustering", tau=PAPER_TAU, max_iter=ITERATIONS, epsilon=0.0,
                  machine=machine(), layers=plan, backend_result=ours,
                  reference_attention_bytes_lower_bound=attention_bound,
                  reference_design_measurement=dict(peak_bytes=REFERENCE_DESIGN_PEAK_BYTES,
                                                    forward_backward_s=REFERENCE_DESIGN_SECONDS))
    passes = 2 * passes_per_direction(ITERATIONS)  # forward and backward
    work = [counted_work(p["m"], p["d"], p["k"], passes) for p in plan]
    result["work"] = dict(passes=passes, exponentials=sum(w["exps"] for w in work),
                          multiply_adds=sum(w["fmas"] for w in work))

    print("measuring the same in one dkm_many call ...", flush=True)
    together = run_model(args.backend, args.repeats, args.threads, args.layers, one_call=True)
    result["one_call_result"] = together
    for label, found in (("one dkm call per layer", ours), ("one dkm_many call", together)):
        print(f"\n{args.backend}, {label}: forward {found['forward_s']:.2f} s, backward "
              f"{found['backward_s']:.2f} s, forward+backward {found['forward_backward_s']:.2f} s "
              f"(process CPU {found['forward_backward_cpu_s']:.2f} s, {found['threads_used']} threads), "
              f"peak {mib(found['peak_bytes'])}")
    result["one_call_over_per_layer"] = together["forward_backward_s"] / ours["forward_backward_s"]
    print(f"one call / per layer, forward+backward: {result['one_call_over_per_layer']:.3f}")
    print(f"reference: keeps >= {attention_bound / 1e9:.1f} GB of attention for backward "
          f"(sum of L*M*k*4 bytes); measured once (docs/design.md §2): {REFERENCE_DESIGN_PEAK_BYTES / 1e9:.1f} GB peak, "
          f"~{REFERENCE_DESIGN_SECONDS} s")
    peak_met = ours["peak_bytes"] < PEAK_TARGET_BYTES
    time_met = ours["forward_backward_s"] < TIME_TARGET_SECONDS
    print(f"targets: peak < {PEAK_TARGET_BYTES / 1e9:.0f} GB ({'met' if peak_met else 'NOT met'}), "
          f"time < {TIME_TARGET_SECONDS} s ({'met' if time_met else 'NOT met'})")
    if args.measure_reference:
        print("measuring the reference per layer shape ...", flush=True)
        ref = reference_per_shape(plan, int(args.cap_gib * 2**30))
        result["reference_per_shape"] = ref
        note = "" if ref["complete"] else " (some shapes skipped: over cap)"
        print(f"reference, summed over layers: {ref['summed_forward_backward_s']:.1f} s{note}; "
              f"speedup {ref['summed_forward_backward_s'] / ours['forward_backward_s']:.1f}x")
    write_json(results_path(args.out), result)
    return result


if __name__ == "__main__":
    if not serve_worker(_worker):
        main()
