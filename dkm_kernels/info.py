"""Size accounting: what a compressed model takes, per layer and in all (`compression_info`), and
what an export's tensors take (`export_bytes`); plus the state-dict keys the export stores.

Sizes count exactly the bytes of the exported tensors: per clustered layer
ceil(n_vectors * bits / 8) + G*k*d*lut_bytes (+ out_channels*lut_bytes with scales), plus every
uncompressed state_dict tensor at its own dtype. A quantized palette (int8 / uint8) takes
G*k*d bytes, plus G*lut_bytes of scales and, for uint8, G bytes of zero points: all three are
its `codebook_bytes`. The original size is the same state dict with the
clustered weights at their dtype. A weight shared by several modules (tied) counts once in both.
(Shapes, names and dtypes, the format's few hundred bytes of metadata, are not counted.)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .distributed import whole
from .modules import layer_type, raw_weight
from .packing import BITS_PER_BYTE, packed_bytes

# The export's tables of tensors, whose bytes are the compressed size; the last two are written
# only when a layer has a quantized palette.
TENSOR_TABLES = ("codebooks", "assignments", "scales", "uncompressed", "lut_scales",
                 "lut_zero_points")


def weight_key(module_name: str) -> str:
    """The state_dict key of a module's weight ("" is the model itself)."""
    return f"{module_name}.weight" if module_name else "weight"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16", as the export writes dtypes."""
    return str(dtype).removeprefix("torch.")


def tied_modules(compressor) -> dict[str, list[str]]:
    """{clustered layer: other modules sharing its weight Parameter} (empty when none)."""
    return {name: list(others) for name, others in getattr(compressor, "tied", {}).items()}


def uncompressed_state(compressor) -> dict[str, Tensor]:
    """The model's state_dict without the clustered weights (and their DKM buffers), nor the
    weights of modules that share a clustered weight (the export stores that weight once).
    Sharded (FSDP2) tensors are gathered whole."""
    modules = list(compressor.configs) + [other for others in tied_modules(compressor).values()
                                          for other in others]
    prefixes = [f"{name}." if name else "" for name in modules]
    return {key: whole(value) for key, value in compressor.model.state_dict().items()
            if not any(key == p + "weight" or key.startswith(p + "parametrizations.weight.")
                       for p in prefixes)}


def tensor_bytes(tensors) -> int:
    """Bytes of an iterable of tensors at their own dtypes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def compression_info(compressor) -> dict:
    """Per-layer configs and sizes, and the model's totals (see the module doc for the counts)."""
    modules = dict(compressor.model.named_modules())
    lut_bytes = torch.empty((), dtype=compressor.lut_dtype).element_size()
    tied = tied_modules(compressor)
    layers = []
    clustered_original = 0
    for name, config in compressor.configs.items():
        module = modules[name]
        layer = compressor.dkm_layers[name]
        shape = layer.original_shape
        numel = math.prod(shape)
        original = numel * raw_weight(module).element_size()
        index_bytes = packed_bytes(numel // config.dim, config.bits)
        if config.lut_quantization is None:
            codebook_bytes = layer.groups * config.n_clusters * config.dim * lut_bytes
        else:  # 8-bit entries, a scale per palette, and a zero point per uint8 palette
            codebook_bytes = layer.groups * (config.n_clusters * config.dim + lut_bytes
                                             + (config.lut_quantization == "uint8"))
        scale_bytes = shape[0] * lut_bytes if config.enable_per_channel_scale else 0
        compressed = index_bytes + codebook_bytes + scale_bytes
        clustered_original += original
        layers.append({
            "name": name, "type": layer_type(module), "shape": tuple(shape), "params": numel,
            "config": config.notation, "bits": config.bits, "dim": config.dim,
            "n_clusters": config.n_clusters, "group_size": config.group_size,
            "groups": layer.groups, "per_channel_scale": config.enable_per_channel_scale,
            "lut_quantization": config.lut_quantization,
            "tau": layer.tau, "tied": tied.get(name, []),
            "bits_per_weight": config.bits / config.dim,
            "effective_bits_per_weight": BITS_PER_BYTE * compressed / numel,
            "index_bytes": index_bytes, "codebook_bytes": codebook_bytes,
            "scale_bytes": scale_bytes, "original_bytes": original,
            "compressed_bytes": compressed, "compression_ratio": original / compressed,
        })
    uncompressed = tensor_bytes(uncompressed_state(compressor).values())
    clustered = sum(entry["compressed_bytes"] for entry in layers)
    original_total = uncompressed + clustered_original
    compressed_total = uncompressed + clustered
    return {
        "layers": layers,
        "skipped": dict(compressor.skipped),
        "lut_dtype": dtype_name(compressor.lut_dtype),
        "clustered_params": sum(entry["params"] for entry in layers),
        "uncompressed_bytes": uncompressed,
        "original_bytes": original_total,
        "compressed_bytes": compressed_total,
        "compression_ratio": (original_total / compressed_total if compressed_total
                              else float("inf")),
        "snapped": compressor.is_snapped,
    }


def export_bytes(export: dict) -> int:
    """Bytes of the export's tensors: what compression_info()['compressed_bytes'] counts."""
    return sum(tensor_bytes(export.get(table, {}).values()) for table in TENSOR_TABLES)
