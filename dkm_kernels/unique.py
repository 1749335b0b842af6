"""Exact uniquification of scalar (d = 1) palettes of 16-bit weights (docs/design.md §10).

A float16 or bfloat16 weight holds at most 65,536 distinct values, and a large one repeats each
of them many times. DKM's sums over rows become count-weighted sums over the U distinct values,
so every pass costs O(U k) instead of O(M k); only a count and a gather (forward), and a count,
a scatter and a gather (backward) touch the M weights, chunk by chunk:

    forward    distinct values u_v and counts n_v (the bit pattern is the value's index: a
               bincount, no sort); the recurrence on the U values weighted by n_v; the output
               table out_v gathered back to the M weights.
    backward   g_v = sum_{i: v(i)=v} G~_i (one scatter-add); the recurrence's backward on the U
               values weighted by n_v, fed the mean gradient g_v / n_v (dA, dS and the sums that
               cross rows are affine in a row's G~, so a value's n_v rows sum to n_v times its
               mean row); each weight's gradient a_v(i) + G~_i b_v(i) from two per-value tables.

The result equals the row-by-row computation up to the order of summation. The op saves what
the plain op saves (W, the centroid history, the masses, the counts; §2): the distinct values
are recomputed from W in O(M) in the backward, so nothing of size M is kept.

The passes over the distinct values are plain PyTorch (`CountedPasses`): at most 65,536 rows
per group, so a fused kernel would save little, and every device runs them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import recurrence
from ._ops import check_backward_inputs, check_inputs, empty_forward_outputs

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
PATTERNS = 2**16
# Transient memory of one chunk of distinct values in a pass.
WORKSPACE_BYTES = 64 * 2**20
# Weights per chunk where per-value tables meet the weights (the gradient's scatter and gather).
CHUNK = 2**20
# Groups of at least this many weights find their distinct values by counting bit patterns in a
# table of 65,536 entries per group (no larger than the weights); smaller ones by a sort.
TABLE_MIN_ROWS = PATTERNS


def applies(weights: Tensor) -> bool:
    """Whether the op can run on the distinct values of these grouped weights (G, M, d): scalar
    rows (d = 1) of a 16-bit dtype, and at least one group."""
    return weights.dtype in SIXTEEN_BIT and weights.shape[-1] == 1 and weights.shape[0] > 0


class Distinct(NamedTuple):
    """The distinct values of each group, padded to the largest group's count U.

    values (G, U, 1) in the weights' dtype, ascending by bit pattern, padded with zeros;
    counts (G, U) in float32, zero for padding. Each weight has a slot in a table of `table_size`
    entries (`parts` gives them chunk by chunk): its (group, bit pattern) when `patterns` holds
    the weights' bit patterns (G, M) (the counting path; `slots` (G * U,) then gives each
    distinct value's slot, and padding a slot no weight reads), else `index` (G * M,) int32, its
    entry of the padded (G, U) table itself (the sorting path).
    """

    values: Tensor
    counts: Tensor
    patterns: Tensor | None
    index: Tensor | None
    slots: Tensor | None
    table_size: int

    def table(self, values: Tensor) -> Tensor:
        """A per-value table (G, U) laid out for the weights' slots: (table_size,)."""
        flat = values.reshape(-1)
        if self.slots is None:
            return flat
        return flat.new_zeros(self.table_size).index_copy_(0, self.slots, flat)

    def parts(self):
        """(part, slots): a slice of the G * M weights, CHUNK at a time, and their table slots
        (int32, in a buffer reused from part to part). Whatever crosses between values and
        weights goes part by part, so that its transients stay O(CHUNK)."""
        if self.patterns is None:
            for start in range(0, self.index.numel(), CHUNK):
                part = slice(start, start + CHUNK)
                yield part, self.index[part]
            return
        yield from _pattern_parts(self.patterns)

    def expand(self, values: Tensor) -> Tensor:
        """A per-value table (G, U) -> its entry for every weight, (G * M,)."""
        table = self.table(values)
        out = table.new_empty(self.counts.shape[0] * self.rows)
        for part, slots in self.parts():
            torch.index_select(table, 0, slots, out=out[part])
        return out

    @property
    def rows(self) -> int:
        """M, the weights per group."""
        if self.patterns is not None:
            return self.patterns.shape[1]
        return self.index.numel() // self.counts.shape[0]

    def gather_sums(self, values: Tensor) -> Tensor:
        """sum over each distinct value's weights of `values` (G * M,) -> (G, U) float32 (summed in
        float32, as every backend sums across rows)."""
        sums = values.new_zeros(self.table_size, dtype=torch.float32)
        deterministic_cuda = values.is_cuda and torch.are_deterministic_algorithms_enabled()
        buffer = values.new_empty(min(CHUNK, values.numel()), dtype=torch.float32)
        for part, slots in self.parts():
            chunk = buffer[:slots.numel()].copy_(values[part])
            if deterministic_cuda:  # index_add_ adds with atomics on CUDA; this sorts first
                sums.index_put_((slots.long(),), chunk, accumulate=True)
            else:
                sums.index_add_(0, slots, chunk)
        if self.slots is not None:
            sums = sums.index_select(0, self.slots)
        return sums.view(self.counts.shape)


