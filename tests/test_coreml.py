"""Core ML deployment: what a target of "coreml" refuses at compression time, and, with
coremltools installed, converted models whose LUT ops hold the learned palettes and indices bit for
bit (coremltools converts on Linux; it cannot run predictions there, so the weights the ops
produce are decoded here from the stored palettes and indices)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from dkm_kernels import compress_model
from dkm_kernels.coreml import coreml_vector_axis, index_bits
from dkm_kernels.export import export_bytes, unpack_indices
from shared_models import TiedLM, seeded


class Net(nn.Module):
    """3x3 and 1x1 convolutions and a linear layer: every layout Core ML has to express."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 24)

    def forward(self, x):
        return self.fc(torch.relu(self.point(torch.relu(self.conv(x)))).flatten(1))


def inputs(batch=4):
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(3))


# -- at compression time: what Core ML cannot hold -------------------------------------------------

def test_index_widths():
    assert [index_bits(b) for b in range(1, 9)] == [1, 2, 3, 4, 6, 6, 8, 8]
    with pytest.raises(ValueError, match="at most 8-bit"):
        index_bits(9)


def test_vector_axes_core_ml_can_express():
    assert coreml_vector_axis((16, 4, 3, 3), 1) is None
    assert coreml_vector_axis((24, 512), 4) == 1  # a Linear's input features
    assert coreml_vector_axis((32, 16, 1, 1), 8) == 1  # a 1x1 convolution's input channels
    assert coreml_vector_axis((16, 4, 3, 3), 2, "output") == 0
    with pytest.raises(ValueError, match="vector_axis='output'"):
        coreml_vector_axis((16, 4, 3, 3), 2)  # pairs straddle the 3-wide kernel rows


