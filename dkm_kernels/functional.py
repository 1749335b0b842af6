"""`dkm()`: the one entry point of the op. Validates, reshapes to groups, picks the backend."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, unique
from ._ops import WEIGHT_DTYPES, ErrorPrefix, check_inputs, dkm_forward
from .many import dkm_many_forward
from .recurrence import compute_dtype
from .reference import dkm_reference


class DKMResult(NamedTuple):
    """weights: the clustered weights W~ (same shape and dtype as the input weights);
    centroids: the final centroids, detached, in the compute dtype (float32, or float64);
    iterations: int64 tensor, the number of iterations each group ran (shape () if ungrouped)."""

    weights: Tensor
    centroids: Tensor
    iterations: Tensor


def check_count(name: str, value, allowed: str = "") -> int:
    """An integer >= 1 (bools are not counts); the error names the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{allowed}, got {value!r}")
    return value


def vectorize(weight: Tensor, dim: int) -> Tensor:
    """View a weight tensor of any shape as (numel / dim, dim) rows, the vectors DKM clusters."""
    check_count("dim", dim)
    if weight.numel() % dim:
        raise ValueError(
            f"dim={dim} does not divide the weight's {weight.numel()} elements "
            f"(shape {tuple(weight.shape)}); choose a dim that divides it"
        )
    return weight.reshape(-1, dim)


