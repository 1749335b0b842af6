"""Quantized palettes (lut_quantization="int8" / "uint8"): snapping against a float64 hand
computation of coremltools' symmetric LUT quantization, the same integers and scales as
coremltools' own, training unchanged, and sizes that count the 8-bit entries with their scales.
(Export, loading and the file's checks: test_export.py, test_export_validation.py; Core ML:
test_coreml.py.)"""
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from dkm_kernels import DKMLayer, compress_model
from dkm_kernels.export import export_bytes
from dkm_kernels.layer import rows_to_weight
from dkm_kernels.snapping import dequantize_palette, quantize_palette

ZERO_POINT = {"int8": 0, "uint8": 127}
NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc=nn.Linear(16, 32), act=nn.ReLU(),
                                     mid=nn.Linear(32, 32), out=nn.Linear(32, 8)))


LAYERS = {"fc": {"bits": 3, "dim": 2, "group_size": 8},  # grouped vector palettes
          "mid": {"bits": 4, "enable_per_channel_scale": True, "tau": "auto"},
          "out": {"bits": 5}}


def trained(kind, lut_dtype=torch.float16, steps=2):
    model = net()
    compressor = compress_model(model, tau=1e-3, skip_first_last=False, small_layer_threshold=0,
                                seed=0, lut_dtype=lut_dtype, lut_quantization=kind,
                                layer_configs=LAYERS)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.05)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        compressor(x).square().mean().backward()
        optimizer.step()
    return model, compressor


def by_hand(centroids, kind, lut_dtype):
    """coremltools' LINEAR_SYMMETRIC LUT quantization of each palette, in float64 and numpy:
    (stored integers, scale in lut_dtype, the palette's values exactly)."""
    c = centroids.astype(np.float64)
    scale = (np.abs(c).max(axis=(1, 2)) / 127).astype(NUMPY_DTYPES[lut_dtype])  # one rounding
    scale = np.maximum(scale, np.finfo(NUMPY_DTYPES[lut_dtype]).tiny)
    s = scale.astype(np.float64)[:, None, None]
    q = np.clip(np.rint(c / s), -127, 127)  # rint: ties to even
    return q + ZERO_POINT[kind], scale, q * s  # q * s: exact in float64


@pytest.mark.parametrize("lut_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_snapping_quantizes_each_palette_as_computed_by_hand(kind, lut_dtype):
    model, compressor = trained(kind, lut_dtype)
    modules = dict(model.named_modules())
    originals = {name: modules[name].parametrizations.weight.original.detach().clone()
                 for name in LAYERS}
    compressor.snap_weights()
    for name, layer in compressor.dkm_layers.items():
        record = compressor.snapped[name]
        centroids = layer.centroids.reshape(layer.groups, layer.n_clusters, layer.dim).numpy()
        stored, scale, palette = by_hand(centroids, kind, lut_dtype)
        assert record.lut_quantization == kind
        assert record.codebook.dtype == {"int8": torch.int8, "uint8": torch.uint8}[kind]
        assert np.array_equal(record.codebook.numpy().astype(np.int64), stored)
        assert record.lut_scale.dtype == lut_dtype
        assert np.array_equal(record.lut_scale.numpy(), scale)
        if kind == "uint8":
            assert record.lut_zero_point.tolist() == [127] * layer.groups
        else:
            assert record.lut_zero_point is None
        palette32 = palette.astype(np.float32)  # one rounding of the exact values
        assert np.array_equal(record.palette().numpy(), palette32)
        # Every weight vector took a nearest quantized entry (float64 distances; float32
        # rounding of the distances only decides between entries at the same distance).
        weight = originals[name].double()
        channel_scale = None if record.scale is None else record.scale.double().reshape(-1, 1)
        if channel_scale is not None:
            weight = weight / channel_scale
        rows = layer.rows(weight).numpy()  # (G, M, d)
        distances = ((rows[:, :, None, :] - palette[:, None, :, :]) ** 2).sum(-1)
        chosen = np.take_along_axis(distances, record.indices.numpy()[..., None], -1)[..., 0]
        assert np.all(chosen <= distances.min(-1) * (1 + 1e-5) + 1e-12)
        # The snapped weight is palette[index] (times the channel scale), exactly.
        values = np.take_along_axis(palette32, record.indices.numpy()[..., None], 1)
        expected = rows_to_weight(torch.from_numpy(values), record.shape, layer.vector_axis)
        if record.scale is not None:  # one float32 product, as decoding computes it
            expected = expected * record.scale.float().reshape(-1, 1)
        assert torch.equal(modules[name].weight.detach(), expected)


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_the_same_integers_and_scales_as_coremltools(kind):
    utils = pytest.importorskip("coremltools.optimize._utils",
                                reason="the comparison needs coremltools (pip install coremltools)")
    centroids = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(4)) * 0.05
    centroids[1, 5, 1] = 0.7  # one palette with an outlier
    centroids[2, :4, 0] = torch.tensor([127, 2.5, -3.5, 0.5]) * 2.0 ** -7  # halfway entries
    q, scale, zero_point = quantize_palette(centroids, kind, torch.float32)
    for group in range(3):
        theirs, their_scale, their_zero_point = utils.compute_qparams(
            centroids[group].numpy(), nbits=8, signed=kind == "int8",
            quantization_mode="LINEAR_SYMMETRIC", dtype=np.float32, block_sizes=[0, 0])
        assert np.array_equal(q[group].numpy(), theirs)
        assert scale[group].item() == their_scale.item()
        if kind == "uint8":
            assert zero_point[group].item() == their_zero_point.item() == 127
        else:
            assert zero_point is None and their_zero_point is None