@pytest.mark.parametrize("options,match", [
    (dict(bits=10), "at most 8-bit"),
    (dict(bits=4, lut_dtype=torch.bfloat16), "bfloat16"),
    (dict(bits=4, dim=4), "no Core ML vector axis"),
    (dict(bits=4, lut_quantization="int8", enable_per_channel_scale=True),
     "lut_quantization='int8' with per-channel scales.*enable_per_channel_scale=False"),
])
def test_target_coreml_refuses_at_compression_time_naming_the_layer(options, match):
    model = seeded(Net)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"layer 'conv' cannot be deployed to Core ML: .*{match}"):
        compress_model(model, skip_first_last=False, small_layer_threshold=0, target="coreml",
                       **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    compress_model(seeded(Net), skip_first_last=False, small_layer_threshold=0,
                   **options)  # without the target, the same config trains


def test_target_coreml_accepts_what_it_can_lay_out():
    compressor = compress_model(
        seeded(Net), bits=7, skip_first_last=False, small_layer_threshold=0, target="coreml",
        layer_configs={"conv": {"dim": 4, "vector_axis": "output"}, "point": {"dim": 8},
                       "fc": {"dim": 4, "group_size": 8}})
    assert compressor.target == "coreml"
    with pytest.raises(ValueError, match="target must be one of"):
        compress_model(seeded(Net), target="tflite")


def test_finalize_checks_a_compressor_built_without_the_target():
    compressor = compress_model(seeded(Net), bits=4, dim=2, skip_first_last=False,
                                small_layer_threshold=0, seed=0)
    with pytest.raises(ValueError, match="layer 'conv' cannot be deployed to Core ML"):
        compressor.finalize()
    assert not compressor.snapped  # refused before snapping anything


def test_finalize_attaches_buffers_without_changing_the_state_dict():
    model = seeded(Net)
    compressor = compress_model(model, bits=5, group_size=8, enable_per_channel_scale=True,
                                tau="auto", skip_first_last=False, small_layer_threshold=0, seed=0)
    compressor.finalize()
    assert not any("_COREML_" in key for key in model.state_dict())
    export = compressor.export_compressed()  # unchanged by the buffers
    assert not any("_COREML_" in key for key in export["uncompressed"])
    buffers = dict(model.named_buffers())
    lut = buffers["point._COREML_/weight/lut"]
    assert lut.shape == (4, 1, 1, 1, 64, 1)  # 32 channels / 8, rank 4 + 2, 5 bits padded to 6
    codebook = export["codebooks"]["point"]
    assert torch.equal(lut[:, 0, 0, 0, :32], codebook)
    assert torch.equal(lut[:, 0, 0, 0, 32:], codebook[:, :1].expand(-1, 32, -1))
    assert torch.equal(buffers["point._COREML_/weight/palettization_scale"].reshape(-1),
                       export["scales"]["point"])
    assert buffers["point._COREML_/weight/compression_type"].tolist() == [2]
    assert int(buffers["_COREML_/metadata_version"]) == 1


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_finalize_attaches_the_joint_quantization_buffers_of_a_quantized_palette(kind):
    model = seeded(Net)
    compressor = compress_model(model, bits=5, group_size=8, lut_quantization=kind,
                                skip_first_last=False, small_layer_threshold=0, seed=0)
    compressor.finalize()
    export = compressor.export_compressed()
    buffers = dict(model.named_buffers())
    prefix = "point._COREML_/weight/"
    assert buffers[prefix + "compression_type"].tolist() == [2, 3]  # palettize, then quantize
    assert int(buffers[prefix + "quantization_n_bits"]) == 8
    scale = buffers[prefix + "quantization_scale"]
    assert scale.shape == (4, 1, 1, 1, 1, 1) and scale.dtype == torch.float16  # the LUT's rank
    assert torch.equal(scale.reshape(-1), export["lut_scales"]["point"])
    zero_point = 127 if kind == "uint8" else 0
    if kind == "uint8":
        assert torch.equal(buffers[prefix + "zero_point"].reshape(-1),
                           torch.full((4,), 127, dtype=torch.uint8))
    else:
        assert prefix + "zero_point" not in buffers
    # The LUT holds the palette's values, scale * (q - zero point), exactly (float64 here).
    q = export["codebooks"]["point"].double()
    values = (q - zero_point) * scale.reshape(-1, 1, 1).double()
    lut = buffers[prefix + "lut"]
    assert lut.shape == (4, 1, 1, 1, 64, 1) and lut.dtype == torch.float32
    assert torch.equal(lut[:, 0, 0, 0, :32].double(), values)
    assert torch.equal(lut[:, 0, 0, 0, 32:].double(), values[:, :1].expand(-1, 32, -1))


# -- conversion (coremltools) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("coremltools", reason="Core ML conversion needs coremltools "
                                                      "(pip install coremltools)")


def trained(options, steps=2):
    model = seeded(Net)
    compressor = compress_model(model, skip_first_last=False, small_layer_threshold=0, seed=0,
                                backend="cpu", target="coreml", **options)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        compressor(inputs()).square().mean().backward()
        optimizer.step()
    return model, compressor


def bits_of(tensor):
    """The tensor's bit patterns (so that equal means bit for bit, -0.0 and NaN included)."""
    array = np.ascontiguousarray(np.asarray(tensor))
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def check_quantized_lut(found, export, name, k):
    """A quantized palette in the program: its 8-bit entries, scale and zero point are the
    export's (coremltools stores an int8 palette without negative entries as uint8)."""
    meta = export["layer_configs"][name]
    q = export["codebooks"][name].numpy()
    lut = found.lut.reshape(found.lut.shape[0], -1, found.lut.shape[-1])
    assert lut.shape[0] == meta["groups"]
    expected = np.uint8 if meta["lut_quantization"] == "uint8" or q.min() >= 0 else np.int8
    assert lut.dtype == expected
    assert np.array_equal(lut[:, :k].astype(np.int64), q.astype(np.int64))
    assert np.array_equal(lut[:, k:], np.broadcast_to(lut[:, :1], lut[:, k:].shape))  # padding
    scale = export["lut_scales"][name].numpy()
    assert found.scale.dtype == scale.dtype  # float16 or float32, as exported
    assert np.array_equal(bits_of(found.scale.reshape(-1)), bits_of(scale))
    if meta["lut_quantization"] == "uint8":
        assert np.array_equal(found.offset.reshape(-1), export["lut_zero_points"][name].numpy())
    else:
        assert found.offset is None


