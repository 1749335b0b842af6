"""pytest-benchmark suite: time and peak memory of every available backend against `reference`.

Run it through `python benchmarks/suite.py`, which writes the JSON and the report; or directly:

    python -m pytest benchmarks/test_suite.py --benchmark-json out.json [--device cuda] [--quick]

Cases: ResNet-50 layer shapes (M = 294,912 rows: a 512x512x3x3 layer at d = 8; M = 12,800 rows),
k in {4, 16, 256, 4096}, d in {1, 4, 8}, 5 iterations with no early stop. Each case is timed for the
forward, the backward (the forward done in setup) and forward+backward, in the same run for every
backend. Peak memory is measured once per case and backend: on the CPU in a fresh process
(harness.measure_case says how), on a GPU as the rise of torch.cuda.max_memory_allocated over the
inputs (harness.CudaPeak). A reference case whose predicted peak (harness.naive_peak_bytes) would
pass the memory cap is skipped and reported as such.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import dkm_kernels
from harness import BACKENDS, ITERATIONS, CudaPeak, measure_case, naive_peak_bytes, trained_like_weights

ROWS = (294_912, 12_800)
CENTROIDS = (4, 16, 256, 4096)
DIMS = (1, 4, 8)
PHASES = ("forward", "backward", "forward+backward")
# --quick: the small layer, a small and the paper's k, scalar and 8-dimensional rows.
QUICK_ROWS, QUICK_CENTROIDS, QUICK_DIMS = (12_800,), (4, 256), (1, 8)

# tau is set from the data: TAU_FRACTION of the mean squared nearest-centroid distance over the
# first TAU_SAMPLE_ROWS rows (a stable mean, cheap at any M). The attention is then soft, the regime
# where no softmax underflows (cpu_layer.py measures the paper's tau, where it does).
TAU_FRACTION = 0.25
TAU_SAMPLE_ROWS = 4096
MIN_SQUARED_DISTANCE = 1e-12  # tau stays positive when the sample sits on its centroids

# Above this many M*k*d a CPU pass takes seconds: such cases run one round, the others ROUNDS.
ONE_ROUND_WORK = 50_000_000
ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    d: int
    k: int
    device: str = "cpu"
    max_iter: int = ITERATIONS

    @property
    def id(self) -> str:
        return f"M{self.m}-d{self.d}-k{self.k}"

    @property
    def reference_bytes(self) -> int:
        return naive_peak_bytes(self.m, self.k, self.max_iter)

    def inputs(self):
        """Weights at a trained layer's scale, k random rows as centroids, and a tau at which the
        attention is soft (see TAU_FRACTION)."""
        gen = torch.Generator().manual_seed(0)
        weights = trained_like_weights((self.m, self.d), gen)
        centroids = dkm_kernels.random_rows(weights, self.k, generator=gen)
        sample = weights[:TAU_SAMPLE_ROWS]
        nearest = torch.cdist(sample, centroids).square().min(dim=1).values.mean().item()
        tau = TAU_FRACTION * max(nearest, MIN_SQUARED_DISTANCE)
        return weights.to(self.device), centroids.to(self.device), tau

    def peak_bytes(self, backend: str) -> int:
        if self.device == "cpu":
            return measure_case(backend, 1, self.m, self.d, self.k, self.max_iter, repeats=1)["peak_bytes"]
        weights, centroids, tau = self.inputs()
        weights.requires_grad_(True)
        with CudaPeak() as peak:
            out = dkm_kernels.dkm(weights, centroids, tau, self.max_iter, 0.0, backend=backend).weights
            out.backward(torch.ones_like(out))
        return peak.bytes


def pytest_generate_tests(metafunc):  # noqa: D103 - parametrisation depends on the options
    config = metafunc.config
    device = config.getoption("--device")
    quick = config.getoption("--quick")
    rows = QUICK_ROWS if quick else ROWS
    centroids = QUICK_CENTROIDS if quick else CENTROIDS
    dims = QUICK_DIMS if quick else DIMS
    available = [name for name in BACKENDS
                 if dkm_kernels.backends.unavailable_reason(name, torch.device(device), torch.float32) is None]
    cases = [Case(m, d, k, device) for m in rows for k in centroids for d in dims]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    metafunc.parametrize("backend", available)
    metafunc.parametrize("phase", PHASES)


def _rounds(case: Case) -> int:
    """Big cases once (a CPU pass over 294,912 x 4096 takes seconds), small ones a few times."""
    return 1 if case.m * case.k * case.d > ONE_ROUND_WORK else ROUNDS


# On the CPU the `torch` backend is the fallback for machines without the C++ extension; a pass over
# more row-centroid pairs than this takes it minutes per run, so such cases are skipped there.
TORCH_CPU_MAX_PAIRS = 2**28


def test_dkm(benchmark, case: Case, backend: str, phase: str, memory_cap_bytes: int):
    if backend == "reference" and case.reference_bytes > memory_cap_bytes:
        pytest.skip(f"reference over the memory cap: needs ~{case.reference_bytes / 2**30:.1f} GiB")
    if backend == "torch" and case.device == "cpu" and case.m * case.k > TORCH_CPU_MAX_PAIRS:
        pytest.skip("torch backend on the CPU over the time cap (M*k > 2**28)")
    benchmark.group = f"{case.id} {phase}"
    benchmark.extra_info.update(m=case.m, d=case.d, k=case.k, backend=backend, phase=phase,
                                device=case.device, iterations=case.max_iter)
    if phase == "forward+backward":
        # Peak memory is recorded on this phase only: once per case and backend.
        benchmark.extra_info["peak_bytes"] = case.peak_bytes(backend)

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
