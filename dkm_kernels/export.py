"""Export of a DKM-compressed model: bit-packed indices, palettes, scales and everything else.

Format of `export_compressed()` (a dict of plain Python values and tensors, so that
`torch.load(path, weights_only=True)` reads it):

    format          "dkm_kernels.compressed/1"
    lut_dtype       "float16" (default), "bfloat16" or "float32": the dtype of palettes and scales
    layer_configs   {name: {"shape", "dtype", "bits", "dim", "n_clusters", "groups", "group_size",
                            "per_channel_scale", "n_vectors"}}
    codebooks       {name: (G, k, d) tensor in lut_dtype}: the palettes (G = 1 without group_size)
    assignments     {name: uint8 tensor of ceil(n_vectors * bits / 8) bytes}: the palette index of
                    every weight vector, `bits` bits each, least significant bit first, vectors in
                    the order of weight.reshape(G, -1, d)
    scales          {name: (out_channels,) tensor in lut_dtype} for layers with per-channel scale
    uncompressed    {state_dict key: tensor}: biases, norms, buffers, skipped layers, as they are

A clustered weight is decoded as `codebook.float()[g, index]` reshaped to the weight's shape,
times `scale.float()` per output channel, cast to the weight's dtype. `snap_weights()` computes the
model's weights with the same function, so a loaded model equals the snapped one bit for bit.

Sizes (`compression_info`) count exactly the bytes of these tensors: per clustered layer
ceil(n_vectors * bits / 8) + G*k*d*lut_bytes (+ out_channels*lut_bytes with scales), plus every
uncompressed state_dict tensor at its own dtype. The original size is the same state dict with the
clustered weights at their dtype. (Shapes, names and dtypes, the format's few hundred bytes of
metadata, are not counted.)
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import torch
from torch import Tensor, nn

from .kmeans import nearest_centroids
from .layer import DKMLayer
from .modules import layer_type, raw_weight

FORMAT = "dkm_kernels.compressed/1"

# Indices packed per pass, so that packing a large layer needs no bits * n_vectors int64 tensor.
_PACK_CHUNK = 1 << 20


def pack_indices(indices: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers < 2**bits into ceil(n * bits / 8) bytes, LSB first."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be 1..16, got {bits}")
    flat = indices.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"indices must lie in [0, {2 ** bits}) to be packed in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    bit_stream = torch.empty(flat.numel() * bits, dtype=torch.uint8)
    for start in range(0, flat.numel(), _PACK_CHUNK):
        block = flat[start:start + _PACK_CHUNK]
        bit_stream[start * bits:(start + block.numel()) * bits] = (
            ((block.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8))
    padded = torch.zeros(math.ceil(bit_stream.numel() / 8) * 8, dtype=torch.uint8)
    padded[:bit_stream.numel()] = bit_stream
    weights = (2 ** torch.arange(8, dtype=torch.int32))
    return (padded.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_indices: the first `count` indices, int64."""
    if packed.numel() != math.ceil(count * bits / 8):
        raise ValueError(f"{count} indices of {bits} bits need {math.ceil(count * bits / 8)} "
                         f"bytes, got {packed.numel()}")
    bit_stream = ((packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1)
    bit_stream = bit_stream.reshape(-1)[:count * bits].reshape(count, bits).to(torch.int64)
    return (bit_stream << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


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
def snap_layer(layer: DKMLayer, weight: Tensor, config) -> SnappedLayer:
    """Hard-assign `weight` to the layer's palette rounded to its lut dtype."""
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the export")
    return dtype


def _clustering_prefixes(names) -> list[str]:
    return [f"{name}." if name else "" for name in names]


def _uncompressed_state(compressor) -> dict[str, Tensor]:
    """The model's state_dict without the clustered weights (and their DKM buffers)."""
    prefixes = _clustering_prefixes(compressor.configs)
    state = {}
    for key, value in compressor.model.state_dict().items():
        if any(key.startswith(p + "parametrizations.weight.") or key == p + "weight"
               for p in prefixes):
            continue
        state[key] = value
    return state


def _lut_bytes(compressor) -> int:
    return torch.empty((), dtype=compressor.lut_dtype).element_size()


def compression_info(compressor) -> dict:
    """Per-layer configs and sizes, and the model's totals (see the module doc for the counts)."""
    modules = dict(compressor.model.named_modules())
    lut_bytes = _lut_bytes(compressor)
    layers = []
    clustered_original = 0
    for name, config in compressor.configs.items():
        module = modules[name]
        layer = compressor.dkm_layers[name]
        shape = layer.original_shape
        numel = math.prod(shape)
        element = raw_weight(module).element_size()
        original = numel * element
        n_vectors = numel // config.dim
        index_bytes = math.ceil(n_vectors * config.bits / 8)
        codebook_bytes = layer.groups * config.n_clusters * config.dim * lut_bytes
        scale_bytes = shape[0] * lut_bytes if config.enable_per_channel_scale else 0
        compressed = index_bytes + codebook_bytes + scale_bytes
        clustered_original += original
        layers.append({
            "name": name, "type": layer_type(module), "shape": tuple(shape), "params": numel,
            "config": config.notation, "bits": config.bits, "dim": config.dim,
            "n_clusters": config.n_clusters, "group_size": config.group_size,
            "groups": layer.groups, "per_channel_scale": config.enable_per_channel_scale,
            "tau": layer.tau,
            "bits_per_weight": config.bits / config.dim,
            "effective_bits_per_weight": 8 * compressed / numel,
            "index_bytes": index_bytes, "codebook_bytes": codebook_bytes,
            "scale_bytes": scale_bytes, "original_bytes": original,
            "compressed_bytes": compressed, "compression_ratio": original / compressed,
        })
    uncompressed = sum(t.numel() * t.element_size()
                       for t in _uncompressed_state(compressor).values())
    clustered = sum(entry["compressed_bytes"] for entry in layers)
    original_total = uncompressed + clustered_original
    compressed_total = uncompressed + clustered
    return {
        "layers": layers,
        "skipped": dict(compressor.skipped),
        "lut_dtype": _dtype_name(compressor.lut_dtype),
        "clustered_params": sum(entry["params"] for entry in layers),
        "uncompressed_bytes": uncompressed,
        "original_bytes": original_total,
        "compressed_bytes": compressed_total,
        "compression_ratio": (original_total / compressed_total if compressed_total
                              else float("inf")),
        "snapped": compressor.is_snapped,
    }


@torch.no_grad()
def export_compressed(compressor) -> dict:
    """The compressed model in the format above; snaps the compressor's weights first if needed.

    Raises ValueError when a weight was changed after snap_weights() (it no longer matches its
    palette and indices).
    """
    compressor.snap_weights()
    modules = dict(compressor.model.named_modules())
    export = {"format": FORMAT, "lut_dtype": _dtype_name(compressor.lut_dtype),
              "layer_configs": {}, "codebooks": {}, "assignments": {}, "scales": {},
              "uncompressed": {k: v.detach().cpu().clone()
                               for k, v in _uncompressed_state(compressor).items()}}
    for name, record in compressor.snapped.items():
        decoded = record.decode()
        if not torch.equal(decoded, modules[name].weight.detach().cpu()):
            raise ValueError(f"layer {name!r}: its weight changed after snap_weights(), so it no "
                             f"longer matches its palette; export right after snapping")
        export["layer_configs"][name] = {
            "shape": list(record.shape), "dtype": _dtype_name(record.dtype),
            "bits": record.bits, "dim": record.dim, "n_clusters": record.codebook.shape[1],
            "groups": record.codebook.shape[0], "group_size": record.group_size,
            "per_channel_scale": record.scale is not None,
            "n_vectors": record.indices.numel(),
        }
        export["codebooks"][name] = record.codebook.clone()
        export["assignments"][name] = pack_indices(record.indices, record.bits)
        if record.scale is not None:
            export["scales"][name] = record.scale.clone()
    return export


def export_bytes(export: dict) -> int:
    """Bytes of the export's tensors: what compression_info()['compressed_bytes'] counts."""
    total = 0
    for key in ("codebooks", "assignments", "scales", "uncompressed"):
        total += sum(t.numel() * t.element_size() for t in export[key].values())
    return total


def save_compressed(compressor_or_export, path) -> dict:
    """torch.save the export of a compressor (or an export dict) to `path`; returns the export."""
    export = (compressor_or_export if isinstance(compressor_or_export, dict)
              else export_compressed(compressor_or_export))
    torch.save(export, path)
    return export


def decoded_state_dict(export: dict) -> dict[str, Tensor]:
    """A plain state dict (snapped weights decoded) from an export."""
    if export.get("format") != FORMAT:
        raise ValueError(f"not a dkm_kernels export (format {export.get('format')!r}, "
                         f"expected {FORMAT!r})")
    state = dict(export["uncompressed"])
    for name, meta in export["layer_configs"].items():
        codebook = export["codebooks"][name]
        indices = unpack_indices(export["assignments"][name], meta["bits"], meta["n_vectors"])
        weight = decode_weight(codebook, indices, export["scales"].get(name), meta["shape"],
                               _dtype_from_name(meta["dtype"]))
        state[f"{name}.weight" if name else "weight"] = weight
    return state


def load_compressed(source, model_factory: Callable[[], nn.Module] | nn.Module,
                    map_location="cpu") -> nn.Module:
    """Rebuild a plain model from an export (a path or the dict).

    model_factory: a callable returning the uncompressed architecture, or a module of that
    architecture to load into. Its weights end up equal to the snapped ones exactly; it is
    returned in evaluation mode.
    """
    if isinstance(source, (str, os.PathLike)):
        export = torch.load(source, map_location=map_location, weights_only=True)
    else:
        export = source
    model = model_factory if isinstance(model_factory, nn.Module) else model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
    model.load_state_dict(decoded_state_dict(export), strict=True)
    return model.eval()
