"""Backend `triton`: fused DKM kernels that never hold more than a tile of the M x k attention.

Kernels (each reads W once per pass; docs/design.md §2, §3):

- `_attention_sums_kernel`: one DKM iteration. For the rows of a tile: scores to every centroid,
  softmax, and the tile's share of `sum_i A_ij v_i` (v = W, or G~ for the backward's G_L pass) and
  of `s_j = sum_i A_ij`. Programs own a chunk of row tiles and reduce their chunk into one slot of a
  (slots, k, d) buffer: by plain stores into a slot of their own (deterministic; the slots are then
  summed in a fixed order by torch.sum) or by atomic adds into a single slot (faster, not
  bit-reproducible).
- `_output_kernel`: W~ = A_{L-1} C_L, one sweep over the centroids with a running max
  (online softmax), one program per row tile.
- `_backward_kernel`: one backward pass t (docs/design.md §3): recomputes A_t, dA, dS for a tile, adds the
  tile's rows of dW and reduces sum_i dS_ij w_i and sum_i dS_ij into slots, as above.

When k fits in one block of centroids (k <= MAX_SINGLE_BLOCK_K) the softmax of a tile is computed in
registers and the chunk's k x d sums stay in registers. Otherwise each tile takes two sweeps over the
centroid blocks: the first finds the row's log-sum-exp (and, in backward, sum_l A_il dA_il) with a
running max, the second computes the exact attention block by block and adds each block into the
slot (read-modify-write of a slot only this program touches, behind a barrier).

Distances are sums of squared differences in fp32 (nothing cancels, no TF32); the matrix products
of attention tiles use tl.dot with input_precision="ieee" (full fp32). Exponentials are exp2 of
(nearest distance - distance) * log2(e) / tau, exactly 0 for a row's nearest centroid whatever
the compiler fuses (docs/design.md §8).

The recurrence that runs these passes (recurrence.py: the iterations, the epsilon test, the k x d
centroid updates, the backward's order) is shared with every backend. A group that has stopped is
skipped by the kernels.

Memory: nothing is saved for backward beyond the op's outputs (history, masses, iterations) and W.
Transient: the slots, k x (d + 1) floats per program, whose count the deterministic mode bounds by
WORKSPACE_BYTES (so a very large k runs on fewer programs there), one slot in the atomic mode; and
for float16/bfloat16 weights an fp32 dW buffer of W's shape, cast at the end.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
import triton.language as tl


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
# CUDA's limit on the second grid dimension, which indexes the groups.
MAX_GROUPS = 65535
# Transient bytes the per-program slots of the deterministic reduction may take.
WORKSPACE_BYTES = 64 * 2**20
# Programs per streaming multiprocessor to aim for; on CPU (interpreter) a fixed small count.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3

_LOG2E = 1.4426950408889634


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
def _squared_distances(w_ptr, c_ptr, rows, row_mask, cols, col_mask,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """||w_i - c_j||^2 for a tile, +inf for columns past k.

    w_ptr: (M, D) one group's rows; c_ptr: (k, D) one group's centroids (fp32).
    """
    squared = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for dim in tl.static_range(D):
        w_col = tl.load(w_ptr + rows * D + dim, mask=row_mask, other=0.0).to(tl.float32)
        c_col = tl.load(c_ptr + cols * D + dim, mask=col_mask, other=0.0)
        diff = w_col[:, None] - c_col[None, :]
        squared += diff * diff
    return tl.where(col_mask[None, :], squared, float("inf"))


@triton.jit
def _grad_attention(w_ptr, grad_out_ptr, grad_over_mass_ptr, grad_dot_next_ptr, final_ptr,
                    rows, row_mask, cols, col_mask,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_GRAD_OUT: tl.constexpr):
    """dA_ij = (G_{t+1,j} / s_j) . w_i - (G_{t+1,j} / s_j) . C_{t+1,j}
    (+ G~_i . C_{L,j} in the first backward pass, HAS_GRAD_OUT).

    w_ptr, grad_out_ptr: (M, D) one group's rows; grad_over_mass_ptr, final_ptr: (k, D) fp32, one
    group's G_{t+1}/s_t (zero where the centroid has no mass) and C_L; grad_dot_next_ptr: (k,)
    fp32, (G_{t+1,j} / s_j) . C_{t+1,j}.
    """
    dot_next = tl.load(grad_dot_next_ptr + cols, mask=col_mask, other=0.0)
    grad = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32) - dot_next[None, :]
    for dim in tl.static_range(D):
        w_col = tl.load(w_ptr + rows * D + dim, mask=row_mask, other=0.0).to(tl.float32)
        g_col = tl.load(grad_over_mass_ptr + cols * D + dim, mask=col_mask, other=0.0)
        grad += g_col[None, :] * w_col[:, None]
    if HAS_GRAD_OUT:
        for dim in tl.static_range(D):
            go_col = tl.load(grad_out_ptr + rows * D + dim, mask=row_mask, other=0.0).to(tl.float32)
            f_col = tl.load(final_ptr + cols * D + dim, mask=col_mask, other=0.0)
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
def _chunk_rows(chunk, rows_per_chunk, m):
    """The rows [row_begin, row_end) of a group that program `chunk` of a reducing pass takes."""
    row_begin = chunk * rows_per_chunk
    return row_begin, tl.minimum(row_begin + rows_per_chunk, m)


@triton.jit
def _slot_ptr(ptr, group, chunk, slots, k, D: tl.constexpr, ATOMIC: tl.constexpr):
    """This program's slot of a (G, SLOTS, k, D) buffer (D = 1: (G, SLOTS, k)): slot 0, shared by
    all programs, when ATOMIC; else the chunk's own."""
    slot = 0 if ATOMIC else chunk
    return ptr + (group * slots + slot) * k * D


