"""Benchmark cases and their peak memory.

CPU: the case runs forward+backward once in a fresh Python process, so memory a previous case
left in the allocator cannot hide or inflate it. There, every allocation of 64 KiB or more is
its own mapping (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once; the
resident-set high-water mark (VmHWM) is reset once the inputs exist (Linux's clear_refs), and the
peak is its rise over the resident set at that moment. GPU: the rise of
torch.cuda.max_memory_allocated over the inputs, in process.

    python benchmarks/peak_memory.py M D K BACKEND     # prints the CPU peak in bytes
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch

import dkm_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    d: int
    k: int
    device: str = "cpu"
    max_iter: int = 5

    @property
    def id(self) -> str:
        return f"M{self.m}-d{self.d}-k{self.k}"

    def inputs(self):
        """Weights ~ N(0, 0.02^2) like a trained layer's, k random rows as centroids, and a tau at
        which the attention is soft: a quarter of the mean squared nearest-centroid distance
        (estimated on a sample of rows)."""
        gen = torch.Generator().manual_seed(0)
        weights = (torch.randn(self.m, self.d, generator=gen) * 0.02).to(self.device)
        centroids = dkm_kernels.random_rows(weights.cpu(), self.k, generator=gen).to(self.device)
        sample = weights[: min(self.m, 4096)]
        nearest = torch.cdist(sample, centroids).square().min(dim=1).values.mean().item()
        return weights, centroids, 0.25 * max(nearest, 1e-12)


def predicted_reference_bytes(case: Case) -> int:
    """The reference keeps ~3.3 M x k float tensors per iteration for backward (counted in
    tests/test_memory.py) and a few more as temporaries: 5 per iteration is a safe estimate."""
    return 5 * case.max_iter * case.m * case.k * 4


def cuda_peak_bytes(case: Case, backend: str) -> int:
    weights, centroids, tau = case.inputs()
    weights.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = dkm_kernels.dkm(weights, centroids, tau, case.max_iter, 0.0, backend=backend).weights
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fresh_process_peak_bytes(case: Case, backend: str) -> int:
    command = [sys.executable, os.path.join(HERE, "peak_memory.py"), str(case.m), str(case.d),
               str(case.k), backend, str(case.max_iter)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_here(case: Case, backend: str) -> int:
    weights, centroids, tau = case.inputs()
    weights.requires_grad_(True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_bytes("VmRSS")
    out = dkm_kernels.dkm(weights, centroids, tau, case.max_iter, 0.0, backend=backend).weights
    out.backward(torch.ones_like(out))
    return _status_bytes("VmHWM") - base


if __name__ == "__main__":
    m, d, k, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    max_iter = int(sys.argv[5]) if len(sys.argv) > 5 else 5
    print(json.dumps({"peak_bytes": _measure_here(Case(m, d, k, "cpu", max_iter), backend)}))
