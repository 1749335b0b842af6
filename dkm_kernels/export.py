"""The file format of a DKM-compressed model: writing it, and reading it back, every field checked.

Where the export code lives (imports run one way, left to right; none imports compress.py):

    packing.py   pack_indices, unpack_indices: palette indices at their real bit width
    snapping.py  SnappedLayer, snap_layer, decode_weight: a clustered weight on its palette
    info.py      compression_info, export_bytes: sizes per layer and in all
    export.py    this file: FORMAT, export_compressed, save_compressed, read_export,
                 validate_export, decoded_state_dict, load_compressed; it re-exports the
                 public names of the three others, so `from dkm_kernels.export import ...` works
                 for all of them

Format of `export_compressed()` (a dict of plain Python values and tensors, so that
`torch.load(path, weights_only=True)` reads it):

    format          "dkm_kernels.compressed/1"
    lut_dtype       "float16" (default), "bfloat16" or "float32": the dtype of palettes and scales
    layer_configs   {name: {"shape", "dtype", "bits", "dim", "n_clusters", "groups", "group_size",
                            "per_channel_scale", "n_vectors"[, "tied"][, "vector_axis"]
                            [, "lut_quantization"]}};
                    "tied" lists the other modules that share this layer's weight (written
                    once, loaded into each); "vector_axis": "output" marks vectors of d
                    consecutive output channels (absent: d consecutive flattened weights);
                    "lut_quantization": "int8" or "uint8" marks a quantized palette (absent:
                    a palette in lut_dtype)
    codebooks       {name: (G, k, d) tensor in lut_dtype}: the palettes (G = 1 without group_size);
                    int8 / uint8 integers for a quantized palette
    assignments     {name: uint8 tensor of ceil(n_vectors * bits / 8) bytes}: the palette index of
                    every weight vector, `bits` bits each, least significant bit first, vectors in
                    the order of dkm_kernels.layer.weight_rows (weight.reshape(G, -1, d) when flat)
    scales          {name: (out_channels,) tensor in lut_dtype} for layers with per-channel scale
    uncompressed    {state_dict key: tensor}: biases, norms, buffers, skipped layers, as they are
    lut_scales      {name: (G,) tensor in lut_dtype}: per palette, for quantized palettes
    lut_zero_points {name: (G,) uint8 tensor}: per palette, for uint8 palettes
                    (these two tables are written only when some layer has a quantized palette;
                    a file without them is read as having none)

A clustered weight is decoded as `codebook.float()[g, index]` reshaped to the weight's shape,
times `scale.float()` per output channel, cast to the weight's dtype; a quantized palette is
first `(codebook.float() - zero_point) * lut_scale.float()` (zero point 0 for int8), see
dkm_kernels.snapping. `snap_weights()` computes the
model's weights with the same function, so a loaded model equals the snapped one bit for bit.

Reading checks every field against the others (and, in load_compressed, against the model) before
anything is decoded or loaded, and raises ValueError naming the layer and the field.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from .info import (TENSOR_TABLES, compression_info, dtype_name, export_bytes, tied_modules,
                   uncompressed_state, weight_key)
from .distributed import whole
from .modules import raw_weight
from .packing import check_bits, pack_indices, packed_bytes, unpack_indices
from .snapping import (QUANTIZED_DTYPES, ZERO_POINTS, SnappedLayer, check_snappable,
                       decode_weight, snap_layer)

__all__ = ["FORMAT", "export_compressed", "save_compressed", "read_export", "validate_export",
           "decoded_state_dict", "load_compressed", "compression_info", "export_bytes",
           "SnappedLayer", "snap_layer", "decode_weight", "pack_indices", "unpack_indices"]

FORMAT = "dkm_kernels.compressed/1"
# The dtype names a file may hold: palettes and scales; decoded weights.
LUT_DTYPES = ("float16", "bfloat16", "float32")
WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
LAYER_FIELDS = ("shape", "dtype", "bits", "dim", "n_clusters", "groups", "group_size",
                "per_channel_scale", "n_vectors")
# Written only for a layer whose weight other modules share, for vectors along the output axis,
# and for quantized palettes.
OPTIONAL_LAYER_FIELDS = ("tied", "vector_axis", "lut_quantization")
# The fields that are dicts: layer configs by layer name, and the tensor tables.
DICT_FIELDS = ("layer_configs",) + TENSOR_TABLES
# Tables written only when some layer has a quantized palette (absent: empty).
OPTIONAL_FIELDS = ("lut_scales", "lut_zero_points")
FIELDS = ("format", "lut_dtype") + DICT_FIELDS
# The fix for every inconsistency inside a file.
_REEXPORT = "the file is damaged or was edited; export the model again with save_compressed()"
_OTHER_MODEL = "load it into the architecture it was exported from"


# -- writing --------------------------------------------------------------------------------------

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
            check_snappable(layer, whole(raw_weight(modules[name])).detach(), name)
    compressor.snap_weights()
    tied = tied_modules(compressor)
    export = {"format": FORMAT, "lut_dtype": dtype_name(compressor.lut_dtype),
              "layer_configs": {}, "codebooks": {}, "assignments": {}, "scales": {},
              "uncompressed": {k: v.detach().cpu().clone()
                               for k, v in uncompressed_state(compressor).items()}}
    for name, record in compressor.snapped.items():
        decoded = record.decode()
        if not torch.equal(decoded, whole(modules[name].weight).detach().cpu()):
            raise ValueError(f"layer {name!r}: its weight changed after snap_weights(), so it no "
                             f"longer matches its palette; export right after snapping")
        for other in tied.get(name, []):
            weight = getattr(modules.get(other), "weight", None)
            if not isinstance(weight, Tensor) or not torch.equal(decoded,
                                                                 whole(weight).detach().cpu()):
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
        if record.vector_axis != "flat":
            meta["vector_axis"] = record.vector_axis
        export["layer_configs"][name] = meta
        export["codebooks"][name] = record.codebook.clone()
        export["assignments"][name] = pack_indices(record.indices, record.bits)
        if record.scale is not None:
            export["scales"][name] = record.scale.clone()
        if record.lut_quantization is not None:
            meta["lut_quantization"] = record.lut_quantization
            export.setdefault("lut_scales", {})[name] = record.lut_scale.clone()
            if record.lut_zero_point is not None:
                export.setdefault("lut_zero_points", {})[name] = record.lut_zero_point.clone()
    return export


def save_compressed(compressor_or_export, path) -> dict:
    """torch.save the export of a compressor (or an export dict) to `path`; returns the export."""
    export = (compressor_or_export if isinstance(compressor_or_export, dict)
              else export_compressed(compressor_or_export))
    torch.save(export, path)
    return export


# -- reading and checking -------------------------------------------------------------------------

class CheckedLayer(NamedTuple):
    """One clustered layer of an export, every field checked, its indices unpacked."""

    meta: dict
    codebook: Tensor
    indices: Tensor
    scale: Tensor | None
    dtype: torch.dtype
    tied: list
    lut_scale: Tensor | None = None
    lut_zero_point: Tensor | None = None

    def decode(self) -> Tensor:
        return decode_weight(self.codebook, self.indices, self.scale, self.meta["shape"],
                             self.dtype, self.meta.get("vector_axis", "flat"), self.lut_scale,
                             self.lut_zero_point)


def read_export(source, map_location="cpu") -> dict:
    """The export in `source`, a path (read with torch.load, weights_only) or the dict itself,
    after validate_export. A missing file raises FileNotFoundError; anything that is not an export
    of this format raises ValueError saying what it is not."""
    return _read(source, map_location)[0]


def _read(source, map_location) -> tuple[dict, dict[str, CheckedLayer]]:
    if not isinstance(source, (str, os.PathLike)):
        return source, validate_export(source)
    path = os.fspath(source)
    try:
        export = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # torch.load raises many types for bytes it cannot read
        raise ValueError(f"{path} is not a dkm_kernels export: torch.load(weights_only=True) "
                         f"cannot read it ({type(error).__name__}); it is truncated or not a "
                         f"torch file") from error
    try:
        return export, validate_export(export)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(layer: str | None, field: str, problem: str, fix: str = _REEXPORT) -> ValueError:
    where = "export" if layer is None else f"export layer {layer!r}"
    return ValueError(f"{where}, field {field!r}: {problem}; {fix}")


def _check_top(export) -> None:
    """What makes a dict an export of this format, before its layers are read."""
    if not isinstance(export, dict):
        raise ValueError(f"not a dkm_kernels export: it holds a {type(export).__name__}, not the "
                         f"dict export_compressed() writes")
    if "format" not in export:
        plain = export and all(isinstance(value, Tensor) for value in export.values())
        raise ValueError("not a dkm_kernels export: the dict has no 'format' field"
                         + (" (it looks like a plain state dict: use model.load_state_dict)"
                            if plain else ""))
    if export["format"] != FORMAT:
        raise ValueError(f"not a dkm_kernels export of this version: field 'format' is "
                         f"{export['format']!r}, expected {FORMAT!r}")
    for field in FIELDS:
        if field not in export and field not in OPTIONAL_FIELDS:
            raise _field_error(None, field, "missing")
    unknown = [field for field in export if field not in FIELDS]
    if unknown:
        raise _field_error(None, str(unknown[0]), f"unknown (the fields are {list(FIELDS)})")
    if not isinstance(export["lut_dtype"], str) or export["lut_dtype"] not in LUT_DTYPES:
        raise _field_error(None, "lut_dtype",
                           f"must be one of {list(LUT_DTYPES)}, got {export['lut_dtype']!r}")
    for table in DICT_FIELDS:
        if table not in export:
            continue  # an optional table
        if not isinstance(export[table], dict) or not all(
                isinstance(key, str) for key in export[table]):
            raise _field_error(None, table, f"must be a dict with str keys, got "
                                            f"{type(export[table]).__name__}")
    for table in ("codebooks", "assignments", "scales") + OPTIONAL_FIELDS:
        stray = [name for name in export.get(table, {}) if name not in export["layer_configs"]]
        if stray:
            raise _field_error(stray[0], table, "stored for a layer that layer_configs lacks")
    for key, value in export["uncompressed"].items():
        if not isinstance(value, Tensor):
            raise _field_error(None, "uncompressed",
                               f"{key!r} must be a tensor, got {type(value).__name__}")


def _table_tensor(export: dict, table: str, name: str, dtype: torch.dtype, shape) -> Tensor:
    """export[table][name], checked to be a finite tensor of `dtype` and `shape`."""
    if name not in export.get(table, {}):
        raise _field_error(name, table, "missing")
    value = export[table][name]
    if not isinstance(value, Tensor):
        raise _field_error(name, table, f"must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise _field_error(name, table, f"dtype must be {dtype_name(dtype)}, got "
                                        f"{dtype_name(value.dtype)}")
    if tuple(value.shape) != tuple(shape):
        raise _field_error(name, table, f"shape must be {tuple(shape)}, got {tuple(value.shape)}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise _field_error(name, table, "holds NaN or inf values")
    return value


def _check_layer(export: dict, name: str, meta) -> CheckedLayer:
    """Every field of one layer against the others; ValueError naming the layer and field."""
    def fail(field, problem):
        return _field_error(name, field, problem)

    if not isinstance(meta, dict):
        raise fail("layer_configs", f"must be a dict of the layer's fields, got "
                                    f"{type(meta).__name__}")
    for field in LAYER_FIELDS:
        if field not in meta:
            raise fail(field, "missing")
    for field in meta:
        if field not in LAYER_FIELDS + OPTIONAL_LAYER_FIELDS:
            raise fail(str(field), f"unknown (the fields are "
                                   f"{list(LAYER_FIELDS + OPTIONAL_LAYER_FIELDS)})")
    shape = meta["shape"]
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(_is_int(size) and size > 0 for size in shape)):
        raise fail("shape", f"must be a list of positive integers, got {shape!r}")
    numel, channels = math.prod(shape), shape[0]
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in WEIGHT_DTYPES:
        raise fail("dtype", f"must be one of {list(WEIGHT_DTYPES)}, got {meta['dtype']!r}")
    bits = meta["bits"]
    try:
        check_bits(bits)
    except ValueError as error:
        raise fail("bits", str(error)) from None
    dim = meta["dim"]
    if not _is_int(dim) or dim < 1 or numel % dim:
        raise fail("dim", f"must be a positive integer dividing the {numel} weights of shape "
                          f"{list(shape)}, got {dim!r}")
    n_vectors = meta["n_vectors"]
    if not _is_int(n_vectors) or n_vectors != numel // dim:
        raise fail("n_vectors", f"must be prod(shape) / dim = {numel // dim}, got {n_vectors!r}")
    k = meta["n_clusters"]
    if not _is_int(k) or not 1 <= k <= 2 ** bits:
        raise fail("n_clusters", f"must be an integer from 1 to 2**bits = {2 ** bits} "
                                 f"(bits={bits}), got {k!r}")
    groups, group_size = meta["groups"], meta["group_size"]
    if not _is_int(groups) or groups < 1 or channels % groups or n_vectors % groups:
        raise fail("groups", f"must be a positive integer dividing the {channels} output "
                             f"channels and the {n_vectors} vectors, got {groups!r}")
    if not (group_size is None and groups == 1
            or _is_int(group_size) and group_size * groups == channels):
        raise fail("group_size", f"must be output channels / groups = {channels // groups} "
                                 f"(or null with one group), got {group_size!r}")
    if not isinstance(meta["per_channel_scale"], bool):
        raise fail("per_channel_scale", f"must be true or false, got "
                                        f"{meta['per_channel_scale']!r}")
    vector_axis = meta.get("vector_axis", "flat")
    if vector_axis not in ("flat", "output") or (
            vector_axis == "output" and (channels // groups) % dim):
        raise fail("vector_axis", f"must be 'output' with dim dividing the {channels // groups} "
                                  f"output channels of each palette (or absent), got "
                                  f"{vector_axis!r}")
    tied = meta.get("tied", [])
    if not isinstance(tied, list) or not all(isinstance(other, str) for other in tied):
        raise fail("tied", f"must be a list of module names, got {tied!r}")
    quantization = meta.get("lut_quantization")
    if quantization is not None and quantization not in QUANTIZED_DTYPES:
        raise fail("lut_quantization", f"must be one of {list(QUANTIZED_DTYPES)} (or absent), "
                                       f"got {quantization!r}")

    lut_dtype = getattr(torch, export["lut_dtype"])
    codebook = _table_tensor(export, "codebooks", name,
                             QUANTIZED_DTYPES.get(quantization, lut_dtype), (groups, k, dim))
    lut_scale = lut_zero_point = None
    if quantization is not None:
        lut_scale = _table_tensor(export, "lut_scales", name, lut_dtype, (groups,))
        if not bool((lut_scale > 0).all()):
            raise fail("lut_scales", "holds a scale that is not positive")
        if ZERO_POINTS[quantization]:
            lut_zero_point = _table_tensor(export, "lut_zero_points", name, torch.uint8,
                                           (groups,))
    for table, wanted in (("lut_scales", lut_scale), ("lut_zero_points", lut_zero_point)):
        if wanted is None and name in export.get(table, {}):
            raise fail(table, f"stored, but the layer's lut_quantization is {quantization!r}")
    packed = _table_tensor(export, "assignments", name, torch.uint8,
                           (packed_bytes(n_vectors, bits),))
    indices = unpack_indices(packed, bits, n_vectors)
    if n_vectors and int(indices.max()) >= k:
        raise fail("assignments", f"palette index {int(indices.max())} is not below "
                                  f"n_clusters={k}")
    scale = None
    if meta["per_channel_scale"]:
        scale = _table_tensor(export, "scales", name, lut_dtype, (channels,))
    elif name in export["scales"]:
        raise fail("scales", "stored, but the layer's per_channel_scale is false")
    return CheckedLayer(meta, codebook, indices, scale, getattr(torch, meta["dtype"]), tied,
                        lut_scale, lut_zero_point)


def validate_export(export) -> dict[str, CheckedLayer]:
    """Check every field of an export against the others; {layer: CheckedLayer}.

    Raises ValueError naming the layer and field (or saying what the object is not)."""
    _check_top(export)
    layers = {name: _check_layer(export, name, meta)
              for name, meta in export["layer_configs"].items()}
    owner = {}  # state_dict key -> the layer whose decoded weight fills it
    for name, layer in layers.items():
        for module in (name, *layer.tied):
            key = weight_key(module)
            if key in owner or key in export["uncompressed"]:
                other = (f"layer {owner[key]!r}" if key in owner else "uncompressed")
                raise _field_error(name, "tied" if module != name else "layer_configs",
                                   f"state_dict key {key!r} is also filled by {other}")
            owner[key] = name
    return layers


def _decode(export: dict, layers: dict[str, CheckedLayer]) -> dict[str, Tensor]:
    state = dict(export["uncompressed"])
    for name, layer in layers.items():
        weight = layer.decode()
        # Tied modules get the same tensor, so a model that ties them stays tied on loading.
        for module in (name, *layer.tied):
            state[weight_key(module)] = weight
    return state


def decoded_state_dict(export: dict) -> dict[str, Tensor]:
    """A plain state dict (snapped weights decoded) from an export, checked by validate_export."""
    return _decode(export, validate_export(export))


def _check_fits(model: nn.Module, layers: dict[str, CheckedLayer],
                state: dict[str, Tensor]) -> None:
    """ValueError unless `state` has exactly the model's state_dict keys, at its shapes."""
    target = model.state_dict()
    missing = [key for key in target if key not in state]
    unexpected = [key for key in state if key not in target]
    if missing or unexpected:
        parts = ([f"keys the model has and the export lacks: {missing}"] if missing else []) + (
            [f"keys the export has and the model lacks: {unexpected}"] if unexpected else [])
        raise ValueError(f"the export does not fit the model ({type(model).__name__}): "
                         f"{'; '.join(parts)}; {_OTHER_MODEL}")
    owner = {weight_key(module): name for name, layer in layers.items()
             for module in (name, *layer.tied)}
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            problem = (f"{list(value.shape)}, but the model's {key!r} is "
                       f"{list(target[key].shape)}")
            if key in owner:
                raise _field_error(owner[key], "shape", problem, _OTHER_MODEL)
            raise _field_error(None, "uncompressed", f"{key!r} has shape {problem}", _OTHER_MODEL)


def load_compressed(source, model_factory: Callable[[], nn.Module] | nn.Module,
                    map_location="cpu") -> nn.Module:
    """Rebuild a plain model from an export (a path or the dict).

    model_factory: a callable returning the uncompressed architecture, or a module of that
    architecture to load into. Its weights end up equal to the snapped ones exactly; it is
    returned in evaluation mode. Everything is checked and decoded before the model is touched,
    so a file that does not fit raises ValueError (naming the layer and field) and leaves a given
    module as it was.
    """
    export, layers = _read(source, map_location)
    state = _decode(export, layers)
    model = model_factory if isinstance(model_factory, nn.Module) else model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
    _check_fits(model, layers, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
