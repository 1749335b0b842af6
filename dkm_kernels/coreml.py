"""Core ML deployment: the learned palettes and indices as Core ML lookup-table (LUT) weights.

coremltools' PyTorch frontend reads, for each module weight, buffers named
`_COREML_/weight/<key>` (and a root `_COREML_/metadata_version`) and turns the weight into a
`constexpr_lut_to_dense` op:

    compression_type      [2] (palettization)
    lut                   (G, 1, ..., 1, k, d): one palette per block of G consecutive output
                          channels, the weight's rank + 2 dimensions
    vector_axis           the weight axis along which a d-vector lies (only when d > 1)
    palettization_scale   (O, 1, ..., 1) per-output-channel scales, applied after the lookup

and, for a quantized palette (int8 / uint8 entries times a per-palette scale; joint compression):

    compression_type      [2, 3] (palettization, then quantization)
    lut                   the palette's float values, as above
    quantization_n_bits   8
    quantization_scale    (G, 1, ..., 1, 1, 1): the palette's scale, the LUT's rank
    zero_point            (G, 1, ..., 1, 1, 1) uint8, for uint8 palettes

from which the frontend requantizes the LUT (round(lut / scale) + zero_point: our integers,
exactly, since the float values are scale * (q - zero_point)) and emits
`constexpr_blockwise_shift_scale` of the 8-bit LUT feeding `constexpr_lut_to_dense` (for targets
before iOS26; from iOS26 the 8-bit lookup first, then the shift and scale of its output).

It does not take indices: it recomputes them as the nearest LUT entry of every weight (vector)
it is given, ties to the lowest index. `finalize()` snaps the model first, so every weight is
exactly a palette entry (times its channel scale: a float16 entry times a float16 scale is exact
in float32, so the division gives the entry back), and the nearest entry is the snapped one: the
indices Core ML stores are the export's, bit for bit.

Core ML's constraints, checked when a compressor targets Core ML (`compress_model(...,
target="coreml")`) and again by `finalize()`:
  - indices of 1, 2, 3, 4, 6 or 8 bits: 5- and 7-bit palettes are padded to 6 and 8 bits with
    copies of their first entry (a weight on that value is the first entry's: ties go to the
    lowest index, so no weight uses a padding entry); more than 8 bits cannot be deployed;
  - palettes in float16 or float32 (coremltools rejects bfloat16);
  - a vector of d weights lies along one axis: `vector_axis="output"` (d consecutive output
    channels) always does, the flattened layout only when the weight's last axis of size > 1
    holds a multiple of d (a Linear's input features, not a 3x3 kernel);
  - a quantized palette without per-channel scales (the frontend cannot put the palette's
    dequantization and a per-channel scale on one weight).
Grouped, vector, scaled and quantized palettes need minimum_deployment_target iOS18 or later
(before it, coremltools silently keeps the weights dense), which `to_coreml` enforces; quantized
vector palettes need iOS26 (coremltools' reordering pass for earlier targets drops the vector
axis and fails).

coremltools is imported only by `to_coreml` and `read_palettes`; finalize() needs only torch.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .modules import CONV_TRANSPOSE_TYPES, raw_weight

# Index widths of Core ML's constexpr_lut_to_dense.
INDEX_BITS = (1, 2, 3, 4, 6, 8)
# Palette dtypes Core ML stores (of the ones dkm_kernels trains with).
LUT_DTYPES = (torch.float16, torch.float32)
# coremltools' buffer names and values.
PREFIX = "_COREML_"
PALETTIZATION = 2
QUANTIZATION = 3
QUANTIZED_BITS = 8
METADATA_VERSION = 1
INSTALL_HINT = "pip install coremltools (it converts and saves ML programs on Linux and macOS)"


def index_bits(bits: int) -> int:
    """The Core ML index width that holds `bits`-bit indices (5 -> 6, 7 -> 8)."""
    for width in INDEX_BITS:
        if width >= bits:
            return width
    raise ValueError(f"bits={bits}: Core ML palettes have at most {INDEX_BITS[-1]}-bit indices "
                     f"(widths {', '.join(map(str, INDEX_BITS))}); use bits <= {INDEX_BITS[-1]}")


def coreml_vector_axis(shape, dim: int, vector_axis: str = "flat") -> int | None:
    """The weight axis Core ML lays the layer's d-vectors along (None for scalar palettes).

    Raises ValueError when no Core ML axis expresses the layout."""
    if dim == 1:
        return None
    if vector_axis == "output":
        return 0
    # d consecutive elements of weight.reshape(-1) lie along the last axis that is not 1 long,
    # and stay on it only if that axis holds a multiple of d.
    axis = max((a for a, size in enumerate(shape) if size > 1), default=len(shape) - 1)
    if shape[axis] % dim:
        raise ValueError(
            f"dim={dim} with vector_axis='flat' groups {dim} consecutive weights of "
            f"weight.reshape(-1), which for shape {tuple(shape)} run across axis {axis} "
            f"({shape[axis]} long): no Core ML vector axis expresses that; use "
            f"vector_axis='output' ({dim} consecutive output channels) or a dim dividing "
            f"{shape[axis]}")
    return axis


def check_deployable(name: str, module: nn.Module, config, lut_dtype: torch.dtype) -> None:
    """ValueError naming the layer unless Core ML can hold its palette (see the module doc)."""
    try:
        index_bits(config.bits)
        if lut_dtype not in LUT_DTYPES:
            raise ValueError(f"lut_dtype={lut_dtype}: Core ML palettes are float16 or float32 "
                             f"(coremltools rejects bfloat16); compress with "
                             f"lut_dtype=torch.float16")
        shape = tuple(raw_weight(module).shape)
        coreml_vector_axis(shape, config.dim, config.vector_axis)
        if isinstance(module, CONV_TRANSPOSE_TYPES) and config.dim > 1:
            raise ValueError("a ConvTranspose's vector palette: coremltools converts its weight "
                             "transposed, so the vectors would change axis; use dim=1")
        if config.lut_quantization is not None and config.enable_per_channel_scale:
            raise ValueError(f"lut_quantization={config.lut_quantization!r} with per-channel "
                             f"scales: coremltools' PyTorch frontend cannot apply both the "
                             f"palette's scale and the per-channel scales to one weight; use "
                             f"enable_per_channel_scale=False, or lut_quantization=None")
    except ValueError as error:
        raise ValueError(f"layer {name!r} cannot be deployed to Core ML: {error}") from None


def layer_buffers(record, weight_rank: int) -> dict[str, Tensor]:
    """The `_COREML_/weight/*` buffers of one snapped layer (a snapping.SnappedLayer)."""
    # (G, k, d); a quantized palette's float values (exact), which the frontend requantizes.
    codebook = record.codebook if record.lut_quantization is None else record.palette()
    groups, k, dim = codebook.shape
    width = 2 ** index_bits(record.bits)
    if width > k:  # copies of entry 0 after it: a tie goes to the lowest index, never to these
        padding = codebook[:, :1].expand(groups, width - k, dim)
        codebook = torch.cat([codebook, padding], dim=1)
    blocks = (groups,) + (1,) * (weight_rank - 1)
    buffers = {
        "compression_type": torch.tensor([PALETTIZATION]),
        "lut": codebook.reshape(blocks + (width, dim)).clone(),
    }
    if record.lut_quantization is not None:
        buffers["compression_type"] = torch.tensor([PALETTIZATION, QUANTIZATION])
        buffers["quantization_n_bits"] = torch.tensor(QUANTIZED_BITS)
        buffers["quantization_scale"] = record.lut_scale.reshape(blocks + (1, 1)).clone()
        if record.lut_zero_point is not None:
            buffers["zero_point"] = record.lut_zero_point.reshape(blocks + (1, 1)).clone()
    axis = coreml_vector_axis(record.shape, dim, record.vector_axis)
    if axis is not None:
        buffers["vector_axis"] = torch.tensor(axis)
    if record.scale is not None:
        buffers["palettization_scale"] = record.scale.reshape(
            (-1,) + (1,) * (weight_rank - 1)).clone()
    return buffers


@torch.no_grad()
def finalize(compressor) -> nn.Module:
    """Snap the compressor's model and attach coremltools' palettization buffers; returns the
    model, ready for torch.jit.trace and coremltools.convert.

    The buffers are not persistent: the model's state_dict (and the export) are unchanged, while
    a traced model carries them to the converter. Raises ValueError naming the layer for a palette
    Core ML cannot hold. Calling it again refreshes the buffers.
    """
    modules = dict(compressor.model.named_modules())
    for name, config in compressor.configs.items():
        check_deployable(name, modules[name], config, compressor.lut_dtype)
    compressor.snap_weights()
    for name, record in compressor.snapped.items():
        buffers = layer_buffers(record, len(record.shape))
        for member in (name, *compressor.tied.get(name, ())):
            module = modules[member]
            for key in [key for key in module._buffers if key.startswith(f"{PREFIX}/weight/")]:
                del module._buffers[key]  # a scale or vector axis of an earlier call must go
            for key, value in buffers.items():
                module.register_buffer(f"{PREFIX}/weight/{key}",
                                       value.to(module.weight.device), persistent=False)
    compressor.model.register_buffer(f"{PREFIX}/metadata_version",
                                     torch.tensor(METADATA_VERSION), persistent=False)
    return compressor.model


def _coremltools():
    try:
        import coremltools
    except ImportError as error:
        raise ImportError(f"Core ML conversion needs coremltools ({error}): {INSTALL_HINT}") \
            from error
    return coremltools


def _check_scaled_output_vectors(compressor) -> None:
    """Before iOS26, coremltools folds per-channel scales into one palette per output channel,
    which vectors along the output channels straddle: its conversion fails, so say why first."""
    modules = dict(compressor.model.named_modules())
    for name, config in compressor.configs.items():
        shape = tuple(raw_weight(modules[name]).shape)
        if (config.enable_per_channel_scale and config.dim > 1
                and coreml_vector_axis(shape, config.dim, config.vector_axis) == 0):
            raise ValueError(
                f"layer {name!r}: a vector palette along the output channels with per-channel "
                f"scales converts only for minimum_deployment_target=ct.target.iOS26 or later "
                f"(for earlier targets coremltools folds the scales into one palette per output "
                f"channel, which the {config.dim}-channel vectors straddle); pass that target, or "
                f"compress with enable_per_channel_scale=False")


def _check_quantized_vectors(compressor) -> None:
    """Before iOS26, coremltools reorders a quantized LUT's dequantization in front of the lookup
    and drops the vector axis doing so (the conversion fails): say why first."""
    for name, config in compressor.configs.items():
        if config.lut_quantization is not None and config.dim > 1:
            raise ValueError(
                f"layer {name!r}: a quantized ({config.lut_quantization}) vector palette "
                f"converts only for minimum_deployment_target=ct.target.iOS26 or later (for "
                f"earlier targets coremltools moves the palette's dequantization in front of the "
                f"lookup and loses the vector axis); pass that target, or compress it with "
                f"dim=1 or lut_quantization=None")


def to_coreml(compressor, example_inputs, path=None, **convert_kwargs):
    """finalize(), torch.jit.trace(model, example_inputs) and coremltools.convert; returns the
    MLModel and saves it to `path` (an .mlpackage) when given.

    convert_kwargs go to coremltools.convert. minimum_deployment_target defaults to iOS18 and must
    be iOS18 / macOS15 or later (earlier targets silently drop grouped, vector and scaled
    palettes); the model is converted to an ML program; `inputs` defaults to one TensorType per
    example input, at its shape; with float32 palettes compute_precision defaults to FLOAT32 (the
    converter would otherwise round them to float16).
    """
    ct = _coremltools()
    target = convert_kwargs.pop("minimum_deployment_target", None)
    target = ct.target.iOS18 if target is None else target
    if not isinstance(target, ct.target) or target < ct.target.iOS18:
        raise ValueError(f"minimum_deployment_target={target!r}: palettes with groups, vectors "
                         f"or per-channel scales need iOS18 / macOS15 or later (before it "
                         f"coremltools keeps the weights dense); use ct.target.iOS18 or later")
    if convert_kwargs.get("convert_to", "mlprogram") != "mlprogram":
        raise ValueError(f"convert_to={convert_kwargs['convert_to']!r}: palettized weights are "
                         f"an ML program feature; use convert_to='mlprogram'")
    if target < ct.target.iOS26:
        _check_scaled_output_vectors(compressor)
        _check_quantized_vectors(compressor)
    if compressor.lut_dtype == torch.float32:  # else the converter rounds the palettes to float16
        convert_kwargs.setdefault("compute_precision", ct.precision.FLOAT32)
    examples = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not examples or not all(isinstance(x, Tensor) for x in examples):
        raise ValueError("example_inputs must be a tensor or a tuple of tensors, the inputs of "
                         "one forward of the model")
    off_cpu = sorted({str(t.device) for t in compressor.model.parameters()
                      if t.device.type != "cpu"})
    if off_cpu:
        raise ValueError(f"the model has parameters on {off_cpu}: coremltools converts from the "
                         f"CPU; move it there first (compressor.cpu())")
    model = finalize(compressor)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, tuple(x.cpu() for x in examples))
    finally:
        model.train(was_training)
    convert_kwargs.setdefault("inputs", [ct.TensorType(shape=tuple(x.shape)) for x in examples])
    mlmodel = ct.convert(traced, minimum_deployment_target=target, convert_to="mlprogram",
                         **{k: v for k, v in convert_kwargs.items() if k != "convert_to"})
    if path is not None:
        mlmodel.save(os.fspath(path))
    return mlmodel


# -- reading a converted model back --------------------------------------------------------------

class CoreMLPalette(NamedTuple):
    """One palettized weight of an ML program, as stored.

    lut: (B0, ..., k, d) palettes (blocks of the weight axes), float, or int8 / uint8 for a
    quantized LUT; indices: uint array, one index per vector, the weight's shape with
    vector_axis divided by d; scale: (B0, 1, ...) blocks of the weight (per output channel, or
    per palette for a quantized LUT) or None; scale_on_lut: whether the scale multiplies the LUT
    entries (coremltools stores that form for targets before iOS26: a per-channel scale then
    with one palette per output channel) rather than the dense weight; offset: the zero point
    subtracted before the scale (uint8 LUTs), the scale's shape, or None.
    """

    lut: np.ndarray
    indices: np.ndarray
    index_bits: int
    vector_axis: int | None
    scale: np.ndarray | None
    scale_on_lut: bool
    offset: np.ndarray | None = None

    def _shift_scale(self, values: np.ndarray, trailing: int) -> np.ndarray:
        """(values - offset) * scale in float32, the scale's blocks spread over `values` (whose
        last `trailing` axes the scale does not have)."""
        def spread(array):
            array = array.astype(np.float32).reshape(array.shape + (1,) * trailing)
            for axis, (size, target) in enumerate(zip(array.shape, values.shape)):
                if size not in (1, target):
                    array = np.repeat(array, target // size, axis=axis)
            return array

        if self.offset is not None:
            values = values - spread(self.offset)  # exact: small integers
        return values * spread(self.scale)

    def dense(self) -> np.ndarray:
        """The weight the op produces (float32)."""
        lut = self.lut.astype(np.float32)
        if self.scale is not None and self.scale_on_lut:
            lut = self._shift_scale(lut, trailing=2)
        *blocks, k, dim = lut.shape
        indices = self.indices.astype(np.int64)
        axis = self.vector_axis
        shape = list(indices.shape)
        if dim > 1:
            shape[axis] *= dim
        out = np.empty(shape, dtype=np.float32)
        # Block b of axis a covers shape[a] / blocks[a] consecutive entries.
        for block in np.ndindex(*blocks):
            where = tuple(slice(b * (n // m), (b + 1) * (n // m))
                          for b, n, m in zip(block, indices.shape, blocks))
            values = lut[block][indices[where]]  # (..., d)
            if dim > 1:
                values = np.moveaxis(values, -1, axis + 1)
                values = values.reshape(values.shape[:axis] + (-1,) + values.shape[axis + 2:])
            else:
                values = values[..., 0]
            out_where = tuple(slice(b * (n // m), (b + 1) * (n // m))
                              for b, n, m in zip(block, shape, blocks))
            out[out_where] = values
        if self.scale is not None and not self.scale_on_lut:
            out = self._shift_scale(out, trailing=0)
        return out


def read_palettes(mlmodel) -> dict[str, CoreMLPalette]:
    """The palettized weights of a converted MLModel (its in-memory MIL program), keyed by the
    weight's name in the program (coremltools writes "features.0.weight" as
    "features_0_weight")."""
    _coremltools()  # a clear error when it is missing
    from coremltools.converters.mil.mil import types

    program = getattr(mlmodel, "_mil_program", None)
    if program is None:
        raise ValueError("the MLModel holds no MIL program (a model loaded from disk): read the "
                         "one coremltools.convert returned")
    found = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type != "constexpr_lut_to_dense":
                continue
            lut_op = op.lut.op
            scale, offset, on_lut, name = None, None, False, op.outputs[0].name
            if lut_op is not None and lut_op.op_type == "constexpr_blockwise_shift_scale":
                lut, scale, on_lut = lut_op.data.val, lut_op.scale.val, True
                scale = scale.reshape(scale.shape[:-2])  # (B0, 1, ..., 1) of the weight's rank
                if lut_op.offset is not None:
                    offset = lut_op.offset.val.reshape(scale.shape)
                # The weight's name is on the first op of the pair (the op it converted to).
                name = lut_op.outputs[0].name
            else:
                lut = op.lut.val
                children = op.outputs[0].child_ops
                if len(children) == 1 and children[0].op_type == "constexpr_blockwise_shift_scale":
                    scale = children[0].scale.val
                    if children[0].offset is not None:
                        offset = children[0].offset.val
            vector_axis = None if op.vector_axis is None else int(op.vector_axis.val)
            bits = int(types.builtin_to_string(op.indices.dtype).removeprefix("uint"))
            found[name] = CoreMLPalette(lut, op.indices.val, bits, vector_axis, scale, on_lut,
                                        offset)
    return found


# -- coremltools' DKMPalettizerConfig -------------------------------------------------------------

# coremltools' per-module defaults (ModuleDKMPalettizerConfig) for the options translated here.
CT_DEFAULTS = {"n_bits": None, "weight_threshold": 2048, "granularity": "per_tensor",
               "group_size": None, "enable_per_channel_scale": False, "milestone": 0,
               "cluster_dim": None, "lut_dtype": "f32", "palett_tau": 1e-4,
               "palett_epsilon": 1e-4, "kmeans_max_iter": 3, "kmeans_init": "auto"}
# Options that change the result and that dkm_kernels does not implement: only their defaults.
CT_FIXED = {"channel_axis": 0, "quantize_activations": False, "palett_mode": "dkm",
            "cluster_permute": None, "palett_lambda": 0.0, "add_extra_centroid": False,
            "enforce_zero": False, "palett_cluster_tol": 0.0, "percentage_palett_enable": 1.0,
            "kmeans_error_bnd": 0.0}
# Options about how coremltools computes (memory, sharding, activation quantization, its
# k-means restarts), or deprecated aliases: nothing to translate.
CT_IGNORED = ("palett_max_mem", "palett_min_tsize", "palett_unique", "palett_shard",
              "palett_batch_mode", "palett_dist", "kmeans_batch_threshold",
              "kmeans_opt1d_threshold", "kmeans_n_init", "zero_threshold", "prune_threshold",
              "quant_min", "quant_max", "dtype", "per_channel_scaling_factor_scheme",
              "partition_size", "cluster_dtype")
# coremltools' lut_dtype, by its strings (DKMPalettizerConfig) or torch dtypes (its post-training
# palettizers): a float palette dtype, or an 8-bit integer palette (lut_quantization).
CT_LUT_DTYPES = {"f16": torch.float16, "float16": torch.float16, torch.float16: torch.float16,
                 "f32": torch.float32, "float32": torch.float32, torch.float32: torch.float32,
                 "bf16": torch.bfloat16, "b16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 torch.bfloat16: torch.bfloat16}
CT_LUT_QUANTIZATIONS = {"i8": "int8", "int8": "int8", torch.int8: "int8",
                        "u8": "uint8", "uint8": "uint8", torch.uint8: "uint8"}
CT_KMEANS_INITS = ("auto", "kmeans++", "cpu.kmeans++")
# The bits coremltools uses when n_bits is None: 4 for Linear, 2 for the other modules.
CT_DEFAULT_BITS = {"Linear": 4, "Conv1d": 2, "Conv2d": 2, "Conv3d": 2, "Embedding": 2}
# Module types coremltools palettizes that dkm_kernels does not cluster.
CT_OTHER_TYPES = ("LayerNorm", "MultiheadAttention")


def _plain(value):
    """An enum of coremltools' config (granularity) as its string."""
    return getattr(value, "value", value)