def check_program(model, compressor, export, mlmodel):
    """Every clustered weight of the ML program: indices, palettes and scales equal the export's
    bit for bit, no index points at a padding entry, and the op's weight is the snapped one."""
    from dkm_kernels.coreml import read_palettes

    palettes = read_palettes(mlmodel)
    modules = dict(model.named_modules())
    assert len(palettes) == len(compressor.configs)
    for name, meta in export["layer_configs"].items():
        found = palettes[f"{name}_weight"]
        k, dim, groups = meta["n_clusters"], meta["dim"], meta["groups"]
        assert found.index_bits == index_bits(meta["bits"])
        # Indices: Core ML's (weight shape, vector axis / d) in C order is the export's order.
        indices = unpack_indices(export["assignments"][name], meta["bits"], meta["n_vectors"])
        assert np.array_equal(found.indices.reshape(-1).astype(np.int64), indices.numpy())
        assert int(found.indices.max()) < k
        codebook = export["codebooks"][name].numpy()  # (G, k, d)
        lut = found.lut.reshape(found.lut.shape[0], -1, found.lut.shape[-1])
        assert lut.shape[1:] == (2 ** found.index_bits, dim)
        channels = meta["shape"][0]
        if meta.get("lut_quantization"):
            check_quantized_lut(found, export, name, k)
        elif found.scale_on_lut:  # one palette per output channel, the scale applied to it
            assert lut.shape[0] == channels
            owner = np.arange(channels) // (channels // groups)
            assert np.array_equal(bits_of(lut[:, :k]), bits_of(codebook[owner]))
        else:
            assert np.array_equal(bits_of(lut[:, :k]), bits_of(codebook))
        if meta["per_channel_scale"]:
            assert np.array_equal(bits_of(found.scale.reshape(-1)),
                                  bits_of(export["scales"][name].numpy()))
        elif not meta.get("lut_quantization"):
            assert found.scale is None
        weight = modules[name].weight.detach().numpy()
        assert np.array_equal(bits_of(found.dense()), bits_of(weight))