def _pattern_parts(patterns: Tensor):
    """(part, slots) over (G, M) uint16 bit patterns: slot = g * 65,536 + pattern, computed CHUNK
    weights at a time into one reused int32 buffer."""
    groups, m = patterns.shape
    buffer = torch.empty(min(CHUNK, m), dtype=torch.int32, device=patterns.device)
    for g in range(groups):
        for start in range(0, m, CHUNK):
            stop = min(start + CHUNK, m)
            slots = buffer[:stop - start].copy_(patterns[g, start:stop])
            if g:
                slots.add_(g * PATTERNS)
            yield slice(g * m + start, g * m + stop), slots


def bit_patterns(weights: Tensor) -> Tensor:
    """The 16-bit weights' bit patterns, (G, M, 1) -> (G, M) uint16 (a view)."""
    return weights.view(torch.uint16).squeeze(-1)


def pattern_values(dtype: torch.dtype, device) -> Tensor:
    """The 16-bit value of every pattern 0 .. 65535."""
    return torch.arange(PATTERNS, dtype=torch.int32, device=device).to(torch.uint16).view(dtype)


def distinct(weights: Tensor) -> Distinct:
    """The distinct values and counts of each group of 16-bit weights (G, M, 1), contiguous.

    Groups of at least TABLE_MIN_ROWS weights count their bit patterns in a table of 65,536
    entries per group (O(M), no sort, no table larger than the weights), chunk by chunk; smaller
    groups (a palette per few channels) sort the (group, pattern) keys, so that no table outgrows
    the weights. Both give the same result.
    """
    groups, m, _ = weights.shape
    patterns = bit_patterns(weights)
    if m >= TABLE_MIN_ROWS:
        counts = torch.zeros(groups * PATTERNS, dtype=torch.int64, device=weights.device)
        ones = torch.ones(1, dtype=torch.int64, device=weights.device)
        for _, slots in _pattern_parts(patterns):
            counts.index_add_(0, slots, ones.expand(slots.numel()))
        present = counts > 0
        sizes = present.view(groups, PATTERNS).sum(dim=1)
        unique_keys = present.nonzero().squeeze(1)
        unique_counts = counts.index_select(0, unique_keys)
        index = None
    else:
        offsets = torch.arange(groups, dtype=torch.int64, device=weights.device) * PATTERNS
        keys = (patterns.to(torch.int64) + offsets[:, None]).view(-1)
        unique_keys, index, unique_counts = torch.unique(keys, sorted=True, return_inverse=True,
                                                         return_counts=True)
        sizes = torch.bincount(unique_keys // PATTERNS, minlength=groups)
    width = int(sizes.max())  # the one host read: the tables' shape depends on it
    group = unique_keys // PATTERNS
    start = torch.cumsum(sizes, 0) - sizes
    position = (group * width + torch.arange(unique_keys.numel(), device=weights.device)
                - start[group])
    values = weights.new_zeros(groups * width)
    values[position] = pattern_values(weights.dtype, weights.device)[unique_keys % PATTERNS]
    counts = torch.zeros(groups * width, dtype=torch.float32, device=weights.device)
    counts[position] = unique_counts.float()
    values, counts = values.view(groups, width, 1), counts.view(groups, width)
    if index is not None:  # weights index the padded table directly
        return Distinct(values, counts, None, position.index_select(0, index).to(torch.int32),
                        None, groups * width)
    # Padded entries point to one slot past the patterns, which no weight reads.
    slots = torch.full((groups * width,), groups * PATTERNS, dtype=torch.int64,
                       device=weights.device)
    slots[position] = unique_keys
    return Distinct(values, counts, patterns, None, slots, groups * PATTERNS + 1)


class CountedPasses:
    """recurrence.Passes over the distinct values (G, U, 1), each row standing for `counts` rows.

    Every sum across rows is count-weighted, so the recurrence runs unchanged: the forward's
    centroid updates and masses, and, fed the mean upstream gradient of each value, the backward's
    G_L and G_t. The gradient pass also splits each value's gradient into a_v (accumulated into
    grad_weights, as for any Passes) and b_v, the coefficient of a weight's own upstream gradient
    (kept in `grad_scale`; it enters only through the output's term, in the first step).
    """

    def __init__(self, values: Tensor, counts: Tensor, tau: float):
        self.weights = values
        self.tau = tau
        self.w = values.float()
        self.counts = counts.unsqueeze(-1)
        self.grad_scale = torch.zeros_like(self.w)

    def _chunks(self, k: int):
        # About six (G, rows, k) float32 tensors are alive at once: within WORKSPACE_BYTES.
        size = max(1, WORKSPACE_BYTES // (self.w.shape[0] * 6 * k * 4))
        for start in range(0, self.w.shape[1], size):
            rows = slice(start, start + size)
            yield rows, self.w[:, rows], self.counts[:, rows]

    def _attention(self, w: Tensor, centroids: Tensor) -> Tensor:
        """softmax_j(-(w_i - c_j)^2 / tau), (G, R, k): d = 1, so the difference is exact."""
        return torch.softmax((w - centroids.transpose(1, 2)).square_().div_(-self.tau), dim=-1)

    def attention_sums(self, values, centroids, active):
        weighted_sum = torch.zeros_like(centroids)
        mass = centroids.new_zeros(centroids.shape[:2])
        for rows, w, n in self._chunks(centroids.shape[1]):
            attention = self._attention(w, centroids) * n
            weighted_sum += torch.bmm(attention.transpose(1, 2), values[:, rows].float())
            mass += attention.sum(dim=1)
        return weighted_sum, mass

    def output(self, attention_centroids, final_centroids):
        out = torch.empty_like(self.weights)
        for rows, w, _ in self._chunks(final_centroids.shape[1]):
            attention = self._attention(w, attention_centroids)
            out[:, rows] = torch.bmm(attention, final_centroids).to(out.dtype)
        return out

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        sum_ds_diff = torch.zeros_like(centroids)
        scale = 2.0 / self.tau
        for rows, w, n in self._chunks(centroids.shape[1]):
            attention = self._attention(w, centroids)
            grad_a = w * grad_over_mass.transpose(1, 2) - grad_dot_next.unsqueeze(1)
            grad_s = attention * (grad_a - (attention * grad_a).sum(dim=-1, keepdim=True))
            diff = centroids.transpose(1, 2) - w  # c_j - w_i, (G, R, k)
            grad_w = (attention * grad_over_mass.transpose(1, 2)).sum(dim=-1, keepdim=True)
            grad_w += scale * (grad_s * diff).sum(dim=-1, keepdim=True)
            grad_weights[:, rows] += torch.where(active[:, None, None], grad_w, 0.0)
            if grad_out is not None:
                # The output's term, per unit of a row's own upstream gradient:
                # dS_ij = A_ij (C_L,j - W~_i), which gives b_v, and enters the sums weighted by
                # the value's summed upstream gradient n_v * mean.
                final = final_centroids.transpose(1, 2)
                out = (attention * final).sum(dim=-1, keepdim=True)
                grad_s_out = attention * (final - out)
                self.grad_scale[:, rows] = scale * (grad_s_out * diff).sum(dim=-1, keepdim=True)
                grad_s = grad_s + grad_s_out * grad_out[:, rows].float()
            sum_ds_diff -= (grad_s * diff * n).sum(dim=1).unsqueeze(-1)
        return sum_ds_diff


@torch.library.custom_op("dkm_kernels::dkm_unique_forward", mutates_args=())
def dkm_unique_forward(weights: Tensor, centroids: Tensor, tau: float, max_iter: int,
                       epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dkm_forward (same outputs) computed over the distinct values of 16-bit scalar weights."""
    check_inputs(weights, centroids, tau, max_iter, epsilon)
    _check_applies(weights)
    found = distinct(weights.contiguous())
    passes = CountedPasses(found.values, found.counts, tau)
    with torch.no_grad():
        table, history, masses, iterations = recurrence.forward(
            passes, centroids.contiguous(), max_iter, epsilon)
    out = found.expand(table.view(table.shape[:2]))
    return out.view(weights.shape), history, masses, iterations


@dkm_unique_forward.register_fake
def _(weights, centroids, tau, max_iter, epsilon):
    check_inputs(weights, centroids, tau, max_iter, epsilon)
    _check_applies(weights)
    return empty_forward_outputs(weights, centroids, max_iter)


@torch.library.custom_op("dkm_kernels::dkm_unique_backward", mutates_args=())
def dkm_unique_backward(grad_out: Tensor, weights: Tensor, centroid_history: Tensor,
                        masses: Tensor, iterations: Tensor, tau: float) -> Tensor:
    check_backward_inputs(grad_out, weights, centroid_history, masses, iterations, tau)
    _check_applies(weights)
    found = distinct(weights.contiguous())
    grad_out = grad_out.to(weights.dtype).contiguous().view(-1)
    sums = found.gather_sums(grad_out)
    mean = (sums / found.counts.clamp_min(1.0)).unsqueeze(-1)
    passes = CountedPasses(found.values, found.counts, tau)
    with torch.no_grad():
        grad = recurrence.backward(passes, mean, centroid_history.contiguous(),
                                   masses.contiguous(), iterations.contiguous(), tau)
    # dW_i = a_v(i) + G~_i b_v(i), chunk by chunk into the output.
    offset = found.table(grad.view(grad.shape[:2]))
    slope = found.table(passes.grad_scale.view(grad.shape[:2]))
    out = torch.empty_like(weights, memory_format=torch.contiguous_format)
    flat = out.view(-1)
    # Two chunk buffers, reused (no allocation per chunk).
    term, scale = offset.new_empty((2, min(CHUNK, flat.numel()))).unbind(0)
    for part, slots in found.parts():
        a, b = term[:slots.numel()], scale[:slots.numel()]
        torch.index_select(offset, 0, slots, out=a)
        torch.index_select(slope, 0, slots, out=b)
        flat[part] = a.addcmul_(grad_out[part], b)
    return out


@dkm_unique_backward.register_fake
def _(grad_out, weights, centroid_history, masses, iterations, tau):
    check_backward_inputs(grad_out, weights, centroid_history, masses, iterations, tau)
    return torch.empty_like(weights, memory_format=torch.contiguous_format)


def _check_applies(weights: Tensor) -> None:
    if not applies(weights):
        raise ValueError(f"uniquified DKM takes float16 or bfloat16 weights (G >= 1, M, d=1), got "
                         f"{weights.dtype} weights of shape {tuple(weights.shape)}; use "
                         f"dkm_kernels.dkm(..., uniquify=False) for them")


def _setup_context(ctx, inputs, output):
    weights, _, tau, _, _ = inputs
    _, centroid_history, masses, iterations = output
    ctx.mark_non_differentiable(centroid_history, masses, iterations)
    # The same as the plain op: W and O(L k) values. The distinct values are recomputed.
    ctx.save_for_backward(weights, centroid_history, masses, iterations)
    ctx.tau = tau
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *unused_grads):
    if grad_out is None or not ctx.needs_input_grad[0]:
        return (None,) * 5
    weights, centroid_history, masses, iterations = ctx.saved_tensors
    grad = dkm_unique_backward(grad_out, weights, centroid_history, masses, iterations, ctx.tau)
    return (grad,) + (None,) * 4


def _no_double_backward(ctx, grad):
    raise RuntimeError("DKM supports first derivatives only: its backward is not differentiable")


dkm_unique_forward.register_autograd(_backward, setup_context=_setup_context)
dkm_unique_backward.register_autograd(_no_double_backward)
