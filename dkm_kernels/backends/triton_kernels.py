"""Backend `triton`: fused DKM kernels that never hold more than a tile of the M x k attention.

Every pass is table-driven (docs/design.md §12): a program takes one *work item*, a range of rows
of one *segment* (one group of one problem: its own rows, k, tau and centroids), read from device
tables built once when the passes are bound to their weights. One problem with G groups is the
case of G segments; many problems in one call (`dkm_many`) are the case of many. The kernels are
specialised (constexpr) on d and the centroid block, so segments are bucketed by (weights dtype,
d, block) and each bucket is one launch per pass over a 1-D grid of its items, whatever the number
of problems in it.

Kernels (each reads W once per pass; docs/design.md §2, §3):

- `_attention_sums_kernel`: one DKM iteration. For the rows of a tile: scores to every centroid,
  softmax, and the tile's share of `sum_i A_ij v_i` (v = W, or G~ for the backward's G_L pass) and
  of `s_j = sum_i A_ij`. An item reduces its rows into one slot: a slot of its own (deterministic;
  `_reduce_slots_kernel` then sums each segment's slots in chunk order) or, with atomic adds,
  straight into its segment's part of the packed result (faster, not bit-reproducible).
- `_output_kernel`: W~ = A_{L-1} C_L, one sweep over the centroids with a running max
  (online softmax), one item per row tile.
- `_backward_kernel`: one backward pass t (docs/design.md §3): recomputes A_t, dA, dS for a tile,
  adds the tile's rows of dW and reduces sum_i dS_ij w_i and sum_i dS_ij into slots, as above.

When k fits in one block of centroids (k <= MAX_SINGLE_BLOCK_K) the softmax of a tile is computed
in registers and the item's k x d sums stay in registers. Otherwise each tile takes two sweeps over
the centroid blocks: the first finds the row's log-sum-exp (and, in backward, sum_l A_il dA_il)
with a running max, the second computes the exact attention block by block and adds each block
into the slot (read-modify-write of a slot only this program touches, behind a barrier).

Distances are sums of squared differences in fp32 (nothing cancels, no TF32); the matrix products
of attention tiles use tl.dot with input_precision="ieee" (full fp32). Exponentials are exp2 of
(nearest distance - distance) * log2(e) / tau, exactly 0 for a row's nearest centroid whatever
the compiler fuses (docs/design.md §8).

The recurrence that runs these passes (recurrence.py: the iterations, the epsilon test, the k x d
centroid updates, the backward's order) is shared with every backend. The centroid state is the
packed (S, k_max, d_max) of `many.Layout` (for one problem: (G, k, d)), read in place with its
strides. A segment that has stopped is skipped by the kernels (`stops_on_device`).

Memory: nothing is saved for backward beyond the op's outputs (history, masses, iterations) and W.
Transient: the slots, k x (d + 1) floats per item, whose count the deterministic mode bounds by
WORKSPACE_BYTES (so a very large k runs on fewer items there); none in the atomic mode; the tables
(a few int64 per segment and per item); and for float16/bfloat16 weights an fp32 dW buffer of W's
shape, cast at the end. Weights are not copied: a table holds each problem's address, and each
segment's row gives its first element there.

CUDA graphs (docs/design.md §12): after a first call has built and cached the tables, a call
copies nothing to the device (the addresses of G~, dW and W~ are kernel arguments of
`_store_addresses_kernel`) and, under capture, reads nothing from it (recurrence.py), so a whole
forward+backward can be captured and replayed.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import Tensor

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
import triton.language as tl

from ..capture import DeviceCache


# k up to this many centroids is handled as one block per tile (softmax in registers).
MAX_SINGLE_BLOCK_K = 256
# Centroids per block when k is larger (two sweeps per tile).
MULTI_BLOCK_K = 64
# Rows per tile when k is larger than one block.
MULTI_BLOCK_M = 32
# Elements of a rows x centroids tile in the single-block case (bounds registers per program);
# the backward keeps three such tiles (A, dA, dS) alive, the forward one.
SINGLE_BLOCK_TILE = 8192
BACKWARD_SINGLE_BLOCK_TILE = 4096
# Transient bytes the per-item slots of the deterministic reduction may take.
WORKSPACE_BYTES = 64 * 2**20
# Programs per streaming multiprocessor to aim for in each launch; on CPU (interpreter) a fixed
# small count.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3
# Packed values summed per program of the slot reduction.
REDUCE_BLOCK = 1024

_LOG2E = 1.4426950408889634

# Table layouts (int64 rows). An item: its segment (row of the bucket's segment table), its rows
# [row_begin, row_end), and the offsets of its slot's sums and masses. A segment: its index in the
# packed state, its k, its problem (index in the call) and the element where its group's rows
# start in that problem's (G, M, d) tensors. Scales (float32): log2(e)/tau, 2/tau per segment.
ITEM_FIELDS: tl.constexpr = tl.constexpr(5)
SEGMENT_FIELDS: tl.constexpr = tl.constexpr(4)
SCALE_FIELDS: tl.constexpr = tl.constexpr(2)
REDUCE_FIELDS: tl.constexpr = tl.constexpr(5)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype == torch.float64:
        return ("the triton kernels compute in float32 and do not take float64 weights; use "
                "backend='torch' or backend='reference' for float64 (gradcheck, say)")
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return (f"the triton kernels run on CUDA tensors, not on {device.type}; use backend='cpu' or "
            f"backend='torch' for {device.type} tensors")


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _item(items_ptr, segments_ptr, scales_ptr):
    """This program's work item: (bucket segment, packed state index, k, row_begin, row_end,
    sums slot offset, mass slot offset, log2(e)/tau, 2/tau)."""
    fields = items_ptr + tl.program_id(0).to(tl.int64) * ITEM_FIELDS
    segment = tl.load(fields)
    state = tl.load(segments_ptr + segment * SEGMENT_FIELDS)
    k = tl.load(segments_ptr + segment * SEGMENT_FIELDS + 1).to(tl.int32)
    row_begin = tl.load(fields + 1)
    row_end = tl.load(fields + 2)
    log2e_over_tau = tl.load(scales_ptr + segment * SCALE_FIELDS)
    two_over_tau = tl.load(scales_ptr + segment * SCALE_FIELDS + 1)
    return (segment, state, k, row_begin, row_end, tl.load(fields + 3), tl.load(fields + 4),
            log2e_over_tau, two_over_tau)


@triton.jit
def _rows_of(addresses_ptr, segments_ptr, segment, like_ptr):
    """The segment's (m, D) rows in one tensor per problem: the problem's address from
    `addresses_ptr` (problems,), typed as `like_ptr`, plus the segment's first element."""
    fields = segments_ptr + segment * SEGMENT_FIELDS
    address = tl.load(addresses_ptr + tl.load(fields + 2))
    return address.to(tl.pointer_type(like_ptr.dtype.element_ty)) + tl.load(fields + 3)