CASES = {
    "scalar": dict(bits=2),
    "grouped": dict(bits=3, group_size=8),
    "scaled": dict(bits=4, enable_per_channel_scale=True, tau="auto"),
    "padded 5 and 7 bits": dict(bits=5, group_size=8, enable_per_channel_scale=True, tau="auto",
                                layer_configs={"fc": {"bits": 7}}),
    "vectors": dict(bits=4, layer_configs={"conv": {"dim": 2, "vector_axis": "output"},
                                           "point": {"dim": 4, "group_size": 8},
                                           "fc": {"dim": 8}}),
    "float32 palettes": dict(bits=3, lut_dtype=torch.float32, group_size=4),
    "int8 palettes": dict(bits=3, lut_quantization="int8", group_size=8),
    "uint8 and int8, padded, float32 scales": dict(
        bits=5, lut_quantization="uint8", lut_dtype=torch.float32,
        layer_configs={"fc": {"bits": 7, "lut_quantization": "int8"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_program_holds_the_export_bit_for_bit(ct, case):
    model, compressor = trained(CASES[case])
    export = compressor.export_compressed()
    mlmodel = compressor.to_coreml(inputs(1))
    ops = [op.op_type for op in mlmodel._mil_program.functions["main"].operations]
    assert ops.count("constexpr_lut_to_dense") == 3
    check_program(model, compressor, export, mlmodel)


def check_needs_ios26(ct, options, match):
    """Refused, naming the layer, at the default target; converted and checked at iOS26."""
    model, compressor = trained(options)
    with pytest.raises(ValueError, match=match):
        compressor.to_coreml(inputs(1))
    export = compressor.export_compressed()
    mlmodel = compressor.to_coreml(inputs(1), minimum_deployment_target=ct.target.iOS26)
    check_program(model, compressor, export, mlmodel)


def test_scaled_output_vectors_need_ios26(ct):
    check_needs_ios26(ct, dict(bits=3, dim=2, vector_axis="output", group_size=8,
                               enable_per_channel_scale=True, tau="auto"),
                      "layer 'conv'.*iOS26")


def test_quantized_vector_palettes_need_ios26(ct):
    check_needs_ios26(ct, dict(bits=4, lut_quantization="uint8",
                               layer_configs={"conv": {"dim": 2, "vector_axis": "output"},
                                              "point": {"dim": 4, "group_size": 8},
                                              "fc": {"dim": 8, "lut_quantization": "int8"}}),
                      "layer 'conv'.*quantized.*iOS26")


def test_to_coreml_refuses_targets_that_drop_the_palettes(ct):
    _, compressor = trained(dict(bits=2), steps=0)
    with pytest.raises(ValueError, match="iOS18"):
        compressor.to_coreml(inputs(1), minimum_deployment_target=ct.target.iOS17)
    with pytest.raises(ValueError, match="mlprogram"):
        compressor.to_coreml(inputs(1), convert_to="neuralnetwork")


def blob_bytes(nbytes):
    """A blob in Core ML's weight file: a 64-byte header, then the data padded to 64 bytes."""
    return 64 + 64 * math.ceil(nbytes / 64)


def test_saved_weight_file_is_the_palettes_indices_and_biases(ct, tmp_path):
    model, compressor = trained(dict(bits=3, group_size=8), steps=1)
    export = compressor.export_compressed()
    path = tmp_path / "net.mlpackage"
    compressor.to_coreml(inputs(1), path=path)
    weight_file = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    size = os.path.getsize(weight_file)
    # Expected blobs: per layer its packed indices and float16 palettes, and its float16 bias.
    expected = 64  # the file header
    for name, meta in export["layer_configs"].items():
        expected += blob_bytes(math.ceil(meta["n_vectors"] * index_bits(meta["bits"]) / 8))
        expected += blob_bytes(export["codebooks"][name].numel() * 2)
        expected += blob_bytes(export["uncompressed"][f"{name}.bias"].numel() * 2)
    # (the last blob's padding is not written)
    assert expected - 63 <= size <= expected
    # Beside the export (biases in float32 there, float16 here), the file adds only Core ML's
    # framing: at most 128 bytes per tensor and the 64-byte header.
    blobs = 3 * len(export["layer_configs"])
    assert export_bytes(export) * 0.95 < size <= export_bytes(export) + 128 * blobs + 64


def test_a_tied_weight_is_one_lut_op_for_both_modules(ct):
    model = seeded(TiedLM)
    compressor = compress_model(model, bits=3, skip_first_last=False, small_layer_threshold=0,
                                seed=0, target="coreml")
    assert compressor.tied == {"emb": ["head"]}
    export = compressor.export_compressed()
    mlmodel = compressor.to_coreml(torch.randint(40, (1, 6)))
    operations = mlmodel._mil_program.functions["main"].operations
    lut_ops = [op for op in operations if op.op_type == "constexpr_lut_to_dense"]
    assert sorted(op.outputs[0].name for op in lut_ops) == ["emb_weight", "mid_weight"]
    users = {child.op_type for op in lut_ops if op.outputs[0].name == "emb_weight"
             for child in op.outputs[0].child_ops}
    assert users == {"gather", "matmul"}  # the embedding and the head read the same palette
    check_program(model, compressor, export, mlmodel)
