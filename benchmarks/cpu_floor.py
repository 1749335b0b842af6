"""The `cpu` backend against the machine's floor: every case's forward+backward time as a ratio to
the least time this machine could take for it, with the machine's rates measured in the same run.

    python benchmarks/cpu_floor.py                          # every case; writes results/cpu_floor.{json,md,png}
    python benchmarks/cpu_floor.py --baseline /work/main    # also a second checkout's build, case by case
    python benchmarks/cpu_floor.py --cases 2bit,8/8 --repeats 5
    python benchmarks/cpu_floor.py --baseline /work/main --cases 8/8 --rounds 5   # 5 processes each, in turns
    python benchmarks/cpu_floor.py --quick                  # a tenth of the rows: a check of the script

Rates (measured in this process before, between and after the cases; the best of all is used):
- compute peak: torch.mm of 2048 x 2048 float32 matrices, counted as n^3 multiply-adds;
- memory bandwidth: a copy of a 256 MiB float32 tensor, counted as its bytes read plus written.

Floor: a forward+backward of L iterations is 2L + 2 passes over the rows (docs/design.md §3):
L attention-sum passes and the output pass, then the G_L pass and L gradient passes. Each pass
costs, per (row, centroid) pair, 3d multiply-adds and one exponential counted as 10 multiply-adds,
or the bytes it must move, whichever takes longer at the measured rates:
    attention sums  W read                            4 M d bytes
    output          W read, W~ written                8 M d
    G_L             W and G~ read                     8 M d
    gradient        W read, dW read and written      12 M d  (the first also reads G~: 16 M d)
The floor counts neither the k x d work between passes nor any per-pass overhead: a ratio of 1 is
not reachable, and small problems (whose passes are short) sit further from it.

Each case runs in a fresh process (one per case, checkout and --rounds round, the checkouts in
turns; of a case's rounds the one with the least CPU time is kept), float32 weights ~ N(0, 0.02^2),
tau = 2e-5, L = 5 and epsilon = 0 (every iteration runs); times are medians of --repeats runs
after one warm-up (wall and process CPU time); the table and the ratios use the best run (the one least disturbed, as for
the rates, which are best-of-7), the JSON also has the medians. M is chosen so that each case's
floor is about --floor-ms milliseconds.
The machine may be shared: rates measured in the same run compensate for a uniformly slower
machine, not for another process taking a core during one case only. The CPU-time ratio (process
CPU time over the floor at the rates per CPU second, both measured the same way) does not count
waiting for a core, so it is the steadier measure there; --threads 1 steadier still.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ITERATIONS,
    PAPER_TAU,
    machine,
    results_path,
    run_worker,
    script_parser,
    serve_worker,
    trained_like_weights,
    write_json,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXP_MULTIPLY_ADDS = 10
MULTIPLY_ADDS_PER_PAIR_AND_DIM = 3
BYTES = 4  # float32

# The suite: every (k, d) with M sized to the floor, and two layers at their real sizes.
SUITE = [dict(name=f"k{k}_d{d}", k=k, d=d) for k in (4, 16, 256, 4096) for d in (1, 4, 8)]
LAYERS = [
    dict(name="8/8", m=294_912, d=8, k=256),  # 512x512x3x3 at 8 bits per weight
    dict(name="2bit", m=2_359_296, d=1, k=4),  # the same weights at 2 bits, one weight per row
]


# --- the machine's rates ----------------------------------------------------------------------


def _best_seconds(fn, repeats):
    """The least wall time and the least process CPU time of `repeats` runs (after one warm-up):
    the peak, from the runs least disturbed by other work on a shared machine."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def measure_rates(repeats: int = 7) -> dict:
    """multiply-adds per second of torch.mm, bytes per second of a large tensor copy."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    mm_s, mm_cpu_s = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    src = torch.randn(64 * 2**20)  # 256 MiB: far beyond any cache
    dst = torch.empty_like(src)
    copy_s, copy_cpu_s = _best_seconds(lambda: dst.copy_(src), repeats)
    copied = 2 * src.numel() * BYTES
    return dict(fma_per_s=n**3 / mm_s, bytes_per_s=copied / copy_s,
                fma_per_cpu_s=n**3 / mm_cpu_s, bytes_per_cpu_s=copied / copy_cpu_s,
                threads=torch.get_num_threads())


# --- the floor --------------------------------------------------------------------------------


def pass_bytes(m: int, d: int, iterations: int) -> list[int]:
    """Bytes each of the 2L + 2 passes must move (see the module docstring)."""
    row = m * d * BYTES
    forward = [row] * iterations + [2 * row]
    backward = [2 * row] + [4 * row] + [3 * row] * (iterations - 1)
    return forward + backward


def floor(m: int, d: int, k: int, rates: dict, iterations: int = ITERATIONS, unit: str = "s") -> dict:
    """The floor of a forward+backward, per direction: per pass the larger of compute and memory
    time. unit "s" takes the wall-clock rates, "cpu_s" the rates per CPU second (process time)."""
    compute_s = m * k * (MULTIPLY_ADDS_PER_PAIR_AND_DIM * d + EXP_MULTIPLY_ADDS) / rates[f"fma_per_{unit}"]
    memory_s = [b / rates[f"bytes_per_{unit}"] for b in pass_bytes(m, d, iterations)]
    per_pass = [max(compute_s, t) for t in memory_s]
    fwd, bwd = sum(per_pass[:iterations + 1]), sum(per_pass[iterations + 1:])
    return {f"floor_forward_{unit}": fwd, f"floor_backward_{unit}": bwd, f"floor_{unit}": fwd + bwd,
            f"bound_{unit}": "compute" if compute_s >= max(memory_s) else "memory (some passes)"}


def rows_for(d: int, k: int, floor_s: float, rates: dict) -> int:
    """M whose floor is about floor_s, a multiple of 1024 in [4096, 4M]."""
    per_row = 2 * (ITERATIONS + 1) * k * (MULTIPLY_ADDS_PER_PAIR_AND_DIM * d + EXP_MULTIPLY_ADDS)
    m = floor_s * rates["fma_per_s"] / per_row
    return int(min(max(round(m / 1024), 4), 4096) * 1024)


# --- one case, in a fresh process -------------------------------------------------------------


def _worker(case: dict) -> dict:
    sys.path.insert(0, case["root"])
    import torch

    import dkm_kernels
    from dkm_kernels.backends import cpu as cpu_backend

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    assert os.path.dirname(os.path.dirname(os.path.abspath(dkm_kernels.__file__))) == case["root"], (
        f"imported {dkm_kernels.__file__}, wanted the checkout at {case['root']}")
    gen = torch.Generator().manual_seed(0)
    shape = (1, case["m"], case["d"])
    weights = trained_like_weights(shape, gen)
    centroids = dkm_kernels.random_rows(weights, case["k"], generator=gen)
    upstream = torch.randn(shape, generator=gen)

    def once():
        w = weights.detach().requires_grad_(True)
        t0, c0 = time.perf_counter(), time.process_time()
        result = dkm_kernels.dkm(w, centroids, PAPER_TAU, ITERATIONS, 0.0, backend="cpu")
        t1, c1 = time.perf_counter(), time.process_time()
        result.weights.backward(upstream)
        t2, c2 = time.perf_counter(), time.process_time()
        return dict(forward_s=t1 - t0, backward_s=t2 - t1, forward_backward_s=t2 - t0,
                    forward_cpu_s=c1 - c0, backward_cpu_s=c2 - c1, forward_backward_cpu_s=c2 - c0)

    once()
    runs = [once() for _ in range(case["repeats"])]
    best = {f"best_{key}": min(run[key] for run in runs) for key in runs[0]}
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return dict(case, **median, **best, isa=cpu_backend.isa(), threads=torch.get_num_threads())


def measure(case: dict, root: str, repeats: int, threads: int | None) -> dict:
    return run_worker(__file__, dict(case, root=os.path.abspath(root), repeats=repeats, threads=threads),
                      separate_mappings=False)


# --- report -----------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    rates = payload["rates"]
    labels = payload["checkouts"]
    lines = [
        f"# cpu backend against the machine's floor ({payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores, isa {payload['results'][0][labels[0]]['isa']})",
        "",
        f"Rates measured in the same run (the best of before, between cases and after): torch.mm {rates['fma_per_s'] / 1e9:.1f} G multiply-adds/s, "
        f"copy {rates['bytes_per_s'] / 1e9:.1f} GB/s (before: {payload['rates_before']['fma_per_s'] / 1e9:.1f} / "
        f"{payload['rates_before']['bytes_per_s'] / 1e9:.1f}, after: {payload['rates_after']['fma_per_s'] / 1e9:.1f} / "
        f"{payload['rates_after']['bytes_per_s'] / 1e9:.1f}). L = {ITERATIONS}, tau = {PAPER_TAU}, float32.",
        "",
        "Checkouts: " + ", ".join(f"{c} = {payload['roots'][c]}" for c in labels) + ".",
        "",
        "Wall: the best run's time over the floor at the wall-clock rates. CPU: the best run's process",
        "CPU time over the floor at the rates per CPU second; on a shared machine it does not count",
        "the time a thread waited for a core, so it is the steadier of the two. bwd/fwd from CPU times.",
        "",
        "| case | M | d | k | floor | " + " | ".join(
            f"{c} fwd | {c} bwd | {c} wall / floor | {c} CPU / floor | {c} bwd/fwd" for c in labels) + " |",
        "|---" * (5 + 5 * len(labels)) + "|",
    ]
    for r in payload["results"]:
        cells = [r["name"], f"{r['m']:,}", str(r["d"]), str(r["k"]), f"{r['floor_s'] * 1e3:.1f} ms"]
        for c in labels:
            x = r[c]
            cells += [f"{x['best_forward_s'] * 1e3:.1f} ms", f"{x['best_backward_s'] * 1e3:.1f} ms",
                      f"{x['ratio_to_floor']:.2f}", f"**{x['cpu_ratio_to_floor']:.2f}**",
                      f"{x['best_backward_cpu_s'] / x['best_forward_cpu_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    spread = [r for r in payload["results"] if len(r[labels[0]].get("rounds_cpu_s", [])) > 1]
    if spread:
        lines += ["", "Each round's CPU time over the floor (fresh processes in turns; the table keeps the least):", ""]
        lines += [f"- {r['name']}: " + "; ".join(
            f"{c} " + ", ".join(f"{t / r['floor_cpu_s']:.2f}" for t in r[c]["rounds_cpu_s"]) for c in labels)
            for r in spread]
    lines += ["", f"Command: `{payload['command']}`; commit {payload['machine']['commit']}, "
              f"{payload['machine']['date']}, load average {payload['machine'].get('load_average_1min')} "
              "at the start (the machine was shared)."]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in payload["results"]]
    labels = payload["checkouts"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.7), 4.5))
    for i, c in enumerate(labels):
        ax.bar([x + i * width for x in range(len(names))],
               [r[c]["cpu_ratio_to_floor"] for r in payload["results"]], width, label=c)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.axhline(3, color="gray", linestyle="--", linewidth=0.8, label="3x the floor")
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(names))], names, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward CPU time / floor")
    ax.set_title(f"cpu backend vs the machine's floor ({payload['machine']['cpu']}, rates measured in the run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    parser = script_parser(__doc__, repeats=3, out="cpu_floor.json")
    parser.add_argument("--baseline", help="another checkout whose build is measured beside this one's")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--floor-ms", type=float, default=40.0, help="the suite's floor per case")
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows")
    parser.add_argument("--threads", type=int, help="torch threads for the rates and every case")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per case and checkout, in turns (a process's speed varies here)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    checkouts = {"this": ROOT}
    if args.baseline:
        checkouts = {"baseline": args.baseline, "this": ROOT}
    rates_before = measure_rates()
    print(f"rates: {rates_before['fma_per_s'] / 1e9:.1f} G multiply-adds/s, "
          f"{rates_before['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    cases = [dict(c, m=rows_for(c["d"], c["k"], args.floor_ms / 1e3, rates_before)) for c in SUITE] + LAYERS
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c["name"] in wanted]
    if args.quick:
        cases = [dict(c, m=max(1024, c["m"] // 10)) for c in cases]

    results, rates_between = [], []
    for case in cases:
        rates_between.append(measure_rates(repeats=3))
        row = dict(case)
        rounds = {label: [] for label in checkouts}
        for _ in range(args.rounds):
            for label, root in checkouts.items():  # the checkouts alternate case by case
                r = measure(dict(name=case["name"], m=case["m"], d=case["d"], k=case["k"]), root, args.repeats,
                            args.threads)
                rounds[label].append({key: value for key, value in r.items() if key not in case and key != "root"})
        for label, runs in rounds.items():
            row[label] = dict(min(runs, key=lambda r: r["best_forward_backward_cpu_s"]),
                              rounds_cpu_s=[r["best_forward_backward_cpu_s"] for r in runs])
        results.append(row)
        print(f"{case['name']:>10} M={case['m']:>9,} " + " ".join(
            f"{label} {row[label]['best_forward_s'] * 1e3:7.1f}+{row[label]['best_backward_s'] * 1e3:7.1f} ms"
            f" (cpu {row[label]['best_forward_backward_cpu_s'] * 1e3:7.1f} ms)"
            for label in checkouts), flush=True)
    rates_after = measure_rates()
    every = [rates_before, *rates_between, rates_after]
    rates = {key: max(r[key] for r in every)
             for key in ("fma_per_s", "bytes_per_s", "fma_per_cpu_s", "bytes_per_cpu_s")}
    for row in results:
        for unit in ("s", "cpu_s"):
            row.update(floor(row["m"], row["d"], row["k"], rates, unit=unit))
        for label in checkouts:
            x = row[label]
            x["ratio_to_floor"] = x["best_forward_backward_s"] / row["floor_s"]
            x["cpu_ratio_to_floor"] = x["best_forward_backward_cpu_s"] / row["floor_cpu_s"]

    payload = dict(benchmark="cpu_floor", machine=machine(), rates=rates, rates_before=rates_before,
                   rates_after=rates_after, rates_between=rates_between, iterations=ITERATIONS, tau=PAPER_TAU,
                   checkouts=list(checkouts), roots={k: os.path.abspath(v) for k, v in checkouts.items()},
                   command="python benchmarks/cpu_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   results=results)
    text = markdown(payload)
    print(text)
    path = write_json(results_path(args.out), payload)
    stem = os.path.splitext(path)[0]
    with open(stem + ".md", "w") as f:
        f.write(text)
    plot(payload, stem + ".png")
    return payload


if __name__ == "__main__":
    if not serve_worker(_worker):
        main()
