"""Many clustering problems in one call: the ops behind `dkm_kernels.dkm_many` (docs/design.md §12).

A model's clustering is one problem per layer, each with its own M, d, k, tau, epsilon, max_iter
and groups. Run one op per layer and every layer pays the recurrence's host work and its host sync
per iteration (§4). Here every problem's groups are *segments* of one packed state: centroids
(S, k_max, d_max), zero beyond each segment's own k and d. One recurrence (`recurrence.py`) runs
on that state, so its host work and its one sync per iteration serve every problem at once; each
pass runs every problem's own pass kernels on its own weights and centroids.

The padding is inert: a padded centroid gets no attention (the kernels never see it), so it has
no mass, keeps its position and passes a zero gradient; a padded coordinate sums to zero. Every
problem's forward is therefore bit-identical to running it alone, and so is its backward where
the problems share d (with a different d, one dot product of d terms, sum_l G_l C_l, may round
differently: it is summed over d_max terms, the padded ones zero).

    dkm_kernels::dkm_many_forward(weights[], centroids[], taus[], max_iters[], epsilons[],
                                  deterministic, backend)
        -> (out[], centroid_history[], masses[], iterations[])   each as the one-problem op's
    dkm_kernels::dkm_many_backward(grad_out[], weights[], centroid_history[], masses[],
                                   iterations[], taus[], deterministic, backend) -> grad_weights[]

All problems of one call share the device, the compute dtype and the backend (`dkm_many` sorts
problems into such calls). A problem whose output receives no gradient is left out of the
backward, and its weights get none: the same as running it alone and not using it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, recurrence
from ._ops import ErrorPrefix, check_backward_inputs, check_inputs, empty_forward_outputs
from .capture import DeviceCache
from .recurrence import compute_dtype

# Layout.per_segment's tensors: a model's calls repeat the same few, and a captured call may
# copy nothing to the device.
_PER_SEGMENT = DeviceCache(256)


class Layout(NamedTuple):
    """Where each problem's groups live in the packed state: problem p owns segments
    starts[p] .. starts[p] + groups[p], centroids [:ks[p]] and coordinates [:dims[p]]."""

    starts: list[int]
    groups: list[int]
    ks: list[int]
    dims: list[int]

    @classmethod
    def of(cls, weights: list[Tensor], ks: list[int]) -> "Layout":
        groups = [w.shape[0] for w in weights]
        starts = [sum(groups[:p]) for p in range(len(groups))]
        return cls(starts, groups, list(ks), [w.shape[2] for w in weights])

    @property
    def segments(self) -> int:
        return sum(self.groups)

    def index(self, p: int, dims: int = 3) -> tuple[slice, ...]:
        """Problem p's part of a packed (S, k_max, d_max) tensor, or of its first `dims` axes."""
        segments = slice(self.starts[p], self.starts[p] + self.groups[p])
        return (segments, slice(0, self.ks[p]), slice(0, self.dims[p]))[:dims]

    def part(self, packed: Tensor, p: int, dims: int = 3) -> Tensor:
        """Problem p's part of the packed `packed` (..., S, k_max, d_max)[:dims], contiguous."""
        return packed[(Ellipsis, *self.index(p, dims))].contiguous()

    def pack(self, parts: list[Tensor], lead: tuple = (), dims: int = 3) -> Tensor:
        """Zero-padded (*lead, S, k_max, d_max)[:dims] from each problem's (*lead_p, G, k, d);
        a part with fewer leading entries (a shorter history) fills the first ones."""
        shape = (self.segments, max(self.ks), max(self.dims))[:dims]
        packed = parts[0].new_zeros(lead + shape)
        for p, part in enumerate(parts):
            index = self.index(p, dims)
            packed[(slice(0, part.shape[0]), *index) if lead else index] = part
        return packed

    def per_segment(self, values: list, dtype: torch.dtype, device) -> Tensor:
        """Each problem's scalar repeated over its segments: (S,), copied to the device on the
        first call with these values and kept (shared: read it, never write it)."""
        key = (tuple(values), tuple(self.groups), dtype, torch.device(device))
        return _PER_SEGMENT.get(key, lambda: torch.tensor(
            [value for value, groups in zip(values, self.groups) for _ in range(groups)],
            dtype=dtype, device=device))