def _module_config_dict(config, where: str) -> dict:
    if hasattr(config, "as_dict"):  # a ModuleDKMPalettizerConfig
        config = config.as_dict()
    if not isinstance(config, dict):
        raise ValueError(f"{where}: a module config is a ModuleDKMPalettizerConfig or its dict, "
                         f"got {type(config).__name__}")
    known = set(CT_DEFAULTS) | set(CT_FIXED) | set(CT_IGNORED)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{where}: unknown coremltools option(s) {unknown}")
    return {key: _plain(value) for key, value in config.items()}


def _translate_module_config(config, where: str, shared: dict):
    """One coremltools module config (or None, or a list) as compress_model config dict(s);
    `shared` collects the options that are one per model in dkm_kernels (milestone, lut_dtype)."""
    if config is None:
        return None
    if isinstance(config, (list, tuple)):
        return [_translate_module_config(item, f"{where}[{i}]", shared)
                for i, item in enumerate(config)]
    options = {**CT_DEFAULTS, **CT_FIXED, **_module_config_dict(config, where)}
    changed = sorted(key for key, default in CT_FIXED.items() if options[key] != default)
    if changed:
        raise ValueError(f"{where}: {', '.join(f'{k}={options[k]!r}' for k in changed)}: not "
                         f"supported by dkm_kernels (leave {'it' if len(changed) == 1 else 'them'}"
                         f" at coremltools' default)")
    lut = options["lut_dtype"]
    if lut not in CT_LUT_DTYPES and lut not in CT_LUT_QUANTIZATIONS:
        names = [key for key in (*CT_LUT_DTYPES, *CT_LUT_QUANTIZATIONS) if isinstance(key, str)]
        raise ValueError(f"{where}: lut_dtype={lut!r} is not one of {names} (or torch.float16, "
                         f"torch.float32, torch.bfloat16, torch.int8, torch.uint8)")
    if options["kmeans_init"] not in CT_KMEANS_INITS:
        raise ValueError(f"{where}: kmeans_init={options['kmeans_init']!r}: dkm_kernels "
                         f"initialises with k-means++; use one of {list(CT_KMEANS_INITS)}")
    shared_options = [("milestone", options["milestone"])]
    if lut in CT_LUT_DTYPES:  # an integer palette's scale takes the float dtype of the others
        shared_options.append(("lut_dtype", CT_LUT_DTYPES[lut]))
    for key, value in shared_options:
        if shared.setdefault(key, value) != value:
            raise ValueError(f"{where}: {key}={options[key]!r}, while another module config "
                             f"has {shared[key]!r}: dkm_kernels has one {key} per model")
    granularity = options["granularity"]
    if granularity not in ("per_tensor", "per_grouped_channel"):
        raise ValueError(f"{where}: granularity={granularity!r} is not supported")
    translated = {
        "weight_threshold": options["weight_threshold"],
        "group_size": options["group_size"] if granularity == "per_grouped_channel" else None,
        "enable_per_channel_scale": options["enable_per_channel_scale"],
        "tau": options["palett_tau"], "epsilon": options["palett_epsilon"],
        "max_iter": options["kmeans_max_iter"], "init_method": "kmeans++",
        "lut_quantization": CT_LUT_QUANTIZATIONS.get(lut),
    }
    if options["n_bits"] is not None:  # else the module type's default (CT_DEFAULT_BITS)
        translated["bits"] = options["n_bits"]
    if options["cluster_dim"] is not None:
        translated["dim"] = options["cluster_dim"]
        # coremltools' vectors run along the output channels (its vector_ch_axis 0).
        translated["vector_axis"] = "output" if options["cluster_dim"] > 1 else "flat"
    return translated


