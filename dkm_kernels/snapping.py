"""Snapping: a DKM layer's weight hard-assigned to its palette, rounded to the palette dtype.

`snap_layer` produces the `SnappedLayer` record that `DKMCompressor.snap_weights()` keeps and the
export writes; `decode_weight` turns a palette, indices and scales back into the weight, the one
function both the snapped model and a loaded export use (so they agree bit for bit).
Imports kmeans.py and layer.py only for types and assignment; never compress.py.

Quantized palettes (`lut_quantization="int8"` or `"uint8"`) follow coremltools' LUT quantization
(its post-training palettizers' symmetric mode, per palette):

    scale = max |c| / 127 over the palette's k x d entries, rounded to lut_dtype
            (at least its smallest normal number, so that an all-zero palette has a scale)
    int8:  q = clip(round(c / scale), -127, 127),        entry = scale * q
    uint8: q = clip(round(c / scale) + 127, 0, 254),     entry = scale * (q - 127)

(round: to the nearest integer, ties to even; the quotient is taken in float64). Both give the
same entries. The scale is rounded to lut_dtype before the entries are rounded, so that the
stored scale and integers are the palette exactly: with a 16-bit scale, scale * (q - z) is exact
in float32; with a float32 scale it is one correctly rounded product, the same one Core ML
computes. The weights are then assigned to the nearest quantized entry.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .kmeans import nearest_centroids
from .layer import DKMLayer, rows_to_weight

# What to suggest when a palette dtype is too narrow for a layer's values.
WIDER_LUT_HINT = "compress with lut_dtype=torch.bfloat16 or lut_dtype=torch.float32"
# Quantized palettes (see the module doc): the largest |q - zero point|, the integer dtypes and
# their zero points.
QUANTIZED_MAX = 127
QUANTIZED_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
ZERO_POINTS = {"int8": 0, "uint8": 127}


def quantize_palette(centroids: Tensor, kind: str, lut_dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Palettes (G, k, d) as 8-bit integers: (q (G, k, d) int8 or uint8, scale (G,) lut_dtype,
    zero point (G,) uint8 for "uint8", else None); see the module doc."""
    values = centroids.detach().double()
    largest = values.abs().amax(dim=(1, 2))
    scale = (largest / QUANTIZED_MAX).to(lut_dtype).clamp_min(torch.finfo(lut_dtype).tiny)
    q = torch.round(values / scale.double().reshape(-1, 1, 1))
    q = q.clamp(-QUANTIZED_MAX, QUANTIZED_MAX) + ZERO_POINTS[kind]
    zero_point = None
    if ZERO_POINTS[kind]:
        zero_point = torch.full_like(scale, ZERO_POINTS[kind], dtype=torch.uint8)
    return q.to(QUANTIZED_DTYPES[kind]), scale, zero_point


def dequantize_palette(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """The float32 palettes (G, k, d) that quantize_palette's integers stand for."""
    values = q.float()
    if zero_point is not None:
        values = values - zero_point.float().reshape(-1, 1, 1)  # exact: small integers
    return values * scale.float().reshape(-1, 1, 1)


def decode_weight(codebook: Tensor, indices: Tensor, scale: Tensor | None, shape,
                  dtype: torch.dtype, vector_axis: str = "flat", lut_scale: Tensor | None = None,
                  lut_zero_point: Tensor | None = None) -> Tensor:
    """The clustered weight: codebook (G, k, d), indices (G, M) -> tensor of `shape`, `dtype`
    (vectors laid out along `vector_axis`, see dkm_kernels.layer). A quantized codebook comes
    with its lut_scale (G,) and, for uint8, lut_zero_point (G,)."""
    table = (codebook.float() if lut_scale is None
             else dequantize_palette(codebook, lut_scale, lut_zero_point))
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
    codebook: Tensor  # (G, k, d), lut dtype; int8 / uint8 when quantized
    indices: Tensor  # (G, M) int64
    scale: Tensor | None  # (out_channels,), lut dtype
    vector_axis: str = "flat"  # how the indices' vectors lie in the weight
    lut_quantization: str | None = None  # "int8" / "uint8": codebook = integers of the palette
    lut_scale: Tensor | None = None  # (G,), lut dtype, with a quantized codebook
    lut_zero_point: Tensor | None = None  # (G,) uint8, with a uint8 codebook

    def palette(self) -> Tensor:
        """The palettes (G, k, d) as float32 values."""
        if self.lut_scale is None:
            return self.codebook.float()
        return dequantize_palette(self.codebook, self.lut_scale, self.lut_zero_point)

    def decode(self) -> Tensor:
        return decode_weight(self.codebook, self.indices, self.scale, self.shape, self.dtype,
                             self.vector_axis, self.lut_scale, self.lut_zero_point)


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
    """Hard-assign `weight` to the layer's palette rounded to its lut dtype (or quantized to
    8-bit integers, with the layer's lut_quantization).

    Raises ValueError naming the layer (`name`) when check_snappable fails.
    """
    check_snappable(layer, weight, name)
    if not layer.is_initialized:
        # Centroids drawn from a checked weight are finite and within its range.
        layer.initialize(weight)
    centroids = layer.centroids.reshape(layer.groups, layer.n_clusters, layer.dim)
    lut_scale = lut_zero_point = None
    if layer.lut_quantization is None:
        codebook = centroids.to(layer.lut_dtype)
        palette = codebook.float()
    else:
        codebook, lut_scale, lut_zero_point = quantize_palette(
            centroids, layer.lut_quantization, layer.lut_dtype)
        palette = dequantize_palette(codebook, lut_scale, lut_zero_point)
    normalized, scale = layer.normalized(weight)
    indices = nearest_centroids(layer.rows(normalized), palette)
    return SnappedLayer(
        shape=tuple(weight.shape), dtype=weight.dtype, bits=config.bits, dim=config.dim,
        group_size=config.group_size, codebook=codebook.cpu(), indices=indices.cpu(),
        scale=None if scale is None else scale.reshape(-1).to(layer.lut_dtype).cpu(),
        vector_axis=layer.vector_axis, lut_quantization=layer.lut_quantization,
        lut_scale=None if lut_scale is None else lut_scale.cpu(),
        lut_zero_point=None if lut_zero_point is None else lut_zero_point.cpu())