def _check_number(name: str, value, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {relation} {minimum}, got {value}")
    return value


def group_name(process_group) -> str:
    """The name the op takes for `process_group` (a torch.distributed ProcessGroup, or None)."""
    if process_group is None:
        return ""
    if not (torch.distributed.is_available()
            and isinstance(process_group, torch.distributed.ProcessGroup)):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (such as "
                        f"torch.distributed.group.WORLD) or None, got "
                        f"{type(process_group).__name__}")
    return process_group.group_name


def _check_tensors(weights, centroids, sharded: bool = False) -> None:
    """What the op cannot say about the user-facing shapes; the op checks the rest."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not isinstance(centroids, Tensor):
        raise TypeError(f"centroids must be a torch.Tensor, got {type(centroids).__name__}")
    if weights.dim() not in (2, 3):
        raise ValueError(
            f"weights must have shape (M, d) or (G, M, d), got {tuple(weights.shape)}; "
            f"use dkm_kernels.vectorize(weight, dim) to reshape a layer's weight"
        )
    if centroids.dim() != weights.dim():
        raise ValueError(
            f"centroids must be {'(k, d)' if weights.dim() == 2 else '(G, k, d)'} to match weights "
            f"of shape {tuple(weights.shape)}, got {tuple(centroids.shape)}"
        )
    if weights.shape[-2] < 1 and not sharded:
        raise ValueError(f"weights must have at least one row (none only on a rank of a "
                         f"process_group), got {tuple(weights.shape)}")
    if centroids.shape[-2] < 1:
        raise ValueError("centroids must hold at least one centroid (k >= 1)")
    if centroids.shape[-1] != weights.shape[-1]:
        raise ValueError(
            f"centroids have dimension {centroids.shape[-1]} but weights have d={weights.shape[-1]}"
        )
    if weights.dtype in WEIGHT_DTYPES and centroids.dtype not in (
            weights.dtype, compute_dtype(weights.dtype)):
        raise TypeError(
            f"centroids are {centroids.dtype} but weights are {weights.dtype}; centroids must be "
            f"{compute_dtype(weights.dtype)} (the compute dtype) or {weights.dtype}"
        )


class DKMProblem(NamedTuple):
    """One problem of `dkm_many`: the arguments `dkm` takes for it (see there)."""

    weights: Tensor
    centroids: Tensor
    tau: float
    max_iter: int = 5
    epsilon: float = 1e-4


def _prepared(problem: DKMProblem, sharded: bool = False):
    """The checked problem as the op takes it: (weights (G, M, d), detached centroids (G, k, d)
    in the compute dtype, tau, epsilon). The op checks the rest, max_iter's upper bound included."""
    weights, centroids, tau, max_iter, epsilon = problem
    _check_tensors(weights, centroids, sharded)
    tau = _check_number("tau", tau, 0.0, strict=True)
    epsilon = _check_number("epsilon", epsilon, 0.0, strict=False)
    check_count("max_iter", max_iter)
    grouped = weights.dim() == 3
    w = weights if grouped else weights.unsqueeze(0)
    c = (centroids if grouped else centroids.unsqueeze(0)).detach()
    if weights.dtype in WEIGHT_DTYPES:
        c = c.to(compute_dtype(weights.dtype))
    return w, c, tau, epsilon


def uniquified(weights: Tensor, backend: str, uniquify) -> bool:
    """Whether `dkm` (without a process group) clusters these grouped weights uniquified (§10)."""
    if not (backend == "auto" if uniquify is None else bool(uniquify)):
        return False
    # Rounded to bfloat16, float32 scalar rows are what unique.applies takes.
    return unique.applies(weights) or (_rounds_to_bfloat16(weights, uniquify)
                                       and weights.shape[0] > 0)


def _rounds_to_bfloat16(weights: Tensor, uniquify) -> bool:
    return uniquify == "bfloat16" and weights.dtype == torch.float32 and weights.shape[-1] == 1


def _rounded_for(weights: Tensor, uniquify) -> Tensor:
    """The weights the uniquified op clusters: float32 scalar weights rounded to bfloat16 under
    uniquify="bfloat16" (a differentiable cast: the gradient reaches the float32 weights), else
    the weights themselves."""
    return weights.to(torch.bfloat16) if _rounds_to_bfloat16(weights, uniquify) else weights


def dkm(weights: Tensor, centroids: Tensor, tau: float, max_iter: int = 5, epsilon: float = 1e-4,
        backend: str = "auto", deterministic: bool | None = None,
        process_group=None, uniquify: bool | str | None = None) -> DKMResult:
    """Differentiable k-means of the rows of `weights` (docs/design.md §1).

    weights: (M, d) or (G, M, d) for G independent problems; float16/bfloat16/float32 (math in
        float32) or float64. Gradients flow to it through every iteration.
    centroids: (k, d) or (G, k, d), the warm start; never receives a gradient.
    tau: temperature > 0. Each group stops after the iteration where no centroid moved more than
        `epsilon`, or after `max_iter` iterations.
    backend: 'auto', 'reference', 'torch', 'triton' or 'cpu'.
    deterministic: bit-identical results run to run; None follows
        torch.are_deterministic_algorithms_enabled().
    process_group: a torch.distributed process group across whose ranks the rows of each problem
        are split (docs/design.md §11): `weights` are this rank's rows (any number, none
        included), `centroids` the same warm start on every rank. Every pass all-reduces its
        k x d partial sums; the result's weights are this rank's rows, its centroids and
        iterations the global ones, identical on every rank, and the gradient of this rank's rows
        is that of the whole problem, whose upstream gradient is every rank's in turn. Every rank
        must call with the same G, k, d, options and backward.
    uniquify: for float16/bfloat16 weights with d = 1, run DKM over their distinct values with
        counts (docs/design.md §10): the same result up to the order of summation, O(M + U k) per
        pass instead of O(M k). None: where it applies and backend is 'auto' (a named backend
        runs its own passes); True: wherever it applies; False: never. Not across a process
        group (each rank's distinct values differ): there the rows run through the backend.
        "bfloat16": as True, and float32 weights with d = 1 are clustered through their bfloat16
        rounding, an approximation (as coremltools' fast k-means mode) that buys the uniquified
        speed: the clustering sees weights rounded to 8 significant bits, the returned weights are
        rounded to bfloat16 (returned as float32), and so is their gradient.
    """
    name = group_name(process_group)
    w, c, tau, epsilon = _prepared(DKMProblem(weights, centroids, tau, max_iter, epsilon),
                                   sharded=bool(name))
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if not (uniquify is None or isinstance(uniquify, bool) or uniquify == "bfloat16"):
        raise ValueError(f"uniquify must be True, False, None or 'bfloat16', got {uniquify!r}")
    backend_name = backends.resolve(backend, weights.device, weights.dtype)

    if backend_name == "reference":
        if name:
            raise ValueError("backend='reference' runs in one process and takes no "
                             "process_group; use backend='auto', 'torch', 'cpu' or 'triton'")
        out, final, iterations = _reference(w, c, tau, max_iter, epsilon)
    elif not name and uniquified(w, backend, uniquify):
        out, history, _, iterations = unique.dkm_unique_forward(_rounded_for(w, uniquify), c,
                                                                tau, max_iter, epsilon)
        out, final = out.to(w.dtype), history[-1]
    else:
        out, history, _, iterations = dkm_forward(w, c, tau, max_iter, epsilon,
                                                  bool(deterministic), backend_name, name)
        final = history[-1]  # a group that stopped early repeats its last centroids
    return _ungrouped(weights, out, final, iterations)


def _reference(weights: Tensor, centroids: Tensor, tau: float, max_iter: int, epsilon: float):
    """backend='reference': plain autograd, after the checks the op would make."""
    check_inputs(weights, centroids, tau, max_iter, epsilon)
    return dkm_reference(weights, centroids, tau, max_iter, epsilon)


def _ungrouped(weights: Tensor, out: Tensor, final: Tensor, iterations: Tensor) -> DKMResult:
    """The result in the shapes of the caller's `weights`: (M, d) gives (M, d), (k, d) and ()."""
    if weights.dim() == 2:
        out, final, iterations = out[0], final[0], iterations[0]
    return DKMResult(out, final.detach(), iterations)


def dkm_many(problems, backend: str = "auto", deterministic: bool | None = None
             ) -> list[DKMResult]:
    """Many independent DKM problems in one call (docs/design.md §12): a whole model's layers.

    problems: a sequence of `DKMProblem(weights, centroids, tau, max_iter=5, epsilon=1e-4)` (or
        tuples of those fields), each as `dkm` takes it, with its own M, d, k, groups and options.
    Returns one DKMResult per problem, equal to `dkm(*problem, backend=backend)` (forward
    bit-identical; backward too where problems share d; on triton, whose launches take all
    problems at once, only where a problem's rows are split into the same chunks as alone, else
    to float32 rounding), with gradients to every problem's weights. Problems run through one
    recurrence per device, compute dtype and backend: its host work and its one host sync per
    iteration serve them all, where one `dkm` call per problem pays them per problem. No uniquification (§10) and no process group: use `dkm` for those.
    """
    if not isinstance(problems, (list, tuple)):
        problems = list(problems)
    if not problems:
        raise ValueError("problems must hold at least one DKMProblem")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    prepared, calls = [], {}
    for p, problem in enumerate(problems):
        with ErrorPrefix(f"problems[{p}]: "):
            if not isinstance(problem, DKMProblem):
                if not isinstance(problem, (tuple, list)):
                    raise TypeError(f"a problem is a DKMProblem(weights, centroids, tau, "
                                    f"max_iter, epsilon) or a tuple of those, got "
                                    f"{type(problem).__name__}")
                problem = DKMProblem(*problem)
            prepared.append(_prepared(problem) + (problem.max_iter,))
            w = problem.weights
            name = backends.resolve(backend, w.device, w.dtype)
        calls.setdefault((w.device, compute_dtype(w.dtype), name), []).append(p)

    results: list[DKMResult | None] = [None] * len(problems)
    for (_, _, name), members in calls.items():
        if name == "reference":
            for p in members:
                w, c, tau, epsilon, max_iter = prepared[p]
                with ErrorPrefix(f"problems[{p}]: "):
                    results[p] = _reference(w, c, tau, max_iter, epsilon)
            continue
        w, c, tau, epsilon, max_iter = (list(field) for field in
                                        zip(*(prepared[p] for p in members)))
        outs, histories, _, iterations = dkm_many_forward(w, c, tau, max_iter, epsilon,
                                                          bool(deterministic), name)
        for p, out, history, count in zip(members, outs, histories, iterations):
            results[p] = (out, history[-1], count)
    return [_ungrouped(problem[0], *result) for problem, result in zip(problems, results)]