@triton.jit
def _row_block(row_start, row_end, BLOCK_M: tl.constexpr):
    """Rows row_start.. as a block of BLOCK_M (int64 offsets) and which of them are before row_end."""
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows < row_end


@triton.jit
def _col_block_distances(w_ptr, c_ptr, rows, row_mask, col_start, k,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One block of a sweep over the centroids: centroids col_start.. (BLOCK_K, masked at k) and
    their squared distances to the rows (inf on masked centroids)."""
    cols = col_start + tl.arange(0, BLOCK_K)
    col_mask = cols < k
    squared = _squared_distances(w_ptr, c_ptr, rows, row_mask, cols, col_mask, D, BLOCK_M, BLOCK_K)
    return cols, col_mask, squared


@triton.jit
def _add_to_rows(ptr, rows, row_mask, dims, values, D: tl.constexpr):
    """ptr[rows] += values for a (BLOCK_M, BLOCK_D) tile of a (M, D) fp32 matrix."""
    ptrs = ptr + rows[:, None] * D + dims[None, :]
    mask = row_mask[:, None] & (dims < D)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)


@triton.jit
def _load_block(ptr, first, count, dims, D: tl.constexpr):
    """Rows first.. of a (count, D) matrix as a (block, BLOCK_D) fp32 tile, zero-padded."""
    mask = (first < count)[:, None] & (dims < D)[None, :]
    return tl.load(ptr + first[:, None] * D + dims[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _add_to_slot(sums_ptr, mass_ptr, cols, col_mask, dims, block_sums, block_mass,
                 D: tl.constexpr, ATOMIC: tl.constexpr):
    """Add a block's (BLOCK_K, BLOCK_D) sums and (BLOCK_K,) masses into a slot.

    sums_ptr: (k, D) fp32 and mass_ptr: (k,) fp32, the slot. ATOMIC: the slot is shared by all
    programs; otherwise it is this program's own and a barrier orders its earlier stores before
    this read.
    """
    sums_mask = col_mask[:, None] & (dims < D)[None, :]
    sums_ptrs = sums_ptr + cols[:, None] * D + dims[None, :]
    if ATOMIC:
        tl.atomic_add(sums_ptrs, block_sums, mask=sums_mask)
        tl.atomic_add(mass_ptr + cols, block_mass, mask=col_mask)
    else:
        tl.debug_barrier()
        tl.store(sums_ptrs, tl.load(sums_ptrs, mask=sums_mask, other=0.0) + block_sums, mask=sums_mask)
        mass_ptrs = mass_ptr + cols
        tl.store(mass_ptrs, tl.load(mass_ptrs, mask=col_mask, other=0.0) + block_mass, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attention_sums_kernel(
    weights_ptr,    # (G, M, D) weights' dtype: the rows whose attention is computed
    values_ptr,     # (G, M, D) any float dtype: v_i, summed with weights A_ij
    centroids_ptr,  # (G, k, D) fp32: the centroids the attention is computed against
    active_ptr,     # (G,) int32: 0 for a group that has stopped (the program does nothing)
    sums_ptr,       # (G, SLOTS, k, D) fp32, zeroed: sum_i A_ij v_i per slot
    mass_ptr,       # (G, SLOTS, k) fp32, zeroed: sum_i A_ij per slot
    m, k, slots, rows_per_chunk, log2e_over_tau,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, ATOMIC: tl.constexpr,
):
    chunk = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    if tl.load(active_ptr + group) != 0:
        w_ptr = weights_ptr + group * m * D
        v_ptr = values_ptr + group * m * D
        c_ptr = centroids_ptr + group * k * D
        slot_sums_ptr = _slot_ptr(sums_ptr, group, chunk, slots, k, D, ATOMIC)
        slot_mass_ptr = _slot_ptr(mass_ptr, group, chunk, slots, k, 1, ATOMIC)
        dims = tl.arange(0, BLOCK_D)
        row_begin, row_end = _chunk_rows(chunk, rows_per_chunk, m)

        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK_K)
            col_mask = cols < k
            chunk_sums = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            chunk_mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                squared = _squared_distances(w_ptr, c_ptr, rows, row_mask, cols, col_mask,
                                             D, BLOCK_M, BLOCK_K)
                attention = _softmax_rows(squared, row_mask, log2e_over_tau)
                values = _load_block(v_ptr, rows, row_end, dims, D)
                chunk_sums += tl.dot(tl.trans(attention), values, input_precision="ieee")
                chunk_mass += tl.sum(attention, axis=0)
            _add_to_slot(slot_sums_ptr, slot_mass_ptr, cols, col_mask, dims, chunk_sums,
                         chunk_mass, D, ATOMIC)
        else:
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                # Sweep 1: the row's log2-sum-exp2 over all centroids, with a running max.
                row_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
                row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(w_ptr, c_ptr, rows, row_mask,
                                                                   col_start, k, D, BLOCK_M, BLOCK_K)
                    row_min, row_sum, rescale, p = _online_min(row_min, row_sum, squared, log2e_over_tau)
                log2_sum = tl.log2(row_sum)
                values = _load_block(v_ptr, rows, row_end, dims, D)
                # Sweep 2: exact attention, block by block, into the slot.
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(w_ptr, c_ptr, rows, row_mask,
                                                                   col_start, k, D, BLOCK_M, BLOCK_K)
                    attention = _normalised(squared, row_mask, row_min, log2_sum, log2e_over_tau)
                    block_sums = tl.dot(tl.trans(attention), values, input_precision="ieee")
                    _add_to_slot(slot_sums_ptr, slot_mass_ptr, cols, col_mask, dims, block_sums,
                                 tl.sum(attention, axis=0), D, ATOMIC)


@triton.jit
def _output_kernel(
    weights_ptr,    # (G, M, D) weights' dtype
    attend_ptr,     # (G, k, D) fp32: C_{L-1}, the centroids of the last attention
    final_ptr,      # (G, k, D) fp32: C_L
    out_ptr,        # (G, M, D) weights' dtype: W~ = A_{L-1} C_L
    m, k, log2e_over_tau,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    w_ptr = weights_ptr + group * m * D
    c_ptr = attend_ptr + group * k * D
    f_ptr = final_ptr + group * k * D
    dims = tl.arange(0, BLOCK_D)
    rows, row_mask = _row_block(tile * BLOCK_M, m, BLOCK_M)
    row_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(0, k, BLOCK_K):
        cols, col_mask, squared = _col_block_distances(w_ptr, c_ptr, rows, row_mask, col_start, k,
                                                       D, BLOCK_M, BLOCK_K)
        row_min, row_sum, rescale, p = _online_min(row_min, row_sum, squared, log2e_over_tau)
        final = _load_block(f_ptr, cols, k, dims, D)
        acc = acc * rescale[:, None] + tl.dot(p, final, input_precision="ieee")
    out = acc / row_sum[:, None]
    out_mask = row_mask[:, None] & (dims < D)[None, :]
    tl.store(out_ptr + group * m * D + rows[:, None] * D + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _backward_kernel(
    weights_ptr,         # (G, M, D) weights' dtype
    grad_out_ptr,        # (G, M, D) grad_out's dtype: G~
    centroids_ptr,       # (G, k, D) fp32: C_t
    grad_over_mass_ptr,  # (G, k, D) fp32: G_{t+1,j} / s_{t,j}, zero without mass
    grad_dot_next_ptr,   # (G, k) fp32: (G_{t+1,j} / s_{t,j}) . C_{t+1,j}
    final_ptr,           # (G, k, D) fp32: C_L
    active_ptr,          # (G,) int32: 1 where the group takes part in this pass
    grad_w_ptr,          # (G, M, D) fp32: dW, this pass's rows added in place
    ds_w_ptr,            # (G, SLOTS, k, D) fp32, zeroed: sum_i dS_ij w_i per slot
    ds_ptr,              # (G, SLOTS, k) fp32, zeroed: sum_i dS_ij per slot
    m, k, slots, rows_per_chunk, log2e_over_tau, two_over_tau,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, ATOMIC: tl.constexpr, HAS_GRAD_OUT: tl.constexpr,
):
    chunk = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    if tl.load(active_ptr + group) != 0:
        w_ptr = weights_ptr + group * m * D
        go_ptr = grad_out_ptr + group * m * D
        gw_ptr = grad_w_ptr + group * m * D
        c_ptr = centroids_ptr + group * k * D
        n_ptr = grad_dot_next_ptr + group * k
        g_ptr = grad_over_mass_ptr + group * k * D
        f_ptr = final_ptr + group * k * D
        slot_ds_w_ptr = _slot_ptr(ds_w_ptr, group, chunk, slots, k, D, ATOMIC)
        slot_ds_ptr = _slot_ptr(ds_ptr, group, chunk, slots, k, 1, ATOMIC)
        dims = tl.arange(0, BLOCK_D)
        row_begin, row_end = _chunk_rows(chunk, rows_per_chunk, m)

        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK_K)
            col_mask = cols < k
            grad_over_mass = _load_block(g_ptr, cols, k, dims, D)
            centroids = _load_block(c_ptr, cols, k, dims, D)
            chunk_ds_w = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            chunk_ds = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                squared = _squared_distances(w_ptr, c_ptr, rows, row_mask, cols, col_mask,
                                             D, BLOCK_M, BLOCK_K)
                attention = _softmax_rows(squared, row_mask, log2e_over_tau)
                grad_a = _grad_attention(w_ptr, go_ptr, g_ptr, n_ptr, f_ptr, rows, row_mask, cols,
                                         col_mask, D, BLOCK_M, BLOCK_K, HAS_GRAD_OUT)
                weighted = tl.sum(attention * grad_a, axis=1)
                grad_s = attention * (grad_a - weighted[:, None])
                w = _load_block(w_ptr, rows, row_end, dims, D)
                # dW_i = sum_j A_ij G_j/s_j + (2/tau) sum_j dS_ij (c_j - w_i)
                grad_w = tl.dot(attention, grad_over_mass, input_precision="ieee")
                grad_w += two_over_tau * (tl.dot(grad_s, centroids, input_precision="ieee")
                                          - w * tl.sum(grad_s, axis=1)[:, None])
                _add_to_rows(gw_ptr, rows, row_mask, dims, grad_w, D)
                chunk_ds_w += tl.dot(tl.trans(grad_s), w, input_precision="ieee")
                chunk_ds += tl.sum(grad_s, axis=0)
            _add_to_slot(slot_ds_w_ptr, slot_ds_ptr, cols, col_mask, dims, chunk_ds_w, chunk_ds,
                         D, ATOMIC)
        else:
            for row_start in range(row_begin, row_end, BLOCK_M):
                rows, row_mask = _row_block(row_start, row_end, BLOCK_M)
                # Sweep 1: log-sum-exp and sum_l A_il dA_il over all centroids, running max.
                row_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
                row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                row_weighted = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(w_ptr, c_ptr, rows, row_mask,
                                                                   col_start, k, D, BLOCK_M, BLOCK_K)
                    grad_a = _grad_attention(w_ptr, go_ptr, g_ptr, n_ptr, f_ptr, rows, row_mask,
                                             cols, col_mask, D, BLOCK_M, BLOCK_K, HAS_GRAD_OUT)
                    row_min, row_sum, rescale, p = _online_min(row_min, row_sum, squared, log2e_over_tau)
                    row_weighted = row_weighted * rescale + tl.sum(p * grad_a, axis=1)
                log2_sum = tl.log2(row_sum)
                weighted = row_weighted / row_sum
                w = _load_block(w_ptr, rows, row_end, dims, D)
                grad_w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                grad_s_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
                # Sweep 2: exact A and dS block by block; dW in registers, column sums to the slot.
                for col_start in range(0, k, BLOCK_K):
                    cols, col_mask, squared = _col_block_distances(w_ptr, c_ptr, rows, row_mask,
                                                                   col_start, k, D, BLOCK_M, BLOCK_K)
                    attention = _normalised(squared, row_mask, row_min, log2_sum, log2e_over_tau)
                    grad_a = _grad_attention(w_ptr, go_ptr, g_ptr, n_ptr, f_ptr, rows, row_mask,
                                             cols, col_mask, D, BLOCK_M, BLOCK_K, HAS_GRAD_OUT)
                    grad_s = attention * (grad_a - weighted[:, None])
                    grad_over_mass = _load_block(g_ptr, cols, k, dims, D)
                    centroids = _load_block(c_ptr, cols, k, dims, D)
                    grad_w += tl.dot(attention, grad_over_mass, input_precision="ieee")
                    grad_w += two_over_tau * tl.dot(grad_s, centroids, input_precision="ieee")
                    grad_s_rows += tl.sum(grad_s, axis=1)
                    _add_to_slot(slot_ds_w_ptr, slot_ds_ptr, cols, col_mask, dims,
                                 tl.dot(tl.trans(grad_s), w, input_precision="ieee"),
                                 tl.sum(grad_s, axis=0), D, ATOMIC)
                grad_w -= two_over_tau * w * grad_s_rows[:, None]
                _add_to_rows(gw_ptr, rows, row_mask, dims, grad_w, D)


# ----------------------------------------------------------------------------------------------
# Launch plans and host side
# ----------------------------------------------------------------------------------------------

_SM_COUNTS: dict[int, int] = {}


def _program_target(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return PROGRAMS_PER_SM * _SM_COUNTS[index]


class _Plan:
    """Block sizes and the chunking of rows into programs for one problem shape."""

    def __init__(self, groups: int, m: int, k: int, d: int, deterministic: bool,
                 device: torch.device, tile: int = SINGLE_BLOCK_TILE):
        if groups > MAX_GROUPS:
            raise ValueError(f"backend='triton' takes at most {MAX_GROUPS} groups per call, got "
                             f"{groups}; split the groups over several calls")
        self.single_block = k <= MAX_SINGLE_BLOCK_K
        if self.single_block:
            self.block_k = max(16, triton.next_power_of_2(k))
            self.block_m = min(128, max(16, tile // self.block_k))
        else:
            self.block_k = MULTI_BLOCK_K
            self.block_m = MULTI_BLOCK_M
        self.block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs 16 or more
        # Chosen so that ptxas (sm_90, d = 8) reports no register spills for these tiles.
        self.num_warps = 8 if self.block_m * self.block_k >= 2048 else 4
        self.row_tiles = triton.cdiv(m, self.block_m)
        chunks = min(self.row_tiles, max(1, triton.cdiv(_program_target(device), max(1, groups))))
        self.atomic = not deterministic
        if not self.atomic:  # one slot of k x (d + 1) floats per program
            chunks = min(chunks, max(1, WORKSPACE_BYTES // (max(1, groups) * k * (d + 1) * 4)))
        # No rows (a rank of a process group may hold none): no programs, zero sums.
        tiles_per_chunk = triton.cdiv(self.row_tiles, chunks) if chunks else 1
        self.chunks = triton.cdiv(self.row_tiles, tiles_per_chunk)
        self.rows_per_chunk = tiles_per_chunk * self.block_m
        self.slots = 1 if self.atomic else self.chunks
        # The output kernel sweeps the centroids with a running max anyway: a product A @ C over
        # at most MULTI_BLOCK_K centroids at a time keeps it from spilling registers.
        if self.block_k > MULTI_BLOCK_K:
            self.output_block_k, self.output_block_m = MULTI_BLOCK_K, MULTI_BLOCK_M
        else:
            self.output_block_k, self.output_block_m = self.block_k, self.block_m
        self.output_warps = 8 if self.output_block_m * self.output_block_k >= 2048 else 4


def _device_context(device: torch.device):
    """Launch on the tensors' GPU, not on whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Passes:
    """recurrence.Passes as Triton launches; groups whose `active` entry is False are skipped."""

    # The programs read `active` on the device: the recurrence runs every iteration with no host
    # sync in between (recurrence.forward).
    stops_on_device = True

    def __init__(self, weights: Tensor, k: int, tau: float, deterministic: bool):
        reason = unavailable_reason(weights.device, weights.dtype)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        self.weights = weights
        self.groups, self.m, self.d = weights.shape
        self.k = k
        self.tau = tau
        self.log2e_over_tau = _LOG2E / tau
        self.plan = _Plan(self.groups, self.m, k, self.d, deterministic, weights.device)
        self.backward_plan = _Plan(self.groups, self.m, k, self.d, deterministic, weights.device,
                                   tile=BACKWARD_SINGLE_BLOCK_TILE)

    def _slots(self, plan: _Plan) -> tuple[Tensor, Tensor]:
        """Zeroed (G, slots, k, d) sums and (G, slots, k) totals for a reducing kernel."""
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=self.weights.device)
        return zeros((self.groups, plan.slots, self.k, self.d)), zeros((self.groups, plan.slots, self.k))

    def _launch(self, kernel, programs: int, *args, **meta) -> None:
        """kernel over (programs, G) on the weights' GPU; nothing to launch without groups or
        rows."""
        if self.groups and programs:
            with _device_context(self.weights.device):
                kernel[(programs, self.groups)](*args, num_stages=1, **meta)

    def attention_sums(self, values, centroids, active):
        plan = self.plan
        sums, mass = self._slots(plan)
        self._launch(
            _attention_sums_kernel, plan.chunks,
            self.weights, values, centroids, active.to(torch.int32), sums, mass,
            self.m, self.k, plan.slots, plan.rows_per_chunk, self.log2e_over_tau,
            D=self.d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_m, BLOCK_K=plan.block_k,
            SINGLE_BLOCK=plan.single_block, ATOMIC=plan.atomic, num_warps=plan.num_warps,
        )
        return sums.sum(dim=1), mass.sum(dim=1)

    def output(self, attention_centroids, final_centroids):
        plan = self.plan
        out = torch.empty_like(self.weights, memory_format=torch.contiguous_format)
        self._launch(
            _output_kernel, triton.cdiv(self.m, plan.output_block_m),
            self.weights, attention_centroids, final_centroids, out, self.m, self.k,
            self.log2e_over_tau,
            D=self.d, BLOCK_D=plan.block_d, BLOCK_M=plan.output_block_m,
            BLOCK_K=plan.output_block_k, num_warps=plan.output_warps,
        )
        return out

    def gradient(self, grad_out, centroids, grad_over_mass, grad_dot_next, final_centroids,
                 active, grad_weights):
        plan = self.backward_plan
        ds_w, ds = self._slots(plan)
        self._launch(
            _backward_kernel, plan.chunks,
            self.weights, self.weights if grad_out is None else grad_out, centroids,
            grad_over_mass.contiguous(), grad_dot_next.contiguous(), final_centroids,
            active.to(torch.int32), grad_weights, ds_w, ds,
            self.m, self.k, plan.slots, plan.rows_per_chunk, self.log2e_over_tau, 2.0 / self.tau,
            D=self.d, BLOCK_D=plan.block_d, BLOCK_M=plan.block_m, BLOCK_K=plan.block_k,
            SINGLE_BLOCK=plan.single_block, ATOMIC=plan.atomic,
            HAS_GRAD_OUT=grad_out is not None, num_warps=plan.num_warps,
        )
        # The kernels sum dS w and dS separately (one matrix product each): the difference form
        # of recurrence.Passes.gradient is taken here, on k x d values.
        return ds_w.sum(dim=1) - centroids * ds.sum(dim=1).unsqueeze(-1)