@triton.jit
def _squared_distances(w_ptr, c_ptr, c_stride, rows, row_mask, cols, col_mask,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """||w_i - c_j||^2 for a tile, +inf for columns past k.

    w_ptr: (M, D) one segment's rows; c_ptr: (k, c_stride) its centroids (fp32).
    """
    squared = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for dim in tl.static_range(D):
        w_col = tl.load(w_ptr + rows * D + dim, mask=row_mask, other=0.0).to(tl.float32)
        c_col = tl.load(c_ptr + cols * c_stride + dim, mask=col_mask, other=0.0)
        diff = w_col[:, None] - c_col[None, :]
        squared += diff * diff
    return tl.where(col_mask[None, :], squared, float("inf"))


@triton.jit
def _grad_attention(w_ptr, grad_out_ptr, grad_over_mass_ptr, grad_dot_next_ptr, final_ptr,
                    c_stride, rows, row_mask, cols, col_mask,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_GRAD_OUT: tl.constexpr):
    """dA_ij = (G_{t+1,j} / s_j) . w_i - (G_{t+1,j} / s_j) . C_{t+1,j}
    (+ G~_i . C_{L,j} in the first backward pass, HAS_GRAD_OUT).

    w_ptr, grad_out_ptr: (M, D) one segment's rows; grad_over_mass_ptr, final_ptr: (k, c_stride)
    fp32, its G_{t+1}/s_t (zero where the centroid has no mass) and C_L; grad_dot_next_ptr: (k,)
    fp32, (G_{t+1,j} / s_j) . C_{t+1,j}.
    """
    dot_next = tl.load(grad_dot_next_ptr + cols, mask=col_mask, other=0.0)
    grad = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32) - dot_next[None, :]
    for dim in tl.static_range(D):
        w_col = tl.load(w_ptr + rows * D + dim, mask=row_mask, other=0.0).to(tl.float32)
        g_col = tl.load(grad_over_mass_ptr + cols * c_stride + dim, mask=col_mask, other=0.0)
        grad += g_col[None, :] * w_col[:, None]
    if HAS_GRAD_OUT:
        for dim in tl.static_range(D):
            go_col = tl.load(grad_out_ptr + rows * D + dim, mask=row_mask, other=0.0).to(tl.float32)
            f_col = tl.load(final_ptr + cols * c_stride + dim, mask=col_mask, other=0.0)
            grad += go_col[:, None] * f_col[None, :]
    return grad


# Exponents are (nearest distance - distance) * log2(e) / tau: exactly 0 for the row's nearest
# centroid however large the scores, since nothing follows the multiply that a compiler could fuse
# with it. Scaling first and subtracting the maximum after (the textbook softmax) lets the
# compiler contract the two into one fused multiply-add, whose unrounded product leaves the
# largest exponent off zero by up to an ulp of |score|: with tiny taus, an overflow.

@triton.jit
def _softmax_rows(squared, row_mask, log2e_over_tau):
    """Attention of a tile whose squared distances cover all k centroids; zero on masked rows."""
    nearest = tl.min(squared, axis=1)
    p = tl.exp2((nearest[:, None] - squared) * log2e_over_tau)
    attention = p / tl.sum(p, axis=1)[:, None]
    return tl.where(row_mask[:, None], attention, 0.0)


@triton.jit
def _online_min(row_min, row_sum, squared, log2e_over_tau):
    """One block of an online softmax: the new running nearest distance, the running sum of the
    exp2 terms taken under it, the factor that rescales other sums taken under the old one, and
    the block's exp2((new nearest - distance) log2(e) / tau)."""
    new_min = tl.minimum(row_min, tl.min(squared, axis=1))
    rescale = tl.exp2((new_min - row_min) * log2e_over_tau)
    p = tl.exp2((new_min[:, None] - squared) * log2e_over_tau)
    return new_min, row_sum * rescale + tl.sum(p, axis=1), rescale, p


@triton.jit
def _normalised(squared, row_mask, row_min, log2_sum, log2e_over_tau):
    """exp2 of the scores minus the row's log2-sum-exp2: the exact attention of a block; zero on
    masked rows."""
    attention = tl.exp2((row_min[:, None] - squared) * log2e_over_tau - log2_sum[:, None])
    return tl.where(row_mask[:, None], attention, 0.0)


@triton.jit
def _row_block(row_start, row_end, BLOCK_M: tl.constexpr):
    """Rows row_start.. as a block of BLOCK_M (int64 offsets) and which of them are before row_end."""
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows < row_end


