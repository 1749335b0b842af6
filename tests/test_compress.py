"""compress_model / DKMCompressor: the seed README's API, configs, overrides, errors, milestone,
checkpoint resume."""
import io

import pytest
import torch
import torch.nn as nn

from dkm_kernels import DKMCompressor, DKMLayer, compress_model
from shared_models import assert_same_state, seeded


class SmallNet(nn.Module):
    """Stands in for torchvision's resnet18 in the seed README: conv, BN, linear, embedding-free."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # 216 weights
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 64, 5, padding=2)  # 12800 weights
        self.mix = nn.Conv2d(64, 32, 3, padding=1)  # 18432 weights
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(128, 96)  # 12288 weights
        self.head = nn.Linear(96, 10)  # 960 weights

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.mix(torch.relu(self.body(x))))
        return self.head(torch.relu(self.fc1(self.pool(x).flatten(1))))


def small_net(seed=0):
    return seeded(SmallNet, seed)


def batches(count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(10, (4,), generator=gen))
            for _ in range(count)]


def test_seed_readme_quick_start_runs_unchanged(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataloader = batches()
    model = small_net()
    # --- the seed README's quick start, with `dkm` renamed to `dkm_kernels` ---
    from dkm_kernels import compress_model
    from dkm_kernels.utils import print_compression_summary

    compressor = compress_model(
        model,
        bits=2,
        dim=1,
        tau=2e-5,
        skip_first_last=True,
    )
    info = compressor.get_compression_info()
    print_compression_summary(info)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.008, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    compressor.train()
    for images, labels in dataloader:
        optimizer.zero_grad()
        outputs = compressor(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
    compressor.snap_weights()
    export = compressor.export_compressed()
    torch.save(export, "compressed_model.pt")
    # ---
    printed = capsys.readouterr().out
    for name in ("body", "mix", "fc1"):
        assert name in printed
    assert "stem" in printed and "first layer" in printed and "last layer" in printed
    assert set(export["codebooks"]) == {"body", "mix", "fc1"}
    assert (tmp_path / "compressed_model.pt").exists()
    assert int(compressor.step) == len(dataloader)


def test_seed_multi_dim_example_and_paper_notation():
    compressor = compress_model(small_net(), bits=6, conv_config={"bits": 6, "dim": 8},
                                fc_config={"bits": 6, "dim": 4}, tau=2e-5)
    configs = {name: config.notation for name, config in compressor.configs.items()}
    # body/mix: conv 6/8; fc1: fc 6/4; stem and head are skipped as first and last.
    assert configs == {"body": "6/8", "mix": "6/8", "fc1": "6/4"}
    assert compressor.get_layer("body").get_codebook().shape == (64, 8)
    same = compress_model(small_net(), config="cv:6/8,fc:6/4", tau=2e-5)
    assert {n: c.notation for n, c in same.configs.items()} == configs
    strings = compress_model(small_net(), conv_config="6/8", fc_config="6/4", tau=2e-5)
    assert {n: c.notation for n, c in strings.configs.items()} == configs


def test_small_layer_rule_skipping_and_overrides():
    compressor = compress_model(small_net(), bits=3, skip_first_last=False)
    configs = {name: config.notation for name, config in compressor.configs.items()}
    # stem (216) and head (960) are below 10,000 weights: 8-bit scalar.
    assert configs == {"stem": "8/1", "body": "3/1", "mix": "3/1", "fc1": "3/1", "head": "8/1"}

    compressor = compress_model(small_net(), bits=3, small_layer_threshold=0,
                                layer_configs={"head": {"bits": 2}, "mix": None,
                                               "stem": "4/4"})
    configs = {name: config.notation for name, config in compressor.configs.items()}
    # Named layers are compressed even though first/last; None leaves one uncompressed.
    assert configs == {"stem": "4/4", "body": "3/1", "fc1": "3/1", "head": "2/1"}
    assert compressor.skipped == {"mix": "layer_configs: None"}
    assert not isinstance(getattr(compressor.model.mix, "parametrizations", None), nn.ModuleDict)


def test_parameters_and_optimizer_see_the_original_weights():
    model = small_net()
    before = [p for p in model.parameters()]
    compressor = compress_model(model, bits=2)
    after = list(compressor.parameters())
    assert len(after) == len(before) and all(a is b for a, b in zip(
        sorted(after, key=id), sorted(before, key=id)))
    original = compressor.model.body.parametrizations.weight.original
    snapshot = original.detach().clone()
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.1)
    images, labels = batches(1)[0]
    nn.CrossEntropyLoss()(compressor(images), labels).backward()
    assert original.grad is not None and original.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(original, snapshot)


def test_eval_mode_uses_the_hard_assignment():
    compressor = compress_model(small_net(), bits=2, tau=1e-4)
    compressor.train()
    compressor(batches(1)[0][0])
    compressor.eval()
    layer = compressor.get_layer("mix")
    codebook = layer.get_codebook().reshape(-1)
    weight = compressor.model.mix.weight
    assert bool((weight.reshape(-1, 1) == codebook).any(dim=1).all())


def test_per_grouped_channel_and_multi_dim_configs():
    compressor = compress_model(
        small_net(), bits=3, dim=4, group_size=16, tau="auto", enable_per_channel_scale=True,
        skip_first_last=False, small_layer_threshold=0,
        layer_configs={"stem": {"group_size": 8, "dim": 2}, "head": {"group_size": 5}})
    shapes = {name: tuple(layer.get_codebook().shape)
              for name, layer in compressor.dkm_layers.items()}
    assert shapes == {"stem": (8, 2), "body": (4, 8, 4), "mix": (2, 8, 4), "fc1": (6, 8, 4),
                      "head": (2, 8, 4)}
    images, labels = batches(1)[0]
    nn.CrossEntropyLoss()(compressor(images), labels).backward()
    assert compressor.model.body.parametrizations.weight.original.grad is not None
    info = compressor.get_compression_info()
    body = next(entry for entry in info["layers"] if entry["name"] == "body")
    # 12800 weights / 4 per vector * 3 bits; 4 palettes of 8 x 4 fp16; 64 fp16 scales.
    assert (body["index_bytes"], body["codebook_bytes"], body["scale_bytes"]) == (1200, 256, 128)


@pytest.mark.parametrize("kwargs, words", [
    (dict(bits=0), ["'body'", "bits"]),
    (dict(bits=2.5), ["'body'", "bits"]),
    (dict(dim=3), ["'body'", "dim=3"]),
    (dict(group_size=3), ["'body'", "group_size=3"]),
    (dict(tau=0.0), ["'body'", "tau"]),
    (dict(conv_config={"bits": 2, "dims": 4}), ["conv_config", "dims"]),
    (dict(layer_configs={"fc1": {"dim": 7}}), ["'fc1'", "dim=7"]),
    (dict(layer_configs={"fc9": None, "body.x": {}}), ["fc9", "body.x"]),
    (dict(config="cv:6/8,xx:2/1"), ["config", "cv:6/8"]),
])
def test_bad_configs_name_the_layer_and_the_option(kwargs, words):
    with pytest.raises(ValueError) as error:
        compress_model(small_net(), **kwargs)
    for word in words:
        assert word in str(error.value)


def test_milestone_trains_unclustered_first():
    plain = small_net()
    compressor = compress_model(small_net(), bits=1, tau=1e-4, milestone=2)
    layer = compressor.get_layer("mix")
    assert not bool(layer.initialized)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.05)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    for images, labels in batches(2):  # identical to the float model until the milestone
        output, plain_output = compressor(images), plain(images)
        assert torch.equal(output, plain_output)
        for out, opt in ((output, optimizer), (plain_output, plain_optimizer)):
            opt.zero_grad()
            nn.CrossEntropyLoss()(out, labels).backward()
            opt.step()
    assert not bool(layer.initialized)
    initial = small_net().mix.weight.detach().reshape(-1, 1)
    images = batches(1, seed=1)[0][0]
    compressor.eval()  # initialises from the current weights, without moving the centroids
    compressor(images)
    assert bool(layer.initialized)
    at_milestone = plain.mix.weight.detach().reshape(-1, 1)
    codebook = layer.get_codebook()  # k-means++ picks weight values
    assert bool((codebook == at_milestone.T).any(dim=1).all())
    assert not bool((codebook == initial.T).any(dim=1).all())
    compressor.train()
    clustered = compressor(images)
    assert int(compressor.step) == 3
    assert not torch.equal(clustered, plain(images))


def _train_steps(compressor, optimizer, data):
    for images, labels in data:
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(compressor(images), labels).backward()
        optimizer.step()


def test_checkpoint_resumes_training_exactly():
    data = batches(4)
    compressor = compress_model(small_net(), bits=2, tau="auto", group_size=8, seed=0)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.01, momentum=0.9)
    _train_steps(compressor, optimizer, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": compressor.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _train_steps(compressor, optimizer, data[3:])
    expected = {k: v.clone() for k, v in compressor.state_dict().items()}

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = compress_model(small_net(seed=1), bits=2, tau="auto", group_size=8, seed=5)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.01, momentum=0.9)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert int(resumed.step) == 3
    _train_steps(resumed, resumed_optimizer, data[3:])
    state = resumed.state_dict()
    assert_same_state(state, expected)
    assert "model.mix.parametrizations.weight.0.centroids" in state


def test_fit_kmeans_and_snap_leave_plain_weights():
    compressor = compress_model(small_net(), bits=2, seed=0)
    compressor.fit_kmeans()
    layer = compressor.get_layer("body")
    compressor.eval()
    images = batches(1)[0][0]
    hard = compressor(images)
    compressor.snap_weights()
    assert not hasattr(compressor.model.body, "parametrizations")
    assert isinstance(compressor.model.body.weight, nn.Parameter)
    codebook = layer.get_codebook().half().float().reshape(-1)
    assert len(torch.unique(compressor.model.body.weight)) <= 4
    assert bool((compressor.model.body.weight.reshape(-1, 1) == codebook).any(dim=1).all())
    # Only the fp16 rounding of the palette separates the snapped model from eval mode.
    torch.testing.assert_close(compressor(images), hard, rtol=1e-2, atol=1e-2)
    compressor.snap_weights()  # a second call does nothing
    assert isinstance(compressor, DKMCompressor) and isinstance(layer, DKMLayer)
