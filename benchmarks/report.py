"""Turn a suite JSON (pytest-benchmark's, from suite.py) into a markdown table and PNG plots.

    python benchmarks/report.py benchmarks/results/suite_cpu.json

The table gives, per case and backend, the median forward, backward and forward+backward times,
the peak memory, and both as ratios to `reference` measured in the same run (speed-up: the
reference's forward+backward time over the backend's; memory saved: the reference's peak over the
backend's). The plots show
forward+backward time and peak memory against k, one line per backend, one panel per (M, d).
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from harness import BACKENDS  # noqa: E402

# One panel's size in inches and the PNGs' resolution: the recorded plots were drawn at these.
PANEL_WIDTH, PANEL_HEIGHT = 3.6, 3.0
DPI = 100


def load(json_path: str):
    with open(json_path) as f:
        data = json.load(f)
    rows = defaultdict(dict)  # (m, d, k, backend) -> {phase: median seconds, "peak": bytes}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["m"], info["d"], info["k"], info["backend"])
        rows[key][info["phase"]] = bench["stats"]["median"]
        if "peak_bytes" in info:
            rows[key]["peak"] = info["peak_bytes"]
    return data, rows


def _machine(data) -> str:
    if data.get("machine_info", {}).get("gpu"):
        return data["machine_info"]["gpu"]
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or machine.get("machine", "")
    return f"{cpu}, {machine.get('cpu', {}).get('count', '?')} cores"


def _fmt_time(seconds):
    return "-" if seconds is None else (f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s")


def _fmt_bytes(value):
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def markdown(data, rows) -> str:
    commit = data.get("commit_info", {}).get("id", "unknown")[:10]
    lines = [
        f"Machine: {_machine(data)}; date {data.get('datetime', '?')[:19]}; commit {commit}; "
        f"torch {data.get('machine_info', {}).get('torch', '?')}; "
        f"triton {data.get('machine_info', {}).get('triton', 'not installed')}; "
        f"device {data.get('machine_info', {}).get('device', '?')}",
        "",
        "| M | d | k | backend | forward | backward | fwd+bwd | speed-up | peak memory | memory saved |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    cases = sorted({key[:3] for key in rows}, key=lambda c: (-c[0], c[1], c[2]))
    for m, d, k in cases:
        ref = rows.get((m, d, k, "reference"))
        for backend in BACKENDS:
            row = rows.get((m, d, k, backend))
            if row is None:
                if backend == "reference":
                    lines.append(f"| {m} | {d} | {k} | reference | over the memory cap | | | | | |")
                elif backend == "torch" and any(key[:3] == (m, d, k) and key[3] == "cpu" for key in rows):
                    lines.append(f"| {m} | {d} | {k} | torch | over the time cap | | | | | |")
                continue
            total, peak = row.get("forward+backward"), row.get("peak")
            speed = (f"{ref['forward+backward'] / total:.1f}x"
                     if ref and backend != "reference" and total else "")
            memory = (f"{ref['peak'] / max(peak, 1):.1f}x"
                      if ref and backend != "reference" and peak and ref.get("peak") else "")
            lines.append(
                f"| {m} | {d} | {k} | {backend} | {_fmt_time(row.get('forward'))} | "
                f"{_fmt_time(row.get('backward'))} | {_fmt_time(total)} | {speed} | "
                f"{_fmt_bytes(peak)} | {memory} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows, png_path: str, quantity: str) -> None:
    """One panel per (M, d): M down the rows, d across; one line per backend, k on the x axis."""
    ms = sorted({m for m, _, _, _ in rows}, reverse=True)
    ds = sorted({d for _, d, _, _ in rows})
    fig, axes = plt.subplots(len(ms), len(ds), figsize=(PANEL_WIDTH * len(ds), PANEL_HEIGHT * len(ms)),
                             squeeze=False)
    scale = 1.0 if quantity == "time" else 2**-20
    for axes_row, m in zip(axes, ms):
        for ax, d in zip(axes_row, ds):
            for backend in BACKENDS:
                points = sorted((k, row.get("forward+backward" if quantity == "time" else "peak"))
                                for (mm, dd, k, b), row in rows.items() if (mm, dd, b) == (m, d, backend))
                points = [(k, v) for k, v in points if v]
                if points:
                    ks, values = zip(*points)
                    ax.plot(ks, [v * scale for v in values], marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"M = {m:,}, d = {d}", fontsize=10)
            ax.set_xlabel("k (centroids)")
            ax.set_ylabel("forward+backward (s)" if quantity == "time" else "peak memory (MiB)")
            ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=DPI)
    plt.close(fig)


def write_report(json_path: str) -> str:
    data, rows = load(json_path)
    stem = os.path.splitext(json_path)[0]
    table = markdown(data, rows)
    with open(stem + ".md", "w") as f:
        f.write(table)
    plot(rows, stem + "_time.png", "time")
    plot(rows, stem + "_memory.png", "memory")
    return table


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(write_report(path))