def test_halfway_entries_round_to_even_as_numpy_and_coremltools_do():
    step = 2.0 ** -7  # the scale of a palette whose largest entry is 127 steps: exact
    centroids = torch.tensor([127, 2.5, 3.5, -2.5, -0.5, 0.5, 126.5]).reshape(1, -1, 1) * step
    for kind, zero_point in ZERO_POINT.items():
        q, scale, _ = quantize_palette(centroids, kind, torch.float32)
        assert scale.tolist() == [step]
        assert (q.reshape(-1).long() - zero_point).tolist() == [127, 2, 4, -2, 0, 0, 126]


def test_an_all_zero_palette_gets_the_smallest_scale_and_zero_entries():
    q, scale, zero_point = quantize_palette(torch.zeros(2, 4, 1), "uint8", torch.float16)
    assert scale.tolist() == [torch.finfo(torch.float16).tiny] * 2
    assert q.tolist() == [[[127]] * 4] * 2
    assert torch.equal(dequantize_palette(q, scale, zero_point), torch.zeros(2, 4, 1))


def test_training_and_evaluation_do_not_see_the_quantization():
    """As in coremltools' DKMPalettizer: the palettes are quantized when they are snapped."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    runs = {}
    for kind in (None, "int8"):
        model, compressor = trained(kind)
        compressor.eval()
        runs[kind] = (compressor(x), {name: layer.get_codebook()
                                      for name, layer in compressor.dkm_layers.items()})
    assert torch.equal(runs[None][0], runs["int8"][0])
    assert all(torch.equal(runs[None][1][name], runs["int8"][1][name]) for name in LAYERS)


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_sizes_count_the_8_bit_entries_with_their_scales_and_zero_points(kind):
    _, compressor = trained(kind, steps=0)
    info = {entry["name"]: entry for entry in compressor.get_compression_info()["layers"]}
    zero_point_bytes = 1 if kind == "uint8" else 0
    assert info["fc"]["codebook_bytes"] == 4 * (8 * 2 + 2 + zero_point_bytes)  # G=4, k=8, d=2
    assert info["out"]["codebook_bytes"] == 32 + 2 + zero_point_bytes
    assert info["out"]["lut_quantization"] == kind
    export = compressor.export_compressed()
    assert export_bytes(export) == compressor.get_compression_info()["compressed_bytes"]


@pytest.mark.parametrize("value,words", [
    ("int4", "lut_quantization must be None, 'int8' or 'uint8'"),
    (torch.float16, "lut_quantization must be"),
])
def test_bad_lut_quantization_is_named(value, words):
    with pytest.raises(ValueError, match=f"layer 'fc': {words}"):
        compress_model(net(), skip_first_last=False, layer_configs={"fc": {
            "lut_quantization": value}})
    with pytest.raises(ValueError, match=words):
        DKMLayer(nn.Parameter(torch.randn(8, 4)), n_clusters=4, lut_quantization=value)


def test_an_integer_lut_dtype_points_to_lut_quantization():
    with pytest.raises(ValueError, match="lut_quantization='int8'"):
        compress_model(net(), lut_dtype=torch.int8)


def test_torch_dtypes_name_the_quantization_too():
    compressor = compress_model(net(), bits=2, skip_first_last=False, small_layer_threshold=0,
                                lut_quantization=torch.uint8)
    assert {config.lut_quantization for config in compressor.configs.values()} == {"uint8"}