class RaggedPasses:
    """recurrence.Passes over the packed state: each pass calls every problem's own passes on its
    part and packs what they return. `weights` is the list of every problem's weights."""

    def __init__(self, problems: list, layout: Layout):
        self.problems = problems
        self.layout = layout
        self.weights = [passes.weights for passes in problems]

    def attention_sums(self, values, centroids, active):
        sums = centroids.new_zeros(centroids.shape)
        mass = centroids.new_zeros(centroids.shape[:2])
        for p, (passes, v) in enumerate(zip(self.problems, values)):
            part = self.layout.index(p)
            sums[part], mass[part[:2]] = passes.attention_sums(
                v, self.layout.part(centroids, p), self.layout.part(active, p, 1))
        return sums, mass

    def output(self, attention_centroids, final_centroids):
        return [passes.output(self.layout.part(attention_centroids, p),
                              self.layout.part(final_centroids, p))
                for p, passes in enumerate(self.problems)]

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        sums = centroids.new_zeros(centroids.shape)
        part = self.layout.part
        for p, passes in enumerate(self.problems):
            sums[self.layout.index(p)] = passes.gradient(
                None if grad_out is None else grad_out[p], part(centroids, p),
                part(grad_over_mass, p), part(grad_dot_next, p, 2), part(final_centroids, p),
                part(active, p, 1), grad_weights[p], part(mass, p, 2))
        return sums


def _check_lists(names_and_lists: dict) -> None:
    lengths = {name: len(values) for name, values in names_and_lists.items()}
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ValueError(f"the lists must be non-empty and of one length (one entry per "
                         f"problem), got lengths {lengths}")


def _check_shared(weights: list[Tensor]) -> None:
    """One device and one compute dtype for every problem of a call."""
    first = weights[0]
    for p, w in enumerate(weights):
        if w.device != first.device or compute_dtype(w.dtype) != compute_dtype(first.dtype):
            raise ValueError(f"weights[{p}] is {w.dtype} on {w.device} but weights[0] is "
                             f"{first.dtype} on {first.device}: one call takes problems of one "
                             f"device and compute dtype (dkm_kernels.dkm_many sorts them)")


def _check_forward(weights, centroids, taus, max_iters, epsilons) -> None:
    _check_lists({"weights": weights, "centroids": centroids, "taus": taus,
                  "max_iters": max_iters, "epsilons": epsilons})
    for p, args in enumerate(zip(weights, centroids, taus, max_iters, epsilons)):
        with ErrorPrefix(f"problem {p}: "):
            check_inputs(*args)
    _check_shared(weights)


def _passes(backend, weights, ks, taus, deterministic):
    """The backend's own ragged passes (one launch or parallel region per pass for every problem)
    where it has them, else every problem's own passes one after another."""
    layout = Layout.of(weights, ks)
    weights = [w.contiguous() for w in weights]
    ragged = backends.ragged_passes_class(backend, weights[0].device, weights[0].dtype)
    if ragged is not None:
        return ragged(weights, layout, taus, deterministic)
    return RaggedPasses([backends.passes(backend, w, k, tau, deterministic)
                         for w, k, tau in zip(weights, ks, taus)], layout)


@torch.library.custom_op("dkm_kernels::dkm_many_forward", mutates_args=())
def dkm_many_forward(weights: list[Tensor], centroids: list[Tensor], taus: list[float],
                     max_iters: list[int], epsilons: list[float], deterministic: bool,
                     backend: str) -> tuple[list[Tensor], list[Tensor], list[Tensor],
                                            list[Tensor]]:
    _check_forward(weights, centroids, taus, max_iters, epsilons)
    passes = _passes(backend, weights, [c.shape[1] for c in centroids], taus, deterministic)
    layout, device = passes.layout, weights[0].device
    with torch.no_grad():
        out, history, masses, iterations = recurrence.forward(
            passes, layout.pack([c.contiguous() for c in centroids]), max(max_iters),
            # epsilon in the compute dtype, as a Python float is when compared with a tensor
            layout.per_segment(epsilons, compute_dtype(weights[0].dtype), device), None,
            layout.per_segment(max_iters, torch.int64, device))
    # Copies: an op's outputs may not be views of one another (each is O(L k d)).
    histories = [layout.part(history[:steps + 1], p).clone() for p, steps in enumerate(max_iters)]
    masses = [layout.part(masses[:steps], p, 2).clone() for p, steps in enumerate(max_iters)]
    iterations = [layout.part(iterations, p, 1).clone() for p in range(len(weights))]
    return out, histories, masses, iterations


