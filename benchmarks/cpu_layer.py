"""One 512x512x3x3 layer at 8/8 (M = 294,912 rows of d = 8, k = 256, 5 iterations), forward and
backward, with the `reference`, `torch` and `cpu` backends, each in a fresh process.

    python benchmarks/cpu_layer.py                 # prints a table, writes benchmarks/results/cpu_layer.json
    python benchmarks/cpu_layer.py --repeats 5 --out cpu_layer_run2.json
    python benchmarks/cpu_layer.py --rows 1024 --repeats 1 --out /tmp/cpu_layer.json   # a quick check

Times are medians of `--repeats` runs after one warm-up; peak memory is the process's resident
high-water mark above its state before the first run (benchmarks/harness.py explains the method).
Ratios are against the reference measured in the same run. Targets for `cpu`: >= 10x faster and
>= 20x lower peak than the reference.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ITERATIONS,
    machine,
    measure_case,
    mib,
    results_path,
    script_parser,
    write_json,
)

# 8 bits per centroid index at d = 8: k = 256 centroids, M = numel / 8 rows.
LAYER = dict(groups=1, m=512 * 512 * 3 * 3 // 8, d=8, k=256, max_iter=ITERATIONS)


def main(argv=None) -> dict:
    parser = script_parser(__doc__, repeats=3, reference_cap=True, out="cpu_layer.json")
    # The reference runs last: the OS reclaiming its 3.6 GB afterwards slows whatever runs next.
    parser.add_argument("--backends", default="cpu,torch,reference")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=LAYER["m"],
                        help="M, for a quick check of the script at a smaller size")
    args = parser.parse_args(argv)
    layer = dict(LAYER, m=args.rows)

    rows = []
    for backend in args.backends.split(","):
        print(f"measuring {backend} ...", flush=True)
        rows.append(measure_case(backend, dtype=args.dtype, repeats=args.repeats,
                                 cap_bytes=int(args.cap_gib * 2**30), **layer))

    rows.sort(key=lambda r: r["backend"] != "reference")  # reference first in the table
    ref = next((r for r in rows if r["backend"] == "reference" and "forward_s" in r), None)
    print(f"\n512x512x3x3 layer, M={layer['m']:,} d={layer['d']} k={layer['k']} "
          f"{layer['max_iter']} iterations, {args.dtype}")
    header = f"{'backend':<10} {'forward':>9} {'backward':>9} {'fwd+bwd':>9} {'cpu time':>9} {'peak':>11} {'speedup':>8} {'peak ratio':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "forward_s" not in r:
            print(f"{r['backend']:<10} {r.get('skipped') or r.get('error')}")
            continue
        if ref:
            r["speedup_vs_reference"] = ref["forward_backward_s"] / r["forward_backward_s"]
            r["peak_ratio_vs_reference"] = ref["peak_bytes"] / max(r["peak_bytes"], 1)
        speed = f"{r['speedup_vs_reference']:.1f}x" if ref else "-"
        peak = f"{r['peak_ratio_vs_reference']:.1f}x" if ref else "-"
        print(f"{r['backend']:<10} {r['forward_s']:>8.2f}s {r['backward_s']:>8.2f}s "
              f"{r['forward_backward_s']:>8.2f}s {r['forward_backward_cpu_s']:>8.2f}s "
              f"{mib(r['peak_bytes']):>11} {speed:>8} {peak:>10}")
    payload = dict(benchmark="cpu_layer", layer=layer, dtype=args.dtype, machine=machine(), results=rows)
    print()
    write_json(results_path(args.out), payload)
    return payload


if __name__ == "__main__":
    main()
