"""pytest-benchmark suite: time and peak memory of every available backend against `reference`.

Run it through `python benchmarks/suite.py`, which writes the JSON and the report; or directly:

    python -m pytest benchmarks/test_suite.py --benchmark-json out.json [--device cuda] [--quick]

Cases: ResNet-50 layer shapes (M = 294,912 rows: a 512x512x3x3 layer at d = 8; M = 12,800 rows),
k in {4, 16, 256, 4096}, d in {1, 4, 8}, 5 iterations with no early stop. Each case is timed for the
forward, the backward (the forward done in setup) and forward+backward, in the same run for every
backend. Peak memory is measured once per case and backend: on the CPU in a fresh process (see
peak_memory.py), on a GPU with torch.cuda.max_memory_allocated. A reference case whose M x k
tensors would pass the memory cap is skipped and reported as such.
"""
from __future__ import annotations

import pytest
import torch

import dkm_kernels
from peak_memory import Case, cuda_peak_bytes, fresh_process_peak_bytes, predicted_reference_bytes

ROWS = (294_912, 12_800)
CENTROIDS = (4, 16, 256, 4096)
DIMS = (1, 4, 8)
PHASES = ("forward", "backward", "forward+backward")


def pytest_generate_tests(metafunc):  # noqa: D103 - parametrisation depends on the options
    config = metafunc.config
    device = config.getoption("--device")
    quick = config.getoption("--quick")
    rows = (12_800,) if quick else ROWS
    centroids = (4, 256) if quick else CENTROIDS
    dims = (1, 8) if quick else DIMS
    available = [name for name in ("reference", "torch", "cpu", "triton")
                 if dkm_kernels.backends.unavailable_reason(name, torch.device(device), torch.float32) is None]
    cases = [Case(m, d, k, device) for m in rows for k in centroids for d in dims]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    metafunc.parametrize("backend", available)
    metafunc.parametrize("phase", PHASES)


def _rounds(case: Case) -> int:
    """Big cases once (a CPU pass over 294,912 x 4096 takes seconds), small ones a few times."""
    return 1 if case.m * case.k * case.d > 50_000_000 else 3


def test_dkm(benchmark, case: Case, backend: str, phase: str, memory_cap_bytes: int):
    if backend == "reference" and predicted_reference_bytes(case) > memory_cap_bytes:
        pytest.skip(f"reference over the memory cap: needs ~{predicted_reference_bytes(case) / 2**30:.1f} GiB")
    benchmark.group = f"{case.id} {phase}"
    benchmark.extra_info.update(m=case.m, d=case.d, k=case.k, backend=backend, phase=phase,
                                device=case.device, iterations=case.max_iter)
    if phase == "forward+backward":
        # Peak memory is recorded on this phase only: once per case and backend.
        if case.device == "cuda":
            benchmark.extra_info["peak_bytes"] = cuda_peak_bytes(case, backend)
        else:
            benchmark.extra_info["peak_bytes"] = fresh_process_peak_bytes(case, backend)

    weights, centroids, tau = case.inputs()
    synchronize = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            out = dkm_kernels.dkm(weights, centroids, tau, case.max_iter, 0.0, backend=backend).weights
        synchronize()
        return out

    def graph():
        w = weights.detach().requires_grad_(True)
        out = dkm_kernels.dkm(w, centroids, tau, case.max_iter, 0.0, backend=backend).weights
        synchronize()
        return (out, torch.ones_like(out)), {}

    def backward(out, grad):
        out.backward(grad)
        synchronize()

    def forward_backward():
        backward(*graph()[0])

    rounds = _rounds(case)
    if phase == "forward":
        benchmark.pedantic(forward, rounds=rounds, warmup_rounds=1 if rounds > 1 else 0)
    elif phase == "backward":
        benchmark.pedantic(backward, setup=graph, rounds=rounds)
    else:
        benchmark.pedantic(forward_backward, rounds=rounds)