@triton.jit
def _col_block_distances(w_ptr, c_ptr, c_stride, rows, row_mask, col_start, k,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One block of a sweep over the centroids: centroids col_start.. (BLOCK_K, masked at k) and
    their squared distances to the rows (inf on masked centroids)."""
    cols = col_start + tl.arange(0, BLOCK_K)
    col_mask = cols < k
    squared = _squared_distances(w_ptr, c_ptr, c_stride, rows, row_mask, cols, col_mask,
                                 D, BLOCK_M, BLOCK_K)
    return cols, col_mask, squared


@triton.jit
def _add_to_rows(ptr, rows, row_mask, dims, values, D: tl.constexpr):
    """ptr[rows] += values for a (BLOCK_M, BLOCK_D) tile of a (M, D) fp32 matrix."""
    ptrs = ptr + rows[:, None] * D + dims[None, :]
    mask = row_mask[:, None] & (dims < D)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)


@triton.jit
def _load_block(ptr, first, count, dims, stride, D: tl.constexpr):
    """Rows first.. of a (count, stride) matrix, its first D columns, as a (block, BLOCK_D) fp32
    tile, zero-padded."""
    mask = (first < count)[:, None] & (dims < D)[None, :]
    return tl.load(ptr + first[:, None] * stride + dims[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _add_to_slot(sums_ptr, mass_ptr, stride, cols, col_mask, dims, block_sums, block_mass,
                 D: tl.constexpr, ATOMIC: tl.constexpr):
    """Add a block's (BLOCK_K, BLOCK_D) sums and (BLOCK_K,) masses into a slot.

    sums_ptr: (k, stride) fp32 and mass_ptr: (k,) fp32, the slot. ATOMIC: the slot is shared by
    all items of the segment; otherwise it is this program's own and a barrier orders its earlier
    stores before this read.
    """
    sums_mask = col_mask[:, None] & (dims < D)[None, :]
    sums_ptrs = sums_ptr + cols[:, None] * stride + dims[None, :]
    if ATOMIC:
        tl.atomic_add(sums_ptrs, block_sums, mask=sums_mask)
        tl.atomic_add(mass_ptr + cols, block_mass, mask=col_mask)
    else:
        tl.debug_barrier()
        tl.store(sums_ptrs, tl.load(sums_ptrs, mask=sums_mask, other=0.0) + block_sums, mask=sums_mask)
        mass_ptrs = mass_ptr + cols
        tl.store(mass_ptrs, tl.load(mass_ptrs, mask=col_mask, other=0.0) + block_mass, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Kernels (one program per work item)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attention_sums_kernel(
    items_ptr,           # (items, ITEM_FIELDS) int64
    segments_ptr,        # (segments, SEGMENT_FIELDS) int64: state index, k, problem, first element
    scales_ptr,          # (segments, SCALE_FIELDS) fp32: log2(e)/tau, 2/tau
    weight_addrs_ptr,    # (problems,) int64: address of each problem's W (_rows_of)
    value_addrs_ptr,     # (problems,) int64: of its v_i (W, or G~), summed with weights A_ij
    like_ptr,            # any tensor of the weights' dtype: types the addresses
    centroids_ptr,       # (S, k_max, d_max) fp32, packed: the centroids of the attention
    active_ptr,          # (S,) int32: 0 for a segment that has stopped (its items do nothing)
    sums_ptr,            # fp32, zeroed: the slots' sum_i A_ij v_i
    mass_ptr,            # fp32, zeroed: the slots' sum_i A_ij
    k_max, d_max, slot_stride,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, ATOMIC: tl.constexpr,
):
    (segment, state, k, row_begin, row_end, sums_offset, mass_offset, log2e_over_tau,
     _) = _item(items_ptr, segments_ptr, scales_ptr)
    if tl.load(active_ptr + state) != 0:
        w_ptr = _rows_of(weight_addrs_ptr, segments_ptr, segment, like_ptr)
        v_ptr = _rows_of(value_addrs_ptr, segments_ptr, segment, like_ptr)
        c_ptr = centroids_ptr + state * k_max * d_max
        slot_sums_ptr = sums_ptr + sums_offset
        slot_mass_ptr = mass_ptr + mass_offset
        dims = tl.arange(0, BLOCK_D)

        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK_K)
            col_mask = cols < k
            chunk_sums = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            chunk_mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                squared = _squared_distances(w_ptr, c_ptr, d_max, rows, row_mask, cols, col_mask,
                                             D, BLOCK_M, BLOCK_K)
                attention = _softmax_rows(squared, row_mask, log2e_over_tau)
                values = _load_block(v_ptr, rows, row_end, dims, D, D)
                chunk_sums += tl.dot(tl.trans(attention), values, input_precision="ieee")
                chunk_mass += tl.sum(attention, axis=0)
            _add_to_slot(slot_sums_ptr, slot_mass_ptr, slot_stride, cols, col_mask, dims,
                         chunk_sums, chunk_mass, D, ATOMIC)
        else:
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                # Sweep 1: the row's log2-sum-exp2 over all centroids, with a running max.
                row_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
                row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(
                        w_ptr, c_ptr, d_max, rows, row_mask, col_start, k, D, BLOCK_M, BLOCK_K)
                    row_min, row_sum, rescale, p = _online_min(row_min, row_sum, squared,
                                                               log2e_over_tau)
                log2_sum = tl.log2(row_sum)
                values = _load_block(v_ptr, rows, row_end, dims, D, D)
                # Sweep 2: exact attention, block by block, into the slot.
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(
                        w_ptr, c_ptr, d_max, rows, row_mask, col_start, k, D, BLOCK_M, BLOCK_K)
                    attention = _normalised(squared, row_mask, row_min, log2_sum, log2e_over_tau)
                    block_sums = tl.dot(tl.trans(attention), values, input_precision="ieee")
                    _add_to_slot(slot_sums_ptr, slot_mass_ptr, slot_stride, cols, col_mask, dims,
                                 block_sums, tl.sum(attention, axis=0), D, ATOMIC)


@triton.jit
def _output_kernel(
    items_ptr, segments_ptr, scales_ptr,  # as in _attention_sums_kernel; an item is a row tile
    weight_addrs_ptr,    # (problems,) int64: each problem's W
    out_addrs_ptr,       # (problems,) int64: each problem's W~ (weights' dtype)
    like_ptr,            # any tensor of the weights' dtype
    attend_ptr,          # (S, k_max, d_max) fp32: C_{L-1}, the centroids of the last attention
    final_ptr,           # (S, k_max, d_max) fp32: C_L
    k_max, d_max,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    (segment, state, k, row_begin, row_end, _, _, log2e_over_tau,
     _) = _item(items_ptr, segments_ptr, scales_ptr)
    w_ptr = _rows_of(weight_addrs_ptr, segments_ptr, segment, like_ptr)
    out_ptr = _rows_of(out_addrs_ptr, segments_ptr, segment, like_ptr)
    c_ptr = attend_ptr + state * k_max * d_max
    f_ptr = final_ptr + state * k_max * d_max
    dims = tl.arange(0, BLOCK_D)
    rows, row_mask = _row_block(row_begin, row_end, BLOCK_M)
    row_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(0, k, BLOCK_K):
        cols, col_mask, squared = _col_block_distances(w_ptr, c_ptr, d_max, rows, row_mask,
                                                       col_start, k, D, BLOCK_M, BLOCK_K)
        row_min, row_sum, rescale, p = _online_min(row_min, row_sum, squared, log2e_over_tau)
        final = _load_block(f_ptr, cols, k, dims, d_max, D)
        acc = acc * rescale[:, None] + tl.dot(p, final, input_precision="ieee")
    out = acc / row_sum[:, None]
    out_mask = row_mask[:, None] & (dims < D)[None, :]
    tl.store(out_ptr + rows[:, None] * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _backward_kernel(
    items_ptr, segments_ptr, scales_ptr,  # as in _attention_sums_kernel
    weight_addrs_ptr,    # (problems,) int64: each problem's W
    grad_out_addrs_ptr,  # (problems,) int64: its G~ (read only when HAS_GRAD_OUT)
    grad_w_addrs_ptr,    # (problems,) int64: its dW (fp32), this pass's terms added
    like_ptr,            # any tensor of the weights' dtype
    centroids_ptr,       # (S, k_max, d_max) fp32: C_t
    grad_over_mass_ptr,  # (S, k_max, d_max) fp32: G_{t+1,j} / s_{t,j}, zero without mass
    grad_dot_next_ptr,   # (S, k_max) fp32: (G_{t+1,j} / s_{t,j}) . C_{t+1,j}
    final_ptr,           # (S, k_max, d_max) fp32: C_L
    active_ptr,          # (S,) int32: 1 where the segment takes part in this pass
    ds_w_ptr,            # fp32, zeroed: the slots' sum_i dS_ij w_i
    ds_ptr,              # fp32, zeroed: the slots' sum_i dS_ij
    k_max, d_max, slot_stride,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, ATOMIC: tl.constexpr, HAS_GRAD_OUT: tl.constexpr,
):
    (segment, state, k, row_begin, row_end, sums_offset, mass_offset, log2e_over_tau,
     two_over_tau) = _item(items_ptr, segments_ptr, scales_ptr)
    if tl.load(active_ptr + state) != 0:
        w_ptr = _rows_of(weight_addrs_ptr, segments_ptr, segment, like_ptr)
        go_ptr = _rows_of(grad_out_addrs_ptr, segments_ptr, segment, like_ptr)
        gw_ptr = _rows_of(grad_w_addrs_ptr, segments_ptr, segment, centroids_ptr)  # fp32
        c_ptr = centroids_ptr + state * k_max * d_max
        n_ptr = grad_dot_next_ptr + state * k_max
        g_ptr = grad_over_mass_ptr + state * k_max * d_max
        f_ptr = final_ptr + state * k_max * d_max
        slot_ds_w_ptr = ds_w_ptr + sums_offset
        slot_ds_ptr = ds_ptr + mass_offset
        dims = tl.arange(0, BLOCK_D)

        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK_K)
            col_mask = cols < k
            grad_over_mass = _load_block(g_ptr, cols, k, dims, d_max, D)
            centroids = _load_block(c_ptr, cols, k, dims, d_max, D)
            chunk_ds_w = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            chunk_ds = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                squared = _squared_distances(w_ptr, c_ptr, d_max, rows, row_mask, cols, col_mask,
                                             D, BLOCK_M, BLOCK_K)
                attention = _softmax_rows(squared, row_mask, log2e_over_tau)
                grad_a = _grad_attention(w_ptr, go_ptr, g_ptr, n_ptr, f_ptr, d_max, rows, row_mask,
                                         cols, col_mask, D, BLOCK_M, BLOCK_K, HAS_GRAD_OUT)
                weighted = tl.sum(attention * grad_a, axis=1)
                grad_s = attention * (grad_a - weighted[:, None])
                w = _load_block(w_ptr, rows, row_end, dims, D, D)
                # dW_i = sum_j A_ij G_j/s_j + (2/tau) sum_j dS_ij (c_j - w_i)
                grad_w = tl.dot(attention, grad_over_mass, input_precision="ieee")
                grad_w += two_over_tau * (tl.dot(grad_s, centroids, input_precision="ieee")
                                          - w * tl.sum(grad_s, axis=1)[:, None])
                _add_to_rows(gw_ptr, rows, row_mask, dims, grad_w, D)
                chunk_ds_w += tl.dot(tl.trans(grad_s), w, input_precision="ieee")
                chunk_ds += tl.sum(grad_s, axis=0)
            _add_to_slot(slot_ds_w_ptr, slot_ds_ptr, slot_stride, cols, col_mask, dims,
                         chunk_ds_w, chunk_ds, D, ATOMIC)
        else:
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                # Sweep 1: log-sum-exp and sum_l A_il dA_il over all centroids, running max.
                row_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
                row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                row_weighted = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(
                        w_ptr, c_ptr, d_max, rows, row_mask, col_start, k, D, BLOCK_M, BLOCK_K)
                    grad_a = _grad_attention(w_ptr, go_ptr, g_ptr, n_ptr, f_ptr, d_max, rows,
                                             row_mask, cols, col_mask, D, BLOCK_M, BLOCK_K,
                                             HAS_GRAD_OUT)
                    row_min, row_sum, rescale, p = _online_min(row_min, row_sum, squared,
                                                               log2e_over_tau)
                    row_weighted = row_weighted * rescale + tl.sum(p * grad_a, axis=1)
                log2_sum = tl.log2(row_sum)
                weighted = row_weighted / row_sum
                w = _load_block(w_ptr, rows, row_end, dims, D, D)
                grad_w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                grad_s_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
                # Sweep 2: exact A and dS block by block; dW in registers, column sums to the slot.
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(
                        w_ptr, c_ptr, d_max, rows, row_mask, col_start, k, D, BLOCK_M, BLOCK_K)
                    attention = _normalised(squared, row_mask, row_min, log2_sum, log2e_over_tau)
                    grad_a = _grad_attention(w_ptr, go_ptr, g_ptr, n_ptr, f_ptr, d_max, rows,
                                             row_mask, cols, col_mask, D, BLOCK_M, BLOCK_K,
                                             HAS_GRAD_OUT)
                    grad_s = attention * (grad_a - weighted[:, None])
                    grad_over_mass = _load_block(g_ptr, cols, k, dims, d_max, D)
                    centroids = _load_block(c_ptr, cols, k, dims, d_max, D)
                    grad_w += tl.dot(attention, grad_over_mass, input_precision="ieee")
                    grad_w += two_over_tau * tl.dot(grad_s, centroids, input_precision="ieee")
                    grad_s_rows += tl.sum(grad_s, axis=1)
                    _add_to_slot(slot_ds_w_ptr, slot_ds_ptr, slot_stride, cols, col_mask, dims,
                                 tl.dot(tl.trans(grad_s), w, input_precision="ieee"),
                                 tl.sum(grad_s, axis=0), D, ATOMIC)
                grad_w -= two_over_tau * w * grad_s_rows[:, None]
                _add_to_rows(gw_ptr, rows, row_mask, dims, grad_w, D)


ADDRESSES_PER_LAUNCH = 16


# The addresses are arguments, not specialised on (a value divisible by 16 would be): any
# addresses run the one compiled kernel, and a captured launch keeps its arguments.
@triton.jit(do_not_specialize=[f"a{i}" for i in range(ADDRESSES_PER_LAUNCH)])
def _store_addresses_kernel(table_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12,
                            a13, a14, a15):
    """table[0:16] = a0..a15: tensors' addresses written on the device from launch arguments,
    with no host-to-device copy (RaggedPasses._addresses)."""
    tl.store(table_ptr + 0, a0)
    tl.store(table_ptr + 1, a1)
    tl.store(table_ptr + 2, a2)
    tl.store(table_ptr + 3, a3)
    tl.store(table_ptr + 4, a4)
    tl.store(table_ptr + 5, a5)
    tl.store(table_ptr + 6, a6)
    tl.store(table_ptr + 7, a7)
    tl.store(table_ptr + 8, a8)
    tl.store(table_ptr + 9, a9)
    tl.store(table_ptr + 10, a10)
    tl.store(table_ptr + 11, a11)
    tl.store(table_ptr + 12, a12)
    tl.store(table_ptr + 13, a13)
    tl.store(table_ptr + 14, a14)
    tl.store(table_ptr + 15, a15)


@triton.jit
def _reduce_slots_kernel(
    slot_sums_ptr,   # fp32: every item's (k, d) slot, each segment's slots in chunk order
    slot_mass_ptr,   # fp32: every item's (k,) slot
    table_ptr,       # (S, REDUCE_FIELDS) int64: slots, k, d, first sums slot, first mass slot
    sums_ptr,        # (S, k_max, d_max) fp32: the packed sums, written in full (zero padding)
    mass_ptr,        # (S, k_max) fp32: the packed masses
    k_max, d_max,
    BLOCK: tl.constexpr,
):
    """The deterministic reduction: each segment's slots summed one after another, in chunk order
    (the same bits for any device and run), into the packed result; one program per block of a
    segment's packed values."""
    state = tl.program_id(0).to(tl.int64)
    fields = table_ptr + state * REDUCE_FIELDS
    slots = tl.load(fields).to(tl.int32)
    k = tl.load(fields + 1)
    d = tl.load(fields + 2)
    first_sums = tl.load(fields + 3)
    first_mass = tl.load(fields + 4)
    packed = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    centroid, dim = packed // d_max, packed % d_max
    in_segment = (centroid < k) & (dim < d)
    sums = tl.zeros((BLOCK,), dtype=tl.float32)
    mass = tl.zeros((BLOCK,), dtype=tl.float32)
    for slot in range(0, slots):
        sums += tl.load(slot_sums_ptr + first_sums + slot * k * d + centroid * d + dim,
                        mask=in_segment, other=0.0)
        mass += tl.load(slot_mass_ptr + first_mass + slot * k + packed, mask=packed < k,
                        other=0.0)
    tl.store(sums_ptr + state * k_max * d_max + packed, sums, mask=packed < k_max * d_max)
    tl.store(mass_ptr + state * k_max + packed, mass, mask=packed < k_max)


# ----------------------------------------------------------------------------------------------
# Tables and host side
# ----------------------------------------------------------------------------------------------

_SM_COUNTS: dict[int, int] = {}


def _program_target(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return PROGRAMS_PER_SM * _SM_COUNTS[index]


def _launch(kernel, items: int, *args, **meta) -> None:
    """Every launch of this backend: `kernel` over a 1-D grid of `items` programs (or the 2-D
    grid given), nothing when there is no work (tests count launches here)."""
    grid = items if isinstance(items, tuple) else (items,)
    if all(grid):
        kernel[grid](*args, num_stages=1, **meta)


def _block_k(k: int) -> int:
    """The centroid block of the variant that takes k: the power of two >= k (at least 16) when
    k fits one block, else MULTI_BLOCK_K."""
    return max(16, 1 << (k - 1).bit_length()) if k <= MAX_SINGLE_BLOCK_K else MULTI_BLOCK_K


class _Blocks:
    """Tile sizes of one kernel variant: the centroid block (one block of BLOCK_K >= k, or blocks
    of MULTI_BLOCK_K swept twice), the rows per tile and the warps, for d and a tile budget."""

    def __init__(self, k: int, d: int, tile: int):
        self.single_block = k <= MAX_SINGLE_BLOCK_K
        self.block_k = _block_k(k)
        self.block_m = (min(128, max(16, tile // self.block_k)) if self.single_block
                        else MULTI_BLOCK_M)
        self.block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs 16 or more
        # Chosen so that ptxas (sm_90, d = 8) reports no register spills for these tiles.
        self.num_warps = 8 if self.block_m * self.block_k >= 2048 else 4

    def output(self) -> "_Blocks":
        """The output kernel sweeps the centroids with a running max anyway: a product A @ C over
        at most MULTI_BLOCK_K centroids at a time keeps it from spilling registers."""
        if self.block_k <= MULTI_BLOCK_K:
            return self
        blocks = _Blocks.__new__(_Blocks)
        blocks.__dict__.update(self.__dict__, block_k=MULTI_BLOCK_K, block_m=MULTI_BLOCK_M)
        blocks.num_warps = 8 if blocks.block_m * blocks.block_k >= 2048 else 4
        return blocks


def _cdiv(a: np.ndarray, b) -> np.ndarray:
    return -(-a // b)


def _chunks(m: np.ndarray, work: np.ndarray, slot_bytes: np.ndarray, segments: int, block_m: int,
            target: int, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Items per segment of one bucket and rows per item: the bucket's `target` items shared in
    proportion to the segments' work (a segment's chunk of rows then costs about the same as any
    other's), at most one per row tile, and in deterministic mode at most what keeps every
    segment's slots within its share WORKSPACE_BYTES / `segments` of the workspace. For one
    problem of G groups this is min(tiles, ceil(target / G)): every group alike."""
    tiles = _cdiv(m, block_m)
    chunks = np.minimum(tiles, np.maximum(1, _cdiv(target * work, max(1, int(work.sum())))))
    if deterministic:
        chunks = np.minimum(chunks, np.maximum(1, WORKSPACE_BYTES // (segments * slot_bytes)))
    # Equal row tiles per item; a segment without rows (a rank holding none) has no items.
    tiles_per_chunk = np.maximum(1, _cdiv(tiles, np.maximum(1, chunks)))
    return _cdiv(tiles, tiles_per_chunk), tiles_per_chunk * block_m


# Built tables by what they are built from (RaggedPasses._tables_key): a layer clustered call
# after call, and the backward after its forward, reuse them (no host work, no copy), and those a
# CUDA graph captured stay for its replays. Addresses are only numbers: a key's tables stay right
# whatever tensor later holds those addresses.
TABLE_CACHE_SIZE = 256
_TABLES = DeviceCache(TABLE_CACHE_SIZE)


class _Bucket:
    """The segments of one kernel variant (weights dtype, d, centroid block) and their items:
    one launch per pass."""

    def __init__(self, segments: list[int], k: int, d: int, like: Tensor):
        self.segments = segments
        self.blocks = _Blocks(k, d, SINGLE_BLOCK_TILE)
        self.backward_blocks = _Blocks(k, d, BACKWARD_SINGLE_BLOCK_TILE)
        self.output_blocks = self.blocks.output()
        self.d = d
        self.like = like  # a one-element tensor of the weights' dtype: types the addresses


def _to_device(values: np.ndarray, device: torch.device) -> Tensor:
    """A host-built table on the device: from pinned memory, without waiting for the copy."""
    table = torch.from_numpy(values)
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


class RaggedPasses:
    """recurrence.Passes over many problems at once (docs/design.md §12), as Triton launches:
    one launch per pass and bucket of segments that share a kernel variant. `weights`: every
    problem's (G_p, M_p, d_p); `layout`: where each problem's segments live in the packed state;
    `taus`: each problem's tau. Segments whose `active` entry is False are skipped."""

    # The programs read `active` on the device: the recurrence runs every iteration with no host
    # sync in between (recurrence.forward).
    stops_on_device = True

    def __init__(self, weights: list[Tensor], layout, taus: list[float], deterministic: bool):
        for p, w in enumerate(weights):
            reason = unavailable_reason(w.device, w.dtype)
            if reason is not None:
                raise ValueError(f"backend='triton' cannot run weights[{p}] here: {reason}")
        self.weights = self._problems = weights
        self.layout = layout
        self.device = weights[0].device
        self.atomic = not deterministic
        self.k_max, self.d_max = max(layout.ks), max(layout.dims)
        built = _TABLES.get(self._tables_key(taus), lambda: self._build(taus, deterministic))
        self.buckets, self._slot_sizes, self._reduce_tables, addresses = built
        self._address_cache = {self._key(weights): addresses}

    def _tables_key(self, taus: list[float]) -> tuple:
        """Everything the tables are built from: the weights' addresses, dtypes and shapes, k,
        tau, the mode, the device and the tile constants."""
        return (self.device, self.atomic, _program_target(self.device), MAX_SINGLE_BLOCK_K,
                MULTI_BLOCK_K, MULTI_BLOCK_M, SINGLE_BLOCK_TILE, BACKWARD_SINGLE_BLOCK_TILE,
                WORKSPACE_BYTES, tuple(taus), tuple(self.layout.ks),
                tuple((w.dtype, tuple(w.shape), w.data_ptr()) for w in self._problems))

    def _build(self, taus: list[float], deterministic: bool) -> tuple:
        """The buckets with their device tables, the slot buffer sizes, the reduction tables and
        the weights' address table."""
        weights, layout = self._problems, self.layout
        # One bucket per kernel variant (tiles depend on k only through the centroid block),
        # segments in problem order within it.
        keyed: dict[tuple, list[int]] = {}
        for p, (w, k, d) in enumerate(zip(weights, layout.ks, layout.dims)):
            key = (w.dtype, d, k <= MAX_SINGLE_BLOCK_K, _block_k(k))
            keyed.setdefault(key, []).append(p)
        self.buckets = []
        for (_, d, _, _), problems in keyed.items():
            segments = [layout.starts[p] + g for p in problems for g in range(layout.groups[p])]
            bucket = _Bucket(segments, layout.ks[problems[0]], d,
                             torch.empty(1, dtype=weights[problems[0]].dtype, device=self.device))
            bucket.problems = problems
            self.buckets.append(bucket)
        # Tables, built once from the shapes (host work only) and copied to the device in one
        # go: a pass copies nothing to the device (the addresses of tensors it is handed or
        # makes, the upstream gradient, dW and W~, are written there by a kernel: _addresses).
        target = _program_target(self.device)
        total_segments = layout.segments
        int_parts, scale_parts = [], []
        reduce_rows = {kind: np.zeros((total_segments, 5), np.int64)
                       for kind in ("forward", "backward")}
        first = {kind: [0, 0] for kind in ("forward", "backward")}
        for bucket in self.buckets:
            per_problem = lambda values: np.repeat(  # noqa: E731
                np.asarray(values), [layout.groups[p] for p in bucket.problems])
            seg = np.asarray(bucket.segments, np.int64)
            seg_m = per_problem([weights[p].shape[1] for p in bucket.problems]).astype(np.int64)
            seg_k = per_problem([layout.ks[p] for p in bucket.problems]).astype(np.int64)
            tau = per_problem([taus[p] for p in bucket.problems]).astype(np.float64)
            problem = per_problem(bucket.problems).astype(np.int64)
            first_row = seg - np.asarray(layout.starts, np.int64)[problem]  # the group
            first_element = first_row * seg_m * np.asarray(layout.dims, np.int64)[problem]
            int_parts.append(np.stack([seg, seg_k, problem, first_element], axis=1))
            # log2(e)/tau and 2/tau rounded once to float32, as a Python float kernel argument is
            scale_parts.append(np.stack([_LOG2E / tau, 2.0 / tau], axis=1).astype(np.float32))
            work = seg_m * (_cdiv(seg_k, bucket.blocks.block_k) * bucket.blocks.block_k)
            slot_bytes = seg_k * (bucket.d + 1) * 4
            for kind, blocks in (("forward", bucket.blocks), ("backward", bucket.backward_blocks)):
                chunks, rows_per_chunk = _chunks(seg_m, work, slot_bytes, total_segments,
                                                 blocks.block_m, target, deterministic)
                int_parts.append(self._items(bucket, seg, seg_m, seg_k, chunks, rows_per_chunk,
                                             reduce_rows[kind], first[kind]))
            block_m = bucket.output_blocks.block_m
            int_parts.append(self._items(bucket, seg, seg_m, seg_k, _cdiv(seg_m, block_m),
                                         np.full_like(seg_m, block_m), None, None))
        slot_sizes = {kind: tuple(first[kind]) for kind in first}
        if not self.atomic:
            int_parts += [reduce_rows["forward"], reduce_rows["backward"]]
        int_parts.append(np.asarray(self._key(weights), np.int64))
        tables = _to_device(np.concatenate([part.reshape(-1) for part in int_parts]), self.device)
        scales = _to_device(np.concatenate([part.reshape(-1) for part in scale_parts]
                                           or [np.zeros(0, np.float32)]), self.device)
        views, offset = [], 0
        for part in int_parts:
            views.append(tables[offset:offset + part.size].view(part.shape))
            offset += part.size
        views, offset = iter(views), 0
        for bucket in self.buckets:
            bucket.table = next(views)
            bucket.items = {kind: next(views) for kind in ("forward", "backward", "output")}
            bucket.scales = scales[offset:offset + 2 * len(bucket.segments)]
            offset += 2 * len(bucket.segments)
        reduce_tables = {} if self.atomic else {"forward": next(views), "backward": next(views)}
        return self.buckets, slot_sizes, reduce_tables, next(views)

    def _items(self, bucket, seg, seg_m, seg_k, chunks, rows_per_chunk, reduce_rows, first):
        """The (items, ITEM_FIELDS) table of one pass and bucket: for each segment, its chunks of
        rows, each with its slot (deterministic: its own, its segment's slots one after another,
        with the segment's row of the reduction table; atomic: the segment's part of the packed
        result, whose row stride is d_max). `reduce_rows` None: the output pass, no slots."""
        item_segment = np.repeat(np.arange(len(seg), dtype=np.int64), chunks)
        starts = np.cumsum(chunks) - chunks
        chunk = np.arange(int(chunks.sum()), dtype=np.int64) - starts[item_segment]
        row_begin = chunk * rows_per_chunk[item_segment]
        row_end = np.minimum(row_begin + rows_per_chunk[item_segment], seg_m[item_segment])
        state = seg[item_segment]
        if reduce_rows is None:
            sums = mass = np.zeros_like(chunk)
        elif self.atomic:
            sums, mass = state * self.k_max * self.d_max, state * self.k_max
        else:  # each segment's slots after the previous segments' (all buckets of this pass)
            sums_size, mass_size = seg_k * bucket.d, seg_k
            first_sums = first[0] + np.cumsum(chunks * sums_size) - chunks * sums_size
            first_mass = first[1] + np.cumsum(chunks * mass_size) - chunks * mass_size
            sums = first_sums[item_segment] + chunk * sums_size[item_segment]
            mass = first_mass[item_segment] + chunk * mass_size[item_segment]
            reduce_rows[seg] = np.stack([chunks, seg_k, np.full_like(seg_k, bucket.d),
                                         first_sums, first_mass], axis=1)
            first[0] += int((chunks * sums_size).sum())
            first[1] += int((chunks * mass_size).sum())
        return np.stack([item_segment, row_begin, row_end, sums, mass], axis=1).astype(np.int64)

    @staticmethod
    def _key(tensors: list[Tensor]) -> tuple:
        return tuple(t.data_ptr() for t in tensors)

    def _addresses(self, tensors: list[Tensor]) -> Tensor:
        """Each problem's address in `tensors` (one per problem, shaped as its weights,
        contiguous), a device table (problems,) int64 that the kernels read with the segments'
        first elements (_rows_of): the weights' from the cached tables; for tensors a pass is
        handed (G~, dW) or makes (W~), written by `_store_addresses_kernel` from launch arguments,
        16 per launch, and kept for the next pass of this call that sees the same list. Nothing is
        copied from the host, so a CUDA graph captures these launches, with the addresses its
        replays will use."""
        for p, t in enumerate(tensors):
            if not t.is_contiguous() or t.shape != self._problems[p].shape:
                raise ValueError(f"tensor {p} of shape {tuple(t.shape)} must be contiguous and "
                                 f"shaped as weights[{p}] {tuple(self._problems[p].shape)}")
        key = self._key(tensors)
        table = self._address_cache.get(key)
        if table is None:
            per_launch = ADDRESSES_PER_LAUNCH
            table = torch.empty(-(-len(key) // per_launch) * per_launch, dtype=torch.int64,
                                device=self.device)
            with self._device():
                for first in range(0, len(key), per_launch):
                    addresses = key[first:first + per_launch]
                    # the last launch's spare arguments repeat an address: one signature
                    addresses += addresses[-1:] * (per_launch - len(addresses))
                    _launch(_store_addresses_kernel, 1, table[first:], *addresses)
            self._address_cache[key] = table
        return table

    def _device(self):
        """Launch on the tensors' GPU, not on whichever is current."""
        return (torch.cuda.device(self.device) if self.device.type == "cuda"
                else contextlib.nullcontext())

    def _reduced(self, kind: str, run) -> tuple[Tensor, Tensor]:
        """Packed (S, k_max, d_max) sums and (S, k_max) masses of a reducing pass: `run(bucket,
        sums, mass, slot_stride)` launches each bucket into the slots, then
        (deterministic) one launch sums each segment's slots in chunk order."""
        segments = self.layout.segments
        packed = segments * self.k_max * self.d_max
        if self.atomic:  # the items add into the packed result itself
            flat = torch.zeros(packed + segments * self.k_max, dtype=torch.float32,
                               device=self.device)
            sums, mass = flat[:packed], flat[packed:]
            slot_sums, slot_mass = sums, mass
        else:
            sums_size, mass_size = self._slot_sizes[kind]
            slots = torch.zeros(sums_size + mass_size, dtype=torch.float32, device=self.device)
            slot_sums, slot_mass = slots[:sums_size], slots[sums_size:]
            sums = torch.empty(packed, dtype=torch.float32, device=self.device)
            mass = torch.empty(segments * self.k_max, dtype=torch.float32, device=self.device)
        with self._device():
            for bucket in self.buckets:
                run(bucket, slot_sums, slot_mass, self.d_max if self.atomic else bucket.d)
            if not self.atomic:
                block = min(REDUCE_BLOCK, triton.next_power_of_2(self.k_max * self.d_max))
                _launch(_reduce_slots_kernel,
                        (segments, triton.cdiv(self.k_max * self.d_max, block)),
                        slot_sums, slot_mass, self._reduce_tables[kind], sums, mass,
                        self.k_max, self.d_max, BLOCK=block)
        return (sums.view(segments, self.k_max, self.d_max),
                mass.view(segments, self.k_max))

    def attention_sums(self, values, centroids, active):
        weights, values = self._addresses(self._problems), self._addresses(values)
        active = active.to(torch.int32)

        def run(bucket, sums, mass, stride):
            blocks = bucket.blocks
            _launch(_attention_sums_kernel, len(bucket.items["forward"]),
                    bucket.items["forward"], bucket.table, bucket.scales, weights, values,
                    bucket.like, centroids, active, sums,
                    mass, self.k_max, self.d_max, stride,
                    D=bucket.d, BLOCK_D=blocks.block_d, BLOCK_M=blocks.block_m,
                    BLOCK_K=blocks.block_k, SINGLE_BLOCK=blocks.single_block, ATOMIC=self.atomic,
                    num_warps=blocks.num_warps)
        return self._reduced("forward", run)

    def output(self, attention_centroids, final_centroids):
        out = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in self._problems]
        weights, outs = self._addresses(self._problems), self._addresses(out)
        with self._device():
            for bucket in self.buckets:
                blocks = bucket.output_blocks
                _launch(_output_kernel, len(bucket.items["output"]),
                        bucket.items["output"], bucket.table, bucket.scales, weights, outs,
                        bucket.like, attention_centroids,
                        final_centroids, self.k_max, self.d_max,
                        D=bucket.d, BLOCK_D=blocks.block_d, BLOCK_M=blocks.block_m,
                        BLOCK_K=blocks.block_k, num_warps=blocks.num_warps)
        return out

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        weights, grad_w = self._addresses(self._problems), self._addresses(grad_weights)
        grad_outs = weights if grad_out is None else self._addresses(grad_out)
        grad_over_mass, grad_dot_next = grad_over_mass.contiguous(), grad_dot_next.contiguous()
        active = active.to(torch.int32)

        def run(bucket, ds_w, ds, stride):
            blocks = bucket.backward_blocks
            _launch(_backward_kernel, len(bucket.items["backward"]),
                    bucket.items["backward"], bucket.table, bucket.scales, weights,
                    grad_outs, grad_w, bucket.like,
                    centroids, grad_over_mass, grad_dot_next, final_centroids, active, ds_w, ds,
                    self.k_max, self.d_max, stride,
                    D=bucket.d, BLOCK_D=blocks.block_d, BLOCK_M=blocks.block_m,
                    BLOCK_K=blocks.block_k, SINGLE_BLOCK=blocks.single_block, ATOMIC=self.atomic,
                    HAS_GRAD_OUT=grad_out is not None, num_warps=blocks.num_warps)
        ds_w, ds = self._reduced("backward", run)
        # The kernels sum dS w and dS separately (one matrix product each): the difference form
        # of recurrence.Passes.gradient is taken here, on k x d values.
        return ds_w - centroids * ds.unsqueeze(-1)


class Passes(RaggedPasses):
    """recurrence.Passes of one problem (G, M, d): the case of one problem, its groups the
    segments."""

    def __init__(self, weights: Tensor, k: int, tau: float, deterministic: bool):
        from ..many import Layout  # many imports the backends: imported when first used

        super().__init__([weights], Layout.of([weights], [k]), [tau], deterministic)
        self.weights = weights
        self.k, self.tau = k, tau

    def attention_sums(self, values, centroids, active):
        return super().attention_sums([values], centroids, active)

    def output(self, attention_centroids, final_centroids):
        return super().output(attention_centroids, final_centroids)[0]

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights, mass):
        return super().gradient(None if grad_out is None else [grad_out], centroids,
                                grad_over_mass, grad_dot_next, final_centroids, active,
                                [grad_weights], mass)
