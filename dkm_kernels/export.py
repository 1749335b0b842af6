"""The file format of a DKM-compressed model: writing it, and reading it back with every field checked.

Where the export code lives (imports run one way, left to right; none imports compress.py):

    packing.py   pack_indices, unpack_indices: palette indices at their real bit width
    snapping.py  SnappedLayer, snap_layer, decode_weight: a clustered weight on its palette
    info.py      compression_info, export_bytes: sizes per layer and in all
    export.py    this file: FORMAT, export_compressed, save_compressed,
                 decoded_state_dict, load_compressed; it re-exports the
                 public names of the three others, so `from dkm_kernels.export import ...` works
                 for all of them

Format of `export_compressed()` (a dict of plain Python values and tensors, so that
`torch.load(path, weights_only=True)` reads it):

    format          "dkm_kernels.compressed/1"
    lut_dtype       "float16" (default), "bfloat16" or "float32": the dtype of palettes and scales
    layer_configs   {name: {"shape", "dtype", "bits", "dim", "n_clusters", "groups", "group_size",
                            "per_channel_scale", "n_vectors"[, "tied"]}}; "tied" lists the other
                    modules that share this layer's weight (written once, loaded into each)
    codebooks       {name: (G, k, d) tensor in lut_dtype}: the palettes (G = 1 without group_size)
    assignments     {name: uint8 tensor of ceil(n_vectors * bits / 8) bytes}: the palette index of
                    every weight vector, `bits` bits each, least significant bit first, vectors in
                    the order of weight.reshape(G, -1, d)
    scales          {name: (out_channels,) tensor in lut_dtype} for layers with per-channel scale
    uncompressed    {state_dict key: tensor}: biases, norms, buffers, skipped layers, as they are

A clustered weight is decoded as `codebook.float()[g, index]` reshaped to the weight's shape,
times `scale.float()` per output channel, cast to the weight's dtype. `snap_weights()` computes the
model's weights with the same function, so a loaded model equals the snapped one bit for bit.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn

from .info import (compression_info, dtype_name, export_bytes, tied_modules, uncompressed_state,
                   weight_key)
from .modules import raw_weight
from .packing import pack_indices, unpack_indices
from .snapping import SnappedLayer, check_snappable, decode_weight, snap_layer

__all__ = ["FORMAT", "export_compressed", "save_compressed", "decoded_state_dict",
           "load_compressed", "compression_info", "export_bytes", "SnappedLayer", "snap_layer",
           "decode_weight", "pack_indices", "unpack_indices"]

FORMAT = "dkm_kernels.compressed/1"


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the export")
    return dtype


@torch.no_grad()
def export_compressed(compressor) -> dict:
    """The compressed model in the format above; snaps the compressor's weights first if needed.

    Raises ValueError when a weight was changed after snap_weights() (it no longer matches its
    palette and indices), when a module listed as sharing a clustered weight holds another one,
    or when a weight to snap is not finite or does not fit in lut_dtype.
    """
    modules = dict(compressor.model.named_modules())
    # Checked here with the layer names, before snap_weights() changes any layer.
    for name, layer in compressor.dkm_layers.items():
        if name not in compressor.snapped:
            check_snappable(layer, raw_weight(modules[name]).detach(), name)
    compressor.snap_weights()
    tied = tied_modules(compressor)
    export = {"format": FORMAT, "lut_dtype": dtype_name(compressor.lut_dtype),
              "layer_configs": {}, "codebooks": {}, "assignments": {}, "scales": {},
              "uncompressed": {k: v.detach().cpu().clone()
                               for k, v in uncompressed_state(compressor).items()}}
    for name, record in compressor.snapped.items():
        decoded = record.decode()
        if not torch.equal(decoded, modules[name].weight.detach().cpu()):
            raise ValueError(f"layer {name!r}: its weight changed after snap_weights(), so it no "
                             f"longer matches its palette; export right after snapping")
        for other in tied.get(name, []):
            weight = getattr(modules.get(other), "weight", None)
            if not isinstance(weight, Tensor) or not torch.equal(decoded, weight.detach().cpu()):
                raise ValueError(f"layer {name!r}: module {other!r} is listed in compressor.tied "
                                 f"as sharing its weight but does not hold the same weight; tie "
                                 f"them (`{other}.weight = {name}.weight`) or drop it from tied")
        meta = {
            "shape": list(record.shape), "dtype": dtype_name(record.dtype),
            "bits": record.bits, "dim": record.dim, "n_clusters": record.codebook.shape[1],
            "groups": record.codebook.shape[0], "group_size": record.group_size,
            "per_channel_scale": record.scale is not None,
            "n_vectors": record.indices.numel(),
        }
        if tied.get(name):
            meta["tied"] = list(tied[name])
        export["layer_configs"][name] = meta
        export["codebooks"][name] = record.codebook.clone()
        export["assignments"][name] = pack_indices(record.indices, record.bits)
        if record.scale is not None:
            export["scales"][name] = record.scale.clone()
    return export


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
        # Tied modules get the same tensor, so a model that ties them stays tied on loading.
        for module in (name, *meta.get("tied", [])):
            state[weight_key(module)] = weight
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
