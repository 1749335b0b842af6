"""What large models need around the op: evaluation before snapping served from a cached hard
weight, k-means++ over the distinct values of 16-bit weights, a progress bar over the layers, and
a registry of clusterable module types."""
import pytest
import torch
from torch import nn

import dkm_kernels
from dkm_kernels import init, modules


def bfloat16_layer(shape=(64, 32), **kwargs):
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    return weight, dkm_kernels.DKMLayer(weight, n_clusters=8, tau="auto", seed=0, **kwargs)


def counting_hard_weight(layer, monkeypatch):
    calls = []
    real = layer.hard_weight
    monkeypatch.setattr(layer, "hard_weight", lambda w=None: calls.append(1) or real(w))
    return calls


def test_evaluation_reuses_the_hard_weight_until_something_changes(monkeypatch):
    weight, layer = bfloat16_layer()
    weight = nn.Parameter(weight.float())
    layer.eval()
    calls = counting_hard_weight(layer, monkeypatch)
    first = layer(weight)
    assert torch.equal(layer(weight), first) and len(calls) == 1
    with torch.no_grad():  # an optimizer step: the weight changes in place
        weight.mul_(1.5)
    moved = layer(weight)
    assert len(calls) == 2
    layer(weight)
    assert len(calls) == 2
    assert torch.equal(moved, layer.hard_weight(weight))  # a direct call: 3
    layer.fit_kmeans(weight, iterations=3)  # the centroids change
    refitted = layer(weight)
    assert len(calls) == 4 and torch.equal(refitted, layer.hard_weight(weight))  # 5
    other = nn.Parameter(weight.detach().clone())  # another tensor with the same values
    layer(other)
    assert len(calls) == 6
    layer.train()
    layer(weight)
    assert layer._hard_cache is None  # training frees it


def test_compressed_model_evaluates_without_reclustering(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    compressor = dkm_kernels.compress_model(model, bits=2, skip_first_last=False,
                                            small_layer_threshold=0, seed=0,
                                            lut_dtype=torch.float32)
    x = torch.randn(4, 32)
    model.train()
    model(x).sum().backward()
    model.eval()
    calls = [counting_hard_weight(layer, monkeypatch) for layer in compressor.dkm_layers.values()]
    expected = model(x)
    for _ in range(3):
        assert torch.equal(model(x), expected)
    assert [len(c) for c in calls] == [1, 1]
    compressor.snap_weights()
    assert all(layer._hard_cache is None for layer in compressor.dkm_layers.values())
    assert torch.equal(model(x), expected)  # float32 palettes: snapping rounds nothing


def test_counted_kmeans_plus_plus_draws_by_count():
    values = torch.tensor([[0.0], [1.0], [5.0], [0.0]])
    counts = torch.tensor([1.0, 3.0, 0.0, 0.0])  # 5.0 and the last row are never drawn
    gen = torch.Generator().manual_seed(0)
    firsts = torch.cat([init.kmeans_plus_plus(values, 1, gen, counts=counts)
                        for _ in range(2000)])
    assert set(firsts.flatten().tolist()) == {0.0, 1.0}
    share = (firsts == 1.0).float().mean().item()
    assert abs(share - 0.75) < 0.04  # 3 of 4 weights hold 1.0 (binomial sd 0.01)
    both = init.kmeans_plus_plus(values, 2, gen, counts=counts)
    assert sorted(both.flatten().tolist()) == [0.0, 1.0]  # the two values with weights, once each
    with pytest.raises(ValueError, match="counts"):
        init.kmeans_plus_plus(values, 2, gen, counts=counts[:3])


def test_sixteen_bit_layer_initialises_over_distinct_values(monkeypatch):
    monkeypatch.setattr(init, "_kmeans_plus_plus_single",
                        lambda *a: pytest.fail("k-means++ ran over every weight"))
    fused = init._fused_kmeans_plus_plus
    monkeypatch.setattr(init, "_fused_kmeans_plus_plus", lambda w, k, gen, counts: fused(w, k, gen, counts)
                        if counts is not None else pytest.fail("k-means++ ran over every weight"))
    weight, layer = bfloat16_layer((256, 512), group_size=128)
    rows = weight.reshape(2, -1, 1).float()
    centroids = layer.centroids
    assert all(torch.isin(centroids[g].flatten(), rows[g].flatten()).all() for g in range(2))
    # tau: AUTO_TAU_FRACTION of the mean over all weights of the squared nearest distance.
    nearest = (rows - centroids.transpose(1, 2)).square().min(dim=-1).values.mean()
    expected = dkm_kernels.layer.AUTO_TAU_FRACTION * nearest.item()
    assert layer.tau == pytest.approx(expected, rel=1e-5)


def test_progress_bar_over_the_layers(capsys):
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm")
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
    dkm_kernels.compress_model(model, bits=2, skip_first_last=False, small_layer_threshold=0,
                               progress=True)
    assert "DKM: initialising layers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress must be True or False"):
        dkm_kernels.compress_model(nn.Sequential(nn.Linear(4, 4)), progress="yes")


class Transposed(nn.Module):
    """A Linear that stores its weight (in, out), as GPT-2's Conv1D does."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight


def test_registered_module_types_are_clustered(monkeypatch):
    monkeypatch.setattr(modules, "_REGISTRY", dict(modules._REGISTRY))
    model = nn.Sequential(Transposed(8, 16), nn.Linear(16, 4))
    assert [name for name, _ in modules.clusterable_modules(model)] == ["1"]
    modules.register_module_type(Transposed, kind="fc", output_axis=1)
    compressor = dkm_kernels.compress_model(model, skip_first_last=False, small_layer_threshold=0,
                                            fc_config="2/1")
    assert set(compressor.dkm_layers) == {"0", "1"}
    assert modules.layer_type(model[0]) == "Transposed"
    with pytest.raises(ValueError, match="axis 1"):
        dkm_kernels.compress_model(nn.Sequential(Transposed(8, 16)), skip_first_last=False,
                                   layer_configs={"0": {"group_size": 4}})
    with pytest.raises(ValueError, match="kind must be one of"):
        modules.register_module_type(Transposed, kind="attention")
