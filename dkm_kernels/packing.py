"""Bit packing of palette indices: `bits` bits per index, least significant bit first.

The lowest layer of the export code (packing <- snapping <- info <- export): it knows nothing of
layers or models, only of integers and bytes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Indices are packed in at most 16 bits: 65536 palette entries, the most a layer can ask for.
MAX_BITS = 16
BITS_PER_BYTE = 8
# Indices (un)packed per pass, so that a large layer needs no bits * n_vectors int64 tensor; a
# multiple of 8, so that each pass starts on a byte boundary.
_PACK_CHUNK = 1 << 20


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that `count` indices of `bits` bits take once packed."""
    return math.ceil(count * bits / BITS_PER_BYTE)


def check_bits(bits) -> None:
    """ValueError unless bits is an integer from 1 to MAX_BITS."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")


def pack_indices(indices: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers < 2**bits into ceil(n * bits / 8) bytes, LSB first."""
    check_bits(bits)
    flat = indices.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"indices must lie in [0, {2 ** bits}) to be packed in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    bit_stream = torch.empty(flat.numel() * bits, dtype=torch.uint8)
    for start in range(0, flat.numel(), _PACK_CHUNK):
        block = flat[start:start + _PACK_CHUNK]
        bit_stream[start * bits:(start + block.numel()) * bits] = (
            ((block.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8))
    padded = torch.zeros(packed_bytes(flat.numel(), bits) * BITS_PER_BYTE, dtype=torch.uint8)
    padded[:bit_stream.numel()] = bit_stream
    weights = 2 ** torch.arange(BITS_PER_BYTE, dtype=torch.int32)
    return (padded.reshape(-1, BITS_PER_BYTE).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_indices: the first `count` indices, int64."""
    check_bits(bits)
    if packed.numel() != packed_bytes(count, bits):
        raise ValueError(f"{count} indices of {bits} bits need {packed_bytes(count, bits)} "
                         f"bytes, got {packed.numel()}")
    packed = packed.reshape(-1).cpu()
    byte_shifts = torch.arange(BITS_PER_BYTE, dtype=torch.int32)
    place_values = torch.arange(bits, dtype=torch.int64)
    out = torch.empty(count, dtype=torch.int64)
    for start in range(0, count, _PACK_CHUNK):
        n = min(_PACK_CHUNK, count - start)
        first = start * bits // BITS_PER_BYTE
        block = packed[first:first + packed_bytes(n, bits)].to(torch.int32)
        bit_stream = ((block.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[:n * bits]
        out[start:start + n] = (bit_stream.reshape(n, bits).to(torch.int64) << place_values).sum(1)
    return out
