"""vector_axis="output": d consecutive output channels form a vector. Only how a weight becomes
rows changes, so the layout must round-trip through the layer, snapping, export and loading."""
import pytest
import torch
import torch.nn as nn

from dkm_kernels import DKMLayer, compress_model, load_compressed
from dkm_kernels.export import read_export, unpack_indices
from dkm_kernels.layer import row_elements, rows_to_weight, weight_rows
from shared_models import seeded


@pytest.mark.parametrize("shape,groups,dim", [((8, 3, 3, 3), 1, 2), ((12, 5), 3, 4),
                                              ((6, 2, 4), 2, 3), ((4, 7), 1, 4)])
def test_rows_are_output_channel_vectors_and_round_trip(shape, groups, dim):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rows = weight_rows(weight, groups, dim, "output")
    per_group = shape[0] // groups
    assert rows.shape == (groups, per_group // dim * weight[0].numel(), dim)
    # Vector (block j of d channels, position p) of group g holds W[g*per_group + j*d + t, p].
    flat = weight.reshape(shape[0], -1)
    positions = flat.shape[1]
    for g in range(groups):
        for j in range(per_group // dim):
            for p in (0, positions - 1):
                channels = [g * per_group + j * dim + t for t in range(dim)]
                assert torch.equal(rows[g, j * positions + p], flat[channels, p])
    assert torch.equal(rows_to_weight(rows, shape, "output"), weight)
    assert torch.equal(rows_to_weight(weight_rows(weight, groups, dim), shape), weight)


@pytest.mark.parametrize("axis", ["flat", "output"])
@pytest.mark.parametrize("shape,groups,dim", [((8, 3, 3, 3), 1, 2), ((12, 5), 3, 4),
                                              ((6, 2, 4), 2, 3)])
def test_row_elements_index_the_rows(shape, groups, dim, axis):
    """row_elements (a sharded weight's sample, distributed.sample_rows) indexes exactly the
    elements weight_rows puts in the chosen rows."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rows = weight_rows(weight, groups, dim, axis)
    picked = torch.randint(rows.shape[1], (groups, 9), generator=torch.Generator().manual_seed(1))
    expected = torch.gather(rows, 1, picked.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(weight.reshape(-1)[row_elements(shape, groups, dim, axis, picked)],
                       expected)


def test_output_layout_soft_and_hard_weights_are_channel_vectors():
    weight = nn.Parameter(torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1)))
    layer = DKMLayer(weight, n_clusters=4, dim=2, tau="auto", vector_axis="output", seed=0)
    hard = layer.hard_weight()
    # Every pair of channels (2j, 2j+1) at a position is one palette entry.
    pairs = hard.reshape(4, 2, -1).transpose(1, 2).reshape(-1, 2)
    codebook = layer.get_codebook()
    assert all(any(torch.equal(pair, entry) for entry in codebook) for pair in pairs)
    soft = layer()  # training mode: soft DKM, same shape, differentiable
    assert soft.shape == weight.shape
    soft.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == weight.shape


def test_output_layout_needs_dim_dividing_the_channels_of_each_palette():
    with pytest.raises(ValueError, match="output channels of each palette"):
        DKMLayer(torch.randn(6, 4), n_clusters=4, dim=4, vector_axis="output")
    with pytest.raises(ValueError, match="output channels of each palette"):
        DKMLayer(torch.randn(8, 4), n_clusters=4, dim=4, group_size=2, vector_axis="output")
    with pytest.raises(ValueError, match="vector_axis must be one of"):
        DKMLayer(torch.randn(8, 4), n_clusters=4, dim=2, vector_axis="input")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 12)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_output_layout_trains_snaps_exports_and_loads(tmp_path):
    model = seeded(SmallCNN)
    compressor = compress_model(model, bits=3, dim=4, tau="auto", vector_axis="output",
                                group_size=4, enable_per_channel_scale=True,
                                skip_first_last=False, small_layer_threshold=0, seed=0)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.05)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        optimizer.zero_grad()
        compressor(x).square().mean().backward()
        optimizer.step()
    path = tmp_path / "model.dkm.pt"
    compressor.save_compressed(path)
    export = read_export(path)
    for name in compressor.configs:
        meta = export["layer_configs"][name]
        assert meta["vector_axis"] == "output"
        snapped = dict(model.named_modules())[name].weight.detach()
        # Indices decode as output-channel vectors: rows of the snapped weight are palette rows.
        indices = unpack_indices(export["assignments"][name], meta["bits"], meta["n_vectors"])
        codebook = export["codebooks"][name].float()
        groups = meta["groups"]
        scale = export["scales"][name].float().reshape((-1,) + (1,) * (snapped.dim() - 1))
        rows = weight_rows(snapped / scale, groups, meta["dim"], "output")
        expected = torch.gather(codebook, 1, indices.reshape(groups, -1, 1).expand(
            -1, -1, meta["dim"]))
        assert torch.equal(rows, expected)
    loaded = load_compressed(path, SmallCNN)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_export_with_a_bad_vector_axis_is_rejected():
    model = seeded(SmallCNN)
    compressor = compress_model(model, bits=2, dim=2, vector_axis="output", seed=0,
                                skip_first_last=False, small_layer_threshold=0)
    export = compressor.export_compressed()
    export["layer_configs"]["conv1"]["vector_axis"] = "input"
    with pytest.raises(ValueError, match="'conv1', field 'vector_axis'"):
        read_export(export)


def test_conv_transpose_is_not_clustered_along_axis_zero():
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    compressor = compress_model(model, bits=2, dim=2, vector_axis="output",
                                skip_first_last=False, small_layer_threshold=0)
    assert "vector_axis='flat'" in compressor.skipped["0"]
    with pytest.raises(ValueError, match="vector_axis='flat'"):
        compress_model(nn.Sequential(nn.ConvTranspose2d(4, 8, 3)), skip_first_last=False,
                       layer_configs={"0": {"dim": 2, "vector_axis": "output"}})
