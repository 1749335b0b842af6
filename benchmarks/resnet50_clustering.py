"""The DKM clustering of every ResNet-50 weight at cv:8/8 fc:8/8, forward and backward, no network.

    python benchmarks/resnet50_clustering.py                      # cpu backend, per layer and in one
                                                                  # dkm_many call; writes results/cpu_resnet50_clustering.json
    python benchmarks/resnet50_clustering.py --repeats 3 --rounds 3   # as recorded
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

Three ways are compared, each in a fresh process per round and interleaved round by round (on a
shared machine a slow spell then hits all of them): one `dkm` call per layer; one `dkm_many` call
on the per-problem passes (`many.RaggedPasses`: every layer's own pass ops, one after another);
one `dkm_many` call on the backend's own passes over all layers (the cpu backend: one parallel
region per pass, docs/design.md §12). Ratios are taken within a round, then the median. The
floor (benchmarks/cpu_floor.py: per pass the larger of compute and memory time at this machine's
rates, measured before and after at --threads) is summed over the layers; CPU time over it is the
steadier measure on a shared machine. Two ratios are printed: the median run's CPU time, and (as
cpu_floor.py takes it) the least CPU time of any run, both over the floor at the best rates.

The naive DKM (`reference`) keeps L * M * k float32 attention values per layer for backward; summed
over the model that bound is printed (measured once for docs/design.md §2: 19.1 GB peak, ~160 s). With
--measure-reference each distinct layer shape is measured once with the reference in a fresh
process (skipped above the cap), and the per-layer times are summed over the model.
"""
from __future__ import annotations

import math
import os
import statistics
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
from cpu_floor import floor, measure_rates  # noqa: E402
from resnet50_shapes import clustering_plan, numel  # noqa: E402

# The naive DKM on the whole clustering as measured once (docs/design.md §2) (recorded, not rerun: over the cap).
REFERENCE_DESIGN_PEAK_BYTES = 19.1e9
REFERENCE_DESIGN_SECONDS = 160
# The targets on a 2-core CPU.
PEAK_TARGET_BYTES = 1e9
TIME_TARGET_SECONDS = 16

# The ways of running the model's clustering: result key -> label.
WAYS = {"backend_result": "one dkm call per layer",
        "per_problem_passes_result": "one dkm_many call, per-problem passes",
        "one_call_result": "one dkm_many call"}


def _worker(job: dict) -> dict:
    import torch

    import dkm_kernels

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if job["way"] == "per_problem_passes_result":  # dkm_many without the backend's own passes
        dkm_kernels.backends.ragged_passes_class = lambda *args: None
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
            if job["way"] != "backend_result":  # every layer in one dkm_many call (docs/design.md §12)
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
        best_forward_backward_cpu_s=min(run.forward_backward_cpu_s for run in runs),
        repeats=job["repeats"],
        **peak.fields(),
        threads_used=torch.get_num_threads(),
    )


def run_model(backend: str, repeats: int, threads: int | None, layer_count: int,
              way: str = "backend_result") -> dict:
    # Without measure_case's separate mappings: the figure in results/ was recorded so.
    job = dict(backend=backend, repeats=repeats, threads=threads, layer_count=layer_count, way=way)
    return run_worker(__file__, job, separate_mappings=False)