def from_coremltools_config(config) -> dict:
    """compress_model settings equivalent to a coremltools DKMPalettizerConfig (or its dict):
    `compress_model(model, **from_coremltools_config(config))`.

    Translated: n_bits, weight_threshold, granularity / group_size, cluster_dim (vectors along
    the output channels, as coremltools lays them), enable_per_channel_scale (dkm_kernels' scale
    is max |w| per channel, coremltools' "abs" scheme), milestone (steps; one per model),
    lut_dtype (f16, f32, bf16: the palettes' dtype, one per model; i8, u8 or torch.int8,
    torch.uint8: lut_quantization "int8" / "uint8" for that module, its scales in the float dtype
    of the others, float32 by default), palett_tau, palett_epsilon, kmeans_max_iter,
    module_name_configs (regular expressions matching whole names), module_type_configs, and the
    global config; lists of configs by weight_threshold too. With none of the three, coremltools'
    default scheme (4-bit Linear, 2-bit Conv and Embedding, weight_threshold 2048). Options about
    how coremltools computes (memory, sharding, k-means restarts) have nothing to translate;
    options that change the result and that dkm_kernels lacks (activation quantization,
    enforce_zero, cluster_permute, ...) raise a ValueError naming them.

    coremltools 9.0's DKMPalettizer accepts lut_dtype i8 / u8 but trains and finalizes exactly as
    with f32 (its LUT fake-quantizer stays disabled, and finalize registers a float LUT): here the
    training is the same, and snapping quantizes the palette as coremltools' post-training
    palettizers do (dkm_kernels.snapping), so the Core ML model holds the 8-bit LUT.
    The settings target Core ML (target="coreml"), with no first/last or small-layer rule.
    """
    if hasattr(config, "module_type_configs"):  # a DKMPalettizerConfig
        parts = {"global_config": config.global_config,
                 "module_type_configs": dict(config.module_type_configs),
                 "module_name_configs": dict(config.module_name_configs)}
    elif isinstance(config, dict):
        unknown = sorted(set(config) - {"global_config", "module_type_configs",
                                        "module_name_configs"})
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; a DKMPalettizerConfig has "
                             f"global_config, module_type_configs and module_name_configs")
        parts = {"global_config": config.get("global_config"),
                 "module_type_configs": dict(config.get("module_type_configs") or {}),
                 "module_name_configs": dict(config.get("module_name_configs") or {})}
    else:
        raise ValueError(f"config must be a coremltools DKMPalettizerConfig or its dict, got "
                         f"{type(config).__name__}")
    if parts["global_config"] is None and not parts["module_type_configs"] \
            and not parts["module_name_configs"]:
        parts["module_type_configs"] = {name: {"n_bits": bits, "cluster_dim": 1}
                                        for name, bits in CT_DEFAULT_BITS.items()}
    shared: dict = {}
    type_configs = {}
    default_scheme = _is_default_scheme(config)
    for key, value in parts["module_type_configs"].items():
        name = key if isinstance(key, str) else getattr(key, "__name__", repr(key))
        if name in CT_OTHER_TYPES:
            if value is not None and not default_scheme:
                raise ValueError(f"module_type_configs[{name!r}]: dkm_kernels clusters Conv, "
                                 f"Linear and Embedding weights, not {name}; set it to None")
            continue
        type_configs[key] = _translate_module_config(value, f"module_type_configs[{name!r}]",
                                                     shared)
    global_config = _translate_module_config(parts["global_config"], "global_config", shared)
    # Modules no name or type config covers get the global config (None: not clustered); the
    # transposed convolutions coremltools does not palettize.
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding):
        if cls not in type_configs and cls.__name__ not in type_configs:
            type_configs[cls] = global_config
    for cls in CONV_TRANSPOSE_TYPES:
        type_configs.setdefault(cls, None)
    name_configs = {pattern: _translate_module_config(value, f"module_name_configs[{pattern!r}]",
                                                      shared)
                    for pattern, value in parts["module_name_configs"].items()}
    return {
        "conv_config": {"bits": CT_DEFAULT_BITS["Conv2d"], "dim": 1},
        "fc_config": {"bits": CT_DEFAULT_BITS["Linear"], "dim": 1},
        "embedding_config": {"bits": CT_DEFAULT_BITS["Embedding"], "dim": 1},
        "module_type_configs": type_configs,
        "module_name_configs": name_configs,
        "milestone": shared.get("milestone", 0),
        "lut_dtype": shared.get("lut_dtype", CT_LUT_DTYPES[CT_DEFAULTS["lut_dtype"]]),
        "skip_first_last": False,
        "small_layer_threshold": 0,
        "target": "coreml",
    }


def _is_default_scheme(config) -> bool:
    """Whether a DKMPalettizerConfig holds only the default scheme coremltools fills in when no
    config is given (it includes LayerNorm and MultiheadAttention, which are skipped here)."""
    if not hasattr(config, "module_type_configs") or config.global_config is not None \
            or config.module_name_configs:
        return False
    from coremltools.optimize.torch.palettization.palettization_config import (
        _default_module_type_configs)
    return dict(config.module_type_configs) == dict(_default_module_type_configs)
