"""k-means++ on CPU: the C++ op (dkm_kernels::cpu_kmeans_plus_plus) against the torch operations
per draw it replaces, in the same run, and both against the machine's floor.

    python benchmarks/cpu_kmeans.py                  # every case; writes results/cpu_kmeans.{json,md}
    python benchmarks/cpu_kmeans.py --cases 2bit_k4 --repeats 5
    python benchmarks/cpu_kmeans.py --skip-torch     # the op alone (the torch path takes minutes)

Cases: the 8/8 layer (294,912 x 8) at k = 4096, and the largest ResNet-50 convolution at 2 bits per
weight, one weight per row (2,359,296 x 1), at k = 256 and k = 4. Float32 weights ~ N(0, 0.02^2).

Floor, per the rates cpu_floor.py measures in this process (the best of before and after):
- compute: M k d multiply-adds (each row's distance to each new centroid) at torch.mm's rate;
- memory: per draw the rows read (4 M d bytes) and the nearest distances read and written (8 M),
  at the bandwidth of a large copy;
the larger of the two. Rows and distances of these cases (10.6 MiB and 18 MiB) fit this machine's
L3 cache (32 MiB), so a pass can beat the large copy's bandwidth: the memory floor is then not a
hard bound, the compute floor is, and the table gives the ratio to each.

Each case runs in a fresh process: the op's time is the best of --repeats runs after one warm-up,
the torch path's one run (it is the slow one). Wall and process CPU time are both recorded; on a
shared machine the CPU time, which does not count waiting for a core, is the steadier.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_floor import BYTES, measure_rates  # noqa: E402
from harness import (  # noqa: E402
    machine,
    results_path,
    run_worker,
    script_parser,
    serve_worker,
    trained_like_weights,
    write_json,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    dict(name="8/8_k4096", m=294_912, d=8, k=4096),
    dict(name="2bit_k256", m=2_359_296, d=1, k=256),
    dict(name="2bit_k4", m=2_359_296, d=1, k=4),
]


def floor(m: int, d: int, k: int, rates: dict, unit: str = "s") -> dict:
    compute = m * k * d / rates[f"fma_per_{unit}"]
    memory = k * m * (BYTES * d + 2 * BYTES) / rates[f"bytes_per_{unit}"]
    return {f"compute_floor_{unit}": compute, f"memory_floor_{unit}": memory, f"floor_{unit}": max(compute, memory)}


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _worker(case: dict) -> dict:
    sys.path.insert(0, case["root"])
    import torch

    from dkm_kernels import init
    from dkm_kernels.backends import cpu as cpu_backend

    weights = trained_like_weights((case["m"], case["d"]), torch.Generator().manual_seed(0))

    def op():
        init.kmeans_plus_plus(weights, case["k"], torch.Generator().manual_seed(1))

    def torch_path():
        init._per_group(init._kmeans_plus_plus_single, weights, case["k"], torch.Generator().manual_seed(1))

    assert init._fused_applies(weights), "the C++ op does not apply: is the extension built?"
    op()
    runs = [_timed(op) for _ in range(case["repeats"])]
    out = dict(op_s=min(r[0] for r in runs), op_cpu_s=min(r[1] for r in runs), isa=cpu_backend.isa(),
               threads=torch.get_num_threads())
    if not case["skip_torch"]:
        out["torch_s"], out["torch_cpu_s"] = _timed(torch_path)
    return out


def markdown(payload: dict) -> str:
    rates = payload["rates"]
    lines = [
        f"# k-means++ on CPU: the C++ op against torch per draw ({payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores, isa {payload['results'][0]['isa']})",
        "",
        f"Rates measured in the same run (the best of before and after): torch.mm "
        f"{rates['fma_per_s'] / 1e9:.1f} G multiply-adds/s, copy {rates['bytes_per_s'] / 1e9:.1f} GB/s. Float32.",
        "Floor: the larger of M k d multiply-adds at the torch.mm rate and k passes of 4 M d + 8 M bytes at",
        "the copy rate (these rows fit in L3, so the memory floor is not a hard bound). Wall / floor at",
        "the wall-clock rates, CPU / floor at the rates per CPU second (the steadier on a shared machine).",
        "",
        "| case | M | d | k | compute floor | memory floor | op | op wall / floor | op CPU / floor "
        "| op wall / compute floor | torch | torch wall / floor | torch / op (wall) | torch / op (CPU) |",
        "|---" * 14 + "|",
    ]
    for r in payload["results"]:
        cells = [r["name"], f"{r['m']:,}", str(r["d"]), str(r["k"]), f"{r['compute_floor_s'] * 1e3:.0f} ms",
                 f"{r['memory_floor_s'] * 1e3:.0f} ms", f"{r['op_s'] * 1e3:.0f} ms",
                 f"{r['op_s'] / r['floor_s']:.2f}", f"**{r['op_cpu_s'] / r['floor_cpu_s']:.2f}**",
                 f"{r['op_s'] / r['compute_floor_s']:.1f}"]
        if "torch_s" in r:
            cells += [f"{r['torch_s']:.2f} s", f"{r['torch_s'] / r['floor_s']:.1f}",
                      f"**{r['torch_s'] / r['op_s']:.1f}**", f"{r['torch_cpu_s'] / r['op_cpu_s']:.1f}"]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{payload['command']}`; commit {payload['machine']['commit']}, "
              f"{payload['machine']['date']}, load average {payload['machine'].get('load_average_1min')} "
              "at the start (the machine was shared)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = script_parser(__doc__, repeats=3, out="cpu_kmeans.json")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--skip-torch", action="store_true", help="time the op only")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.cases or c["name"] in args.cases.split(",")]
    info = machine()
    rates_before = measure_rates()
    results = []
    for case in cases:
        r = run_worker(__file__, dict(case, root=ROOT, repeats=args.repeats, skip_torch=args.skip_torch),
                       separate_mappings=False)
        results.append(dict(case, **{key: value for key, value in r.items() if key not in case}))
        print(f"{case['name']:>10}: op {r['op_s']:.3f} s (cpu {r['op_cpu_s']:.3f} s)"
              + (f", torch {r['torch_s']:.2f} s" if "torch_s" in r else ""), flush=True)
    rates_after = measure_rates()
    rates = {key: max(rates_before[key], rates_after[key])
             for key in ("fma_per_s", "bytes_per_s", "fma_per_cpu_s", "bytes_per_cpu_s")}
    for row in results:
        for unit in ("s", "cpu_s"):
            row.update(floor(row["m"], row["d"], row["k"], rates, unit))
    payload = dict(benchmark="cpu_kmeans", machine=info, rates=rates, rates_before=rates_before,
                   rates_after=rates_after,
                   command="python benchmarks/cpu_kmeans.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   results=results)
    text = markdown(payload)
    print(text)
    path = write_json(results_path(args.out), payload)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(text)
    return payload


if __name__ == "__main__":
    if not serve_worker(_worker):
        main()
