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
from .layer import DKMLayer

def decode_weight(codebook: Tensor, indices: Tensor, scale: Tensor | None, shape,
                  dtype: torch.dtype) -> Tensor:
    """The clustered weight: codebook (G, k, d), indices (G, M) -> tensor of `shape`, `dtype`."""
    table = codebook.float()
    groups, _, dim = table.shape
    values = torch.gather(table, 1, indices.reshape(groups, -1, 1).expand(-1, -1, dim))
    values = values.reshape(shape)
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

    def decode(self) -> Tensor:
        return decode_weight(self.codebook, self.indices, self.scale, self.shape, self.dtype)


@torch.no_grad()
def snap_layer(layer: DKMLayer, weight: Tensor, config, name: str | None = None) -> SnappedLayer:
    """Hard-assign `weight` to the layer's palette rounded to its lut dtype (`name`: the layer's
    name, for error messages)."""
    if not bool(layer.initialized):
        layer.initialize(weight)
    codebook = layer.centroids.reshape(layer.groups, layer.n_clusters, layer.dim)
    codebook = codebook.to(layer.lut_dtype)
    normalized, scale = layer.normalized(weight)
    indices = nearest_centroids(layer.rows(normalized), codebook.float())
    return SnappedLayer(
        shape=tuple(weight.shape), dtype=weight.dtype, bits=config.bits, dim=config.dim,
        group_size=config.group_size, codebook=codebook.cpu(), indices=indices.cpu(),
        scale=None if scale is None else scale.reshape(-1).to(layer.lut_dtype).cpu())