@dkm_many_forward.register_fake
def _(weights, centroids, taus, max_iters, epsilons, deterministic, backend):
    _check_forward(weights, centroids, taus, max_iters, epsilons)
    parts = [empty_forward_outputs(w, c, steps)
             for w, c, steps in zip(weights, centroids, max_iters)]
    return tuple([part[i] for part in parts] for i in range(4))


def _check_backward(grad_outs, weights, histories, masses, iterations, taus) -> None:
    _check_lists({"grad_outs": grad_outs, "weights": weights, "centroid_histories": histories,
                  "masses": masses, "iterations": iterations, "taus": taus})
    for p, args in enumerate(zip(grad_outs, weights, histories, masses, iterations, taus)):
        with ErrorPrefix(f"problem {p}: "):
            check_backward_inputs(*args)
    _check_shared(weights)


@torch.library.custom_op("dkm_kernels::dkm_many_backward", mutates_args=())
def dkm_many_backward(grad_outs: list[Tensor], weights: list[Tensor],
                      centroid_histories: list[Tensor], masses: list[Tensor],
                      iterations: list[Tensor], taus: list[float], deterministic: bool,
                      backend: str) -> list[Tensor]:
    _check_backward(grad_outs, weights, centroid_histories, masses, iterations, taus)
    passes = _passes(backend, weights, [h.shape[2] for h in centroid_histories], taus,
                     deterministic)
    layout = passes.layout
    steps = max(m.shape[0] for m in masses)
    with torch.no_grad():
        grads = recurrence.backward(
            passes, [g.to(w.dtype).contiguous() for g, w in zip(grad_outs, passes.weights)],
            layout.pack(centroid_histories, (steps + 1,)), layout.pack(masses, (steps,), 2),
            torch.cat(iterations),
            layout.per_segment(taus, torch.float64, weights[0].device).view(-1, 1, 1))
    return [g.to(w.dtype) for g, w in zip(grads, weights)]


@dkm_many_backward.register_fake
def _(grad_outs, weights, centroid_histories, masses, iterations, taus, deterministic, backend):
    _check_backward(grad_outs, weights, centroid_histories, masses, iterations, taus)
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]


def _setup_context(ctx, inputs, output):
    weights, _, taus, _, _, deterministic, backend = inputs
    _, histories, masses, iterations = output
    ctx.mark_non_differentiable(*histories, *masses, *iterations)
    ctx.save_for_backward(*weights, *histories, *masses, *iterations)
    ctx.problems = len(weights)
    ctx.options = (list(taus), deterministic, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_outs, *unused_grads):
    problems = ctx.problems
    saved = ctx.saved_tensors
    taus, deterministic, backend = ctx.options
    # Only the problems whose output was used and whose weights want a gradient. (The needs of
    # the weights are a list, or, in some torch versions, the first entries of a flat tuple.)
    needs = ctx.needs_input_grad
    needs = needs[0] if isinstance(needs[0], (list, tuple)) else needs[:problems]
    wanted = [p for p in range(problems) if grad_outs[p] is not None and needs[p]]
    grads = [None] * problems
    if wanted:
        pick = lambda first: [saved[first + p] for p in wanted]  # noqa: E731
        computed = dkm_many_backward([grad_outs[p] for p in wanted], pick(0), pick(problems),
                                     pick(2 * problems), pick(3 * problems),
                                     [taus[p] for p in wanted], deterministic, backend)
        for p, grad in zip(wanted, computed):
            grads[p] = grad
    return (grads, [None] * problems) + (None,) * 5  # the inputs' structure: centroids a list


def _no_double_backward(ctx, grads):
    raise RuntimeError("DKM supports first derivatives only: its backward is not differentiable")


dkm_many_forward.register_autograd(_backward, setup_context=_setup_context)
dkm_many_backward.register_autograd(_no_double_backward)
