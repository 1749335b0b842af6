"""Snapping: a DKM layer's weight hard-assigned to its palette, rounded to the palette dtype.

`snap_layer` produces the `SnappedLayer` record that `DKMCompressor.snap_weights()` keeps and the
export writes; `decode_weight` turns a palette, indices and scales back into the weight, the one
function both the snapped model and a loaded export use (so they agree bit for bit).
Imports kmeans.py and layer.py only for types and assignment; never compress.py.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .kmeans import nearest_centroids
from .layer import DKMLayer, rows_to_weight

# What to suggest when a palette dtype is too narrow for a layer's values.
WIDER_LUT_HINT = "compress with lut_dtype=torch.bfloat16 or lut_dtype=torch.float32"


def decode_weight(codebook: Tensor, indices: Tensor, scale: Tensor | None, shape,
                  dtype: torch.dtype, vector_axis: str = "flat") -> Tensor:
    """The clustered weight: codebook (G, k, d), indices (G, M) -> tensor of `shape`, `dtype`
    (vectors laid out along `vector_axis`, see dkm_kernels.layer)."""
    table = codebook.float()
    groups, _, dim = table.shape
    values = torch.gather(table, 1, indices.reshape(groups, -1, 1).expand(-1, -1, dim))
    values = rows_to_weight(values, shape, vector_axis)
    if scale is not None:
        values = values * scale.float().reshape((-1,) + (1,) * (len(shape) - 1))
    return values.to(dtype)


@dataclasses.dataclass
class SnappedLayer:
    """One clustered weight as the export stores it."""

    shape: tuple
    dtype: torch.dtype
    bits: int
    dim: int
    group_size: int | None
    codebook: Tensor  # (G, k, d), lut dtype
    indices: Tensor  # (G, M) int64
    scale: Tensor | None  # (out_channels,), lut dtype
    vector_axis: str = "flat"  # how the indices' vectors lie in the weight

    def decode(self) -> Tensor:
        return decode_weight(self.codebook, self.indices, self.scale, self.shape, self.dtype,
                             self.vector_axis)


def _check_finite(tensor: Tensor, where: str, what: str, consequence: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        value = tensor[bad].reshape(-1)[0].item()
        raise ValueError(f"{where}: {what} are not finite ({int(bad.sum())} of "
                         f"{tensor.numel()}, the first is {value}); {consequence}. Fix the "
                         f"training (a lower learning rate, gradient clipping) or reload a "
                         f"checkpoint before snapping")


def _check_representable(values: Tensor, lut_dtype: torch.dtype, where: str, what: str) -> None:
    """ValueError when some of `values` (finite) lie beyond what lut_dtype holds (they would be
    stored as inf)."""
    limit = torch.finfo(lut_dtype).max
    largest = float(values.detach().abs().max()) if values.numel() else 0.0
    if largest > limit:
        raise ValueError(f"{where}: {what} reach {largest:.6g}, beyond the largest {lut_dtype} "
                         f"({limit:.6g}), so the export would store them as inf; "
                         f"{WIDER_LUT_HINT}")


@torch.no_grad()
def check_snappable(layer: DKMLayer, weight: Tensor, name: str | None = None) -> None:
    """ValueError, naming the layer, unless snapping `weight` gives a faithful export: the weight
    and the palette finite, and the weights (or per-channel scales) and palette within the range
    of the layer's lut dtype (beyond it they would be stored as inf)."""
    where = "a clustered layer" if name is None else f"layer {name!r}"
    _check_finite(weight, where, "weights", "snapping would map them to palette entry 0")
    # Without scales the palette holds the weights' own values; with them, each channel's scale
    # is its largest |weight|. Either way the largest |weight| must fit in the palette dtype.
    _check_representable(weight, layer.lut_dtype, where,
                         "per-channel scales (the largest |weight| of a channel)"
                         if layer.enable_per_channel_scale else "weights")
    if layer.is_initialized:
        _check_finite(layer.centroids, where, "palette entries",
                      "the export would store them as they are")
        _check_representable(layer.centroids, layer.lut_dtype, where, "palette entries")


@torch.no_grad()
def snap_layer(layer: DKMLayer, weight: Tensor, config, name: str | None = None) -> SnappedLayer:
    """Hard-assign `weight` to the layer's palette rounded to its lut dtype.

    Raises ValueError naming the layer (`name`) when check_snappable fails.
    """
    check_snappable(layer, weight, name)
    if not layer.is_initialized:
        # Centroids drawn from a checked weight are finite and within its range.
        layer.initialize(weight)
    codebook = layer.centroids.reshape(layer.groups, layer.n_clusters, layer.dim)
    codebook = codebook.to(layer.lut_dtype)
    normalized, scale = layer.normalized(weight)
    indices = nearest_centroids(layer.rows(normalized), codebook.float())
    return SnappedLayer(
        shape=tuple(weight.shape), dtype=weight.dtype, bits=config.bits, dim=config.dim,
        group_size=config.group_size, codebook=codebook.cpu(), indices=indices.cpu(),
        scale=None if scale is None else scale.reshape(-1).to(layer.lut_dtype).cpu(),
        vector_axis=layer.vector_axis)
