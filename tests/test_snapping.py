"""Snapping refuses what the export cannot store faithfully: NaN or inf weights (they would become
palette entry 0) and weights, per-channel scales or palettes beyond the palette dtype (inf)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from dkm_kernels import compress_model, load_compressed
from dkm_kernels.export import snap_layer

# Beyond float16's largest value (65504), well inside bfloat16's and float32's.
TOO_LARGE_FOR_FP16 = 1e5


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc=nn.Linear(16, 32), act=nn.ReLU(), out=nn.Linear(32, 4)))


def compressed(**options):
    return compress_model(net(), bits=2, tau=1e-3, skip_first_last=False,
                          small_layer_threshold=0, seed=0, **options)


def set_weight(compressor, value, name="fc"):
    with torch.no_grad():
        getattr(compressor.model, name).parametrizations.weight.original[3, 5] = value


def snap_fc(compressor):
    layer = compressor.get_layer("fc")
    weight = compressor.model.fc.parametrizations.weight.original.detach()
    return snap_layer(layer, weight, compressor.configs["fc"], name="fc")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_layer(value):
    compressor = compressed()
    set_weight(compressor, value)
    with pytest.raises(ValueError, match=r"layer 'fc'.*weights are not finite"):
        snap_fc(compressor)
    with pytest.raises(ValueError, match=r"layer 'fc'.*not finite"):
        compressor.export_compressed()
    assert not compressor.snapped  # no layer was snapped before the error


@pytest.mark.parametrize("scaled", [False, True], ids=["weights", "per-channel scales"])
def test_values_beyond_float16_are_refused_and_wider_palettes_suggested(scaled):
    compressor = compressed(enable_per_channel_scale=scaled)
    set_weight(compressor, TOO_LARGE_FOR_FP16)
    what = "per-channel scales" if scaled else "weights"
    pattern = rf"layer 'fc': {what}.*float16.*lut_dtype=torch.bfloat16 or lut_dtype=torch.float32"
    with pytest.raises(ValueError, match=pattern):
        snap_fc(compressor)
    with pytest.raises(ValueError, match=pattern):
        compressor.export_compressed()


@pytest.mark.parametrize("lut_dtype", [torch.bfloat16, torch.float32])
def test_the_suggested_palette_dtypes_store_those_values(lut_dtype):
    compressor = compressed(enable_per_channel_scale=True, lut_dtype=lut_dtype)
    set_weight(compressor, TOO_LARGE_FOR_FP16)
    export = compressor.export_compressed()
    model = load_compressed(export, net)
    assert torch.isfinite(model.fc.weight).all()
    assert model.fc.weight.abs().max() > torch.finfo(torch.float16).max


@pytest.mark.parametrize("value", [float("nan"), TOO_LARGE_FOR_FP16])
def test_palettes_are_checked_too(value):
    compressor = compressed()
    with torch.no_grad():
        compressor.get_layer("fc").centroids[0] = value
    with pytest.raises(ValueError, match=r"layer 'fc': .*palette entries"):
        snap_fc(compressor)
