"""Bit-packed export: real index widths, sizes that match the stored bytes, and a loaded model that
equals the snapped one bit for bit."""
import math

import pytest
import torch
import torch.nn as nn

from dkm_kernels import compress_model, load_compressed
from dkm_kernels.export import export_bytes, pack_indices, unpack_indices
from dkm_kernels.utils import print_compression_summary
from shared_models import assert_same_state, seeded


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.conv = nn.Conv1d(12, 24, 3, padding=1)
        self.norm = nn.BatchNorm1d(24)
        self.fc = nn.Linear(24 * 6, 30)
        self.out = nn.Linear(30, 5)

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)  # (B, 12, 6)
        x = torch.relu(self.norm(self.conv(x)))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def tiny_net(seed=0):
    return seeded(TinyNet, seed)


def tokens(seed=0, batch=8):
    return torch.randint(50, (batch, 6), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 16])
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_pack_roundtrip_at_the_real_width(bits, count):
    values = torch.randint(2 ** bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_indices(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_indices(packed, bits, count), values)


def test_three_bit_indices_take_three_bits():
    packed = pack_indices(torch.tensor([5, 3, 7, 1, 0, 6, 2, 4]), 3)
    assert packed.numel() == 3
    # LSB first: 5 = 101, 3 = 110 (LSB first), 7 = 111 ... as one little-endian 24-bit number.
    number = int(packed[0]) | int(packed[1]) << 8 | int(packed[2]) << 16
    assert [(number >> (3 * i)) & 7 for i in range(8)] == [5, 3, 7, 1, 0, 6, 2, 4]
    with pytest.raises(ValueError):
        pack_indices(torch.tensor([8]), 3)


def _trained(configure, steps=3):
    compressor = configure(tiny_net())
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        optimizer.zero_grad()
        labels = torch.randint(5, (8,), generator=torch.Generator().manual_seed(100 + step))
        nn.CrossEntropyLoss()(compressor(tokens(step)), labels).backward()
        optimizer.step()
    return compressor


CONFIGS = {
    "scalar 3-bit": lambda m: compress_model(m, bits=3, tau=1e-3, skip_first_last=False,
                                             small_layer_threshold=0),
    "multi-dim, grouped, scaled": lambda m: compress_model(
        m, bits=4, dim=2, tau="auto", group_size=6, enable_per_channel_scale=True,
        skip_first_last=False, small_layer_threshold=0,
        layer_configs={"embed": {"group_size": 10, "dim": 4}, "out": {"group_size": 5}}),
    "paper protocol": lambda m: compress_model(m, config="cv:2/2,fc:3/1,emb:1/1", tau=1e-3),
    "fp32 palettes": lambda m: compress_model(m, bits=2, tau=1e-3, lut_dtype=torch.float32,
                                              small_layer_threshold=0),
    "int8 and uint8 palettes": lambda m: compress_model(
        m, bits=3, dim=2, tau="auto", group_size=6, lut_quantization="uint8",
        skip_first_last=False, small_layer_threshold=0,
        layer_configs={"embed": {"group_size": 10, "enable_per_channel_scale": True,
                                 "lut_quantization": "int8"}, "out": {"group_size": None}}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_load_reproduces_the_snapped_model_exactly(name, tmp_path):
    compressor = _trained(CONFIGS[name])
    compressor.eval()
    compressor.snap_weights()
    x = tokens(seed=9, batch=16)
    snapped_out = compressor(x)
    snapped_state = compressor.model.state_dict()

    path = tmp_path / "model.pt"
    export = compressor.save_compressed(path)
    model = load_compressed(path, tiny_net)  # a fresh architecture, other random weights
    assert not model.training
    assert_same_state(model.state_dict(), snapped_state)
    assert torch.equal(model(x), snapped_out)

    # Every stored byte is counted, and nothing else.
    info = compressor.get_compression_info()
    assert export_bytes(export) == info["compressed_bytes"]
    for entry in info["layers"]:
        packed = export["assignments"][entry["name"]]
        n_vectors = entry["params"] // entry["dim"]
        assert packed.numel() == entry["index_bytes"] == math.ceil(n_vectors * entry["bits"] / 8)
        codebook = export["codebooks"][entry["name"]]
        quantized = [export[table][entry["name"]] for table in ("lut_scales", "lut_zero_points")
                     if entry["name"] in export.get(table, {})]  # a quantized palette's
        assert sum(t.numel() * t.element_size() for t in [codebook, *quantized]) == entry[
            "codebook_bytes"]
        assert codebook.dtype == {None: compressor.lut_dtype, "int8": torch.int8,
                                  "uint8": torch.uint8}[entry["lut_quantization"]]
    assert info["compression_ratio"] == info["original_bytes"] / info["compressed_bytes"]
    loaded = torch.load(path, weights_only=True)
    assert export_bytes(loaded) == info["compressed_bytes"]


def test_sizes_and_summary(capsys):
    compressor = CONFIGS["scalar 3-bit"](tiny_net())
    info = compressor.get_compression_info()
    fc = next(entry for entry in info["layers"] if entry["name"] == "fc")
    assert fc["index_bytes"] == math.ceil(24 * 6 * 30 * 3 / 8)
    assert fc["codebook_bytes"] == 8 * 2  # 8 centroids, fp16
    float_bytes = sum(p.numel() * 4 for p in tiny_net().parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_net().buffers())
    assert info["original_bytes"] == float_bytes
    print_compression_summary(info)
    printed = capsys.readouterr().out
    assert "fc" in printed and "3/1" in printed and "smaller" in printed


def test_export_snaps_first_and_rejects_weights_changed_after_snapping():
    compressor = _trained(CONFIGS["scalar 3-bit"], steps=1)
    export = compressor.export_compressed()
    assert compressor.is_snapped and set(export["codebooks"]) == {"embed", "conv", "fc", "out"}
    with torch.no_grad():
        compressor.model.fc.weight.add_(1e-3)
    with pytest.raises(ValueError, match="'fc'"):
        compressor.export_compressed()


def test_load_into_a_module_instance_and_reject_other_files():
    compressor = _trained(CONFIGS["paper protocol"], steps=1)
    export = compressor.export_compressed()
    model = load_compressed(export, tiny_net(seed=3))
    assert torch.equal(model.fc.weight, compressor.model.fc.weight)
    with pytest.raises(ValueError, match="format"):
        load_compressed({"format": "other"}, tiny_net)


# The export code in four modules whose imports run one way: packing <- snapping <- info <- export.
EXPORT_MODULES = ("packing", "snapping", "info", "export")


def _package_imports(module_name):
    import ast
    import importlib

    path = importlib.import_module(f"dkm_kernels.{module_name}").__file__
    tree = ast.parse(open(path).read())
    return {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


@pytest.mark.parametrize("position", range(len(EXPORT_MODULES)))
def test_export_modules_import_one_way_and_never_compress(position):
    imported = _package_imports(EXPORT_MODULES[position])
    assert "compress" not in imported
    assert not imported & set(EXPORT_MODULES[position:])  # only modules before it


def test_every_name_used_elsewhere_still_imports_from_export():
    from dkm_kernels import export

    for name in ("FORMAT", "SnappedLayer", "snap_layer", "decode_weight", "pack_indices",
                 "unpack_indices", "compression_info", "export_bytes", "export_compressed",
                 "save_compressed", "decoded_state_dict", "load_compressed"):
        assert hasattr(export, name), name


@pytest.mark.parametrize("bits", [1, 3, 7, 16])
def test_pack_roundtrip_across_passes(bits, monkeypatch):
    from dkm_kernels import packing

    values = torch.randint(2 ** bits, (101,), generator=torch.Generator().manual_seed(bits))
    in_one_pass = pack_indices(values, bits)
    monkeypatch.setattr(packing, "_PACK_CHUNK", 16)  # many passes, the last one partial
    packed = pack_indices(values, bits)
    assert torch.equal(packed, in_one_pass)
    assert torch.equal(unpack_indices(packed, bits, values.numel()), values)