def interleaved(args) -> tuple[dict, list[dict]]:
    """Every way once per round, in a fresh process each; per way the median over rounds of each
    field, and every round's results."""
    rounds = []
    for r in range(args.rounds):
        found = {}
        for way, label in WAYS.items():
            print(f"  round {r + 1}/{args.rounds}: {label} ...", flush=True)
            found[way] = run_model(args.backend, args.repeats, args.threads, args.layers, way)
        rounds.append(found)
    median = {way: {key: (statistics.median(r[way][key] for r in rounds)
                          if isinstance(rounds[0][way][key], (int, float)) else rounds[0][way][key])
                    for key in rounds[0][way]} for way in WAYS}
    return median, rounds


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
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the three ways")
    parser.add_argument("--measure-reference", action="store_true")
    parser.add_argument("--layers", type=int, default=len(clustering_plan()),
                        help="only the first N weights, for a quick check of the script")
    args = parser.parse_args(argv)
    if args.threads:  # the rates at the threads the layers run on: the floor per CPU second depends on them
        import torch

        torch.set_num_threads(args.threads)

    plan = clustering_plan()[:args.layers]
    attention_bound = sum(naive_attention_bytes(p["m"], p["k"]) for p in plan)
    pairs = sum(p["m"] * p["k"] for p in plan)
    print(f"ResNet-50 cv:8/8 fc:8/8: {len(plan)} weights, {sum(p['numel'] for p in plan):,} elements, "
          f"sum of M*k = {pairs:,}")
    print(f"measuring {args.backend} (all layers, forward then backward, one process per way and "
          f"round) ...", flush=True)
    rates = [measure_rates()]
    ways, rounds = interleaved(args)
    rates.append(measure_rates())
    best = {key: max(r[key] for r in rates) for key in rates[0]}
    ours = ways["backend_result"]
    result = dict(benchmark="resnet50_clustering", tau=PAPER_TAU, max_iter=ITERATIONS, epsilon=0.0,
                  machine=machine(), layers=plan, **ways, rounds=rounds,
                  reference_attention_bytes_lower_bound=attention_bound,
                  reference_design_measurement=dict(peak_bytes=REFERENCE_DESIGN_PEAK_BYTES,
                                                    forward_backward_s=REFERENCE_DESIGN_SECONDS))
    passes = 2 * passes_per_direction(ITERATIONS)  # forward and backward
    work = [counted_work(p["m"], p["d"], p["k"], passes) for p in plan]
    result["work"] = dict(passes=passes, exponentials=sum(w["exps"] for w in work),
                          multiply_adds=sum(w["fmas"] for w in work))
    floors = {unit: sum(floor(p["m"], p["d"], p["k"], best, unit=unit)[f"floor_{unit}"] for p in plan)
              for unit in ("s", "cpu_s")}
    result["floor"] = dict(rates=best, summed_floor_s=floors["s"], summed_floor_cpu_s=floors["cpu_s"])
    for way, label in WAYS.items():
        found = ways[way]
        found["cpu_over_summed_floor"] = found["forward_backward_cpu_s"] / floors["cpu_s"]
        found["wall_over_summed_floor"] = found["forward_backward_s"] / floors["s"]
        # As cpu_floor.py: the least CPU time of any run against the machine's best rates.
        found["best_cpu_over_summed_floor"] = min(
            r[way]["best_forward_backward_cpu_s"] for r in rounds) / floors["cpu_s"]
        print(f"\n{args.backend}, {label}: forward {found['forward_s']:.2f} s, backward "
              f"{found['backward_s']:.2f} s, forward+backward {found['forward_backward_s']:.2f} s "
              f"(process CPU {found['forward_backward_cpu_s']:.2f} s, {found['threads_used']} threads), "
              f"peak {mib(found['peak_bytes'])}; CPU time {found['cpu_over_summed_floor']:.2f}x the "
              f"layers' summed floor ({floors['cpu_s']:.2f} CPU s), the least of any run "
              f"{found['best_cpu_over_summed_floor']:.2f}x")
    for way in ("per_problem_passes_result", "one_call_result"):
        for field, name in (("forward_backward_s", "wall"), ("forward_backward_cpu_s", "cpu")):
            key = way.replace("_result", "") + f"_over_per_layer_{name}"
            result[key] = statistics.median(r[way][field] / r["backend_result"][field] for r in rounds)
    result["one_call_over_per_layer"] = result["one_call_over_per_layer_wall"]
    result["one_call_over_per_problem_passes_cpu"] = statistics.median(
        r["one_call_result"]["forward_backward_cpu_s"] / r["per_problem_passes_result"]["forward_backward_cpu_s"]
        for r in rounds)
    print(f"forward+backward, medians over {args.rounds} round(s) of the ratios within a round: "
          f"one call / per layer {result['one_call_over_per_layer_wall']:.3f} wall, "
          f"{result['one_call_over_per_layer_cpu']:.3f} CPU; per-problem passes / per layer "
          f"{result['per_problem_passes_over_per_layer_wall']:.3f} wall, "
          f"{result['per_problem_passes_over_per_layer_cpu']:.3f} CPU; one call / per-problem passes "
          f"{result['one_call_over_per_problem_passes_cpu']:.3f} CPU")
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
