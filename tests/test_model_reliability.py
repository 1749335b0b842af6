"""DKM on models as users build and train them: gradient checkpointing, weights read twice, tied
weights, NaN weights, meta-device models, option validation, transposed convolutions, sparse
embeddings, dtypes, repeated compression."""
import io

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import dkm_kernels
from dkm_kernels import DKMLayer, compress as compress_module, compress_model, layer as layer_module
from dkm_kernels.export import export_bytes, load_compressed
from shared_models import TiedLM

CLUSTER_ALL = dict(skip_first_last=False, small_layer_threshold=0, seed=0)


def run_region(block, x, checkpointing):
    """block(x), plainly (checkpointing None) or as one checkpointed region: "reentrant" or
    "non-reentrant"."""
    if checkpointing is None:
        return block(x)
    return checkpoint(block, x, use_reentrant=checkpointing == "reentrant")


class MLP(nn.Module):
    def __init__(self, checkpointing=None):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)
        self.checkpointing = checkpointing

    def block(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x):
        return run_region(self.block, x, self.checkpointing)


class ConvNet(nn.Module):
    """One checkpointed region per convolution, as transformer blocks are checkpointed."""

    def __init__(self, checkpointing=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.checkpointing = checkpointing

    def forward(self, x):
        x = torch.relu(run_region(self.conv1, x, self.checkpointing))
        x = torch.relu(run_region(self.conv2, x, self.checkpointing))
        return self.fc(x.mean(dim=(2, 3)))


def _inputs(model_cls, step, reentrant):
    gen = torch.Generator().manual_seed(step)
    shape = (4, 16) if model_cls is MLP else (2, 3, 6, 6)
    # Reentrant checkpointing passes gradients only through inputs that require them.
    return torch.randn(shape, generator=gen).requires_grad_(reentrant)


def _train(model_cls, checkpointing, steps=3):
    torch.manual_seed(0)
    model = model_cls(checkpointing)
    compressor = compress_model(model, bits=2, tau=1e-3, **CLUSTER_ALL)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.1)
    grads = []
    for step in range(steps):
        optimizer.zero_grad()
        # The model itself, as training frameworks call it: its hooks make the step.
        model(_inputs(model_cls, step, checkpointing == "reentrant")).square().sum().backward()
        grads.append([p.grad.clone() for p in compressor.parameters()])
        optimizer.step()
    centroids = {name: layer.get_codebook() for name, layer in compressor.dkm_layers.items()}
    return grads, centroids, compressor


@pytest.mark.parametrize("model_cls", [MLP, ConvNet])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_checkpointing_recomputes_the_same_clustering(model_cls, checkpointing):
    expected_grads, expected_centroids, _ = _train(model_cls, None)
    grads, centroids, compressor = _train(model_cls, checkpointing)
    for step_grads, step_expected in zip(grads, expected_grads):
        for grad, expected in zip(step_grads, step_expected):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    for name, value in expected_centroids.items():
        torch.testing.assert_close(centroids[name], value, rtol=1e-5, atol=1e-7)
    assert int(compressor.step) == 3  # model(x), called directly, counts its steps


def test_a_forward_records_and_the_next_forward_commits():
    compressor = compress_model(MLP(), bits=2, tau=1e-3, **CLUSTER_ALL)
    layer = compressor.get_layer("fc1")
    start = layer.centroids.clone()
    compressor.model(torch.randn(4, 16))
    # The step's result waits; reading the weight again in the step starts from the same place.
    assert torch.equal(layer.centroids, start)
    assert not torch.equal(layer.pending_centroids, start)
    pending = layer.pending_centroids.clone()
    compressor.model(torch.randn(4, 16))
    assert torch.equal(layer.centroids, pending)


def test_checkpoint_with_pending_centroids_resumes_exactly():
    data = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def steps(compressor, optimizer, batch):
        for x in batch:
            optimizer.zero_grad()
            compressor(x).square().sum().backward()
            optimizer.step()

    torch.manual_seed(0)
    compressor = compress_model(MLP(), bits=2, tau="auto", **CLUSTER_ALL)
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.1)
    steps(compressor, optimizer, data[:2])
    buffer = io.BytesIO()
    torch.save(compressor.state_dict(), buffer)
    assert "model.fc1.parametrizations.weight.0.pending_centroids" in compressor.state_dict()
    model_state = {k: v.clone() for k, v in compressor.model.state_dict().items()}
    steps(compressor, optimizer, data[2:])

    torch.manual_seed(1)
    resumed = compress_model(MLP(), bits=2, tau="auto", **CLUSTER_ALL)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.get_layer("fc1").tau == compressor.get_layer("fc1").tau
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    for p, q in zip(resumed.model.state_dict().values(), model_state.values()):
        assert torch.equal(p, q)
    steps(resumed, resumed_optimizer, data[2:])
    for key, value in compressor.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_training_forward_reads_nothing_from_the_device(monkeypatch):
    """Mirrors of initialized / tau / step: no bool(), int(), float() or item() of a tensor."""
    compressor = compress_model(MLP(), bits=2, tau="auto", milestone=1, **CLUSTER_ALL)
    compressor(torch.randn(2, 16))  # before the milestone
    compressor(torch.randn(2, 16))  # initialises the centroids (a one-time read)

    def fake_dkm(weights, centroids, tau, max_iter, epsilon, backend="auto", process_group=None,
                 uniquify=None):
        assert isinstance(tau, float)
        return dkm_kernels.DKMResult(weights * 1.0, centroids.clone(), torch.tensor(1))

    def no_read(*args):
        raise AssertionError("a tensor was read on the host during the forward")

    monkeypatch.setattr(layer_module, "dkm", fake_dkm)
    monkeypatch.setattr(compress_module, "dkm_many",  # the step's batch: the same fake per layer
                        lambda problems, backend: [fake_dkm(*problem) for problem in problems])
    for method in ("__bool__", "__int__", "__float__", "item"):
        monkeypatch.setattr(torch.Tensor, method, no_read)
    compressor(torch.randn(2, 16)).sum().backward()
    monkeypatch.undo()
    assert int(compressor.step) == 3


def _count_dkm(monkeypatch):
    """Counts the clusterings run: one per `dkm` call of a layer, one per problem of the step's
    batched `dkm_many` call."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return dkm_kernels.dkm(*args, **kwargs)

    def counting_many(problems, **kwargs):
        calls.extend([1] * len(problems))
        return dkm_kernels.dkm_many(problems, **kwargs)

    monkeypatch.setattr(layer_module, "dkm", counting)
    monkeypatch.setattr(compress_module, "dkm_many", counting_many)
    return calls


class ReadsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x):
        return x @ self.fc.weight.T + x @ self.fc.weight  # two reads of one weight


def test_a_weight_read_twice_in_a_forward_is_clustered_once(monkeypatch):
    torch.manual_seed(0)
    compressor = compress_model(ReadsTwice(), bits=2, tau=1e-3, **CLUSTER_ALL)
    calls = _count_dkm(monkeypatch)
    x = torch.randn(3, 12)
    compressor(x).sum().backward()
    assert len(calls) == 1
    compressor(x)
    assert len(calls) == 2  # the next forward is the next step
    compressor.eval()
    first = compressor.model.fc.weight
    assert torch.equal(first, compressor.model.fc.weight)  # outside a forward: nothing cached


def test_a_tied_weight_has_one_layer_one_palette_and_one_clustering(monkeypatch):
    torch.manual_seed(0)
    model = TiedLM()
    compressor = compress_model(model, bits=2, tau=1e-2, **CLUSTER_ALL)
    assert compressor.tied == {"emb": ["head"]}
    assert set(compressor.configs) == set(compressor.dkm_layers) == {"emb", "mid"}
    layer = compressor.get_layer("emb")
    assert model.head.parametrizations.weight[0] is layer
    assert model.head.parametrizations.weight.original is model.emb.parametrizations.weight.original
    assert len(list(compressor.parameters())) == 3  # emb/head weight, mid weight, mid bias
    calls = _count_dkm(monkeypatch)
    tokens = torch.randint(40, (2, 5))
    compressor(tokens).sum().backward()
    assert len(calls) == 2  # emb (and head) once, mid once
    compressor.eval()
    assert torch.equal(model.head.weight, model.emb.weight)
    info = compressor.get_compression_info()  # before snapping: the follower is parametrized
    compressor.snap_weights()
    assert model.head.weight is model.emb.weight
    assert len(torch.unique(model.emb.weight)) <= 4
    export = compressor.export_compressed()
    assert info["compressed_bytes"] == export_bytes(export)
    assert "head.weight" not in export["uncompressed"]
    plain = load_compressed(export, TiedLM())
    assert plain.head.weight is plain.emb.weight
    assert torch.equal(plain(tokens), compressor(tokens))


def test_a_tied_weight_follows_its_first_module():
    compressor = compress_model(TiedLM(), bits=2)  # emb is the first layer: skipped, head too
    assert compressor.skipped["head"].startswith("shares its weight with 'emb'")
    with pytest.raises(ValueError, match=r"layer_configs\['head'\].*configure 'emb'"):
        compress_model(TiedLM(), bits=2, layer_configs={"head": {"bits": 3}})
    apart = compress_model(TiedLM(), bits=2, layer_configs={"head": None}, **CLUSTER_ALL)
    assert apart.tied == {} and "shares its weight with 'emb'" in apart.skipped["head"]


class CheckpointedLM(TiedLM):
    """The tied head and a weight read twice, inside one checkpointed region."""

    def __init__(self, checkpointing=None):
        super().__init__()
        self.checkpointing = checkpointing

    def block(self, h):
        h = torch.tanh(self.mid(h) + h @ self.mid.weight)
        return self.head(h)

    def forward(self, tokens):
        return run_region(self.block, self.emb(tokens), self.checkpointing)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_checkpointing_a_region_with_tied_and_repeated_reads(checkpointing):
    def train(checkpointing):
        torch.manual_seed(0)
        model = CheckpointedLM(checkpointing)
        compressor = compress_model(model, bits=2, tau=1e-2, **CLUSTER_ALL)
        grads = []
        for step in range(2):
            tokens = torch.randint(40, (2, 5), generator=torch.Generator().manual_seed(step))
            compressor.zero_grad()
            model(tokens).logsumexp(-1).sum().backward()
            grads.append([p.grad.clone() for p in compressor.parameters()])
        return grads

    for step_grads, step_expected in zip(train(checkpointing), train(None)):
        for grad, expected in zip(step_grads, step_expected):
            # Reentrant checkpointing runs the tied weight's backward once per path: the sum
            # is the same up to rounding.
            torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-6)


def test_nan_weights_in_evaluation_name_the_layer():
    compressor = compress_model(MLP(), bits=2, **CLUSTER_ALL).eval()
    with torch.no_grad():
        compressor.model.fc2.parametrizations.weight.original[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'fc2'.*NaN or Inf"):
        compressor(torch.randn(2, 16))
    compressor.train()
    with pytest.raises(ValueError, match="layer 'fc2'.*NaN or Inf"):
        compressor(torch.randn(2, 16))

    weight = nn.Parameter(torch.randn(8, 4))
    layer = DKMLayer(weight, n_clusters=4, seed=0, name="encoder.fc")
    layer.eval()
    with torch.no_grad():
        weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match="layer 'encoder.fc'.*NaN or Inf"):
        layer()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.get_assignments()


def test_nan_weights_come_out_nan_where_reading_the_device_is_not_free(monkeypatch):
    weight = nn.Parameter(torch.randn(8, 4))
    layer = DKMLayer(weight, n_clusters=4, seed=0).eval()
    with torch.no_grad():
        weight[3, 1] = float("nan")
    monkeypatch.setattr(layer_module, "_reads_are_free", lambda device: False)
    out = layer()
    assert torch.isnan(out[3, 1]) and torch.isfinite(out[:3]).all()


def test_a_meta_model_initialises_from_the_weights_loaded_later():
    torch.manual_seed(0)
    real = MLP()
    state = {k: v.clone() for k, v in real.state_dict().items()}
    expected = compress_model(real, bits=2, tau="auto", **CLUSTER_ALL)

    with torch.device("meta"):
        model = MLP()
    compressor = compress_model(model, bits=2, tau="auto", **CLUSTER_ALL)
    compressor.to_empty(device="cpu")
    assert not bool(compressor.get_layer("fc1").initialized)
    compressor.model.load_state_dict(state, strict=True)  # a plain model's keys load too
    x = torch.randn(3, 16)
    out = compressor(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected(x))
    for name, layer in expected.dkm_layers.items():
        assert torch.equal(compressor.get_layer(name).get_codebook(), layer.get_codebook())
        assert compressor.get_layer(name).tau == layer.tau


def test_a_meta_weight_cannot_be_clustered_before_it_has_values():
    with torch.device("meta"):
        weight = nn.Parameter(torch.empty(8, 4))
    layer = DKMLayer(weight, n_clusters=4, seed=0)  # waits for real values
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        layer.initialize()


@pytest.mark.parametrize("kwargs, words", [
    (dict(backend="cuda"), ["backend", "'cuda'"]),
    (dict(epsilon=float("inf")), ["epsilon"]),
    (dict(epsilon=float("nan")), ["epsilon"]),
    (dict(max_iter=10**9), ["max_iter=1000000000", "MAX_ITER_LIMIT", "max_iter <="]),
    (dict(seed=1.5), ["seed", "1.5"]),
    (dict(seed=True), ["seed"]),
    (dict(lut_dtype=torch.int8), ["lut_dtype"]),
    (dict(enable_per_channel_scale=1), ["enable_per_channel_scale", "True or False"]),
])
def test_options_are_checked_when_the_layer_is_built(kwargs, words):
    with pytest.raises(ValueError) as error:
        DKMLayer(nn.Parameter(torch.randn(12, 4)), n_clusters=4, **kwargs)
    for word in words:
        assert word in str(error.value)
    with pytest.raises(ValueError) as error:
        compress_model(MLP(), **{"skip_first_last": False, **kwargs})
    for word in words:
        assert word in str(error.value)


def test_max_iter_is_bounded_by_the_memory_of_its_centroid_history():
    # 65536 centroids of 4 floats: 1 MiB per iteration kept for backward.
    with pytest.raises(ValueError, match=r"layer 'fc1': max_iter=5000 .*"
                                         r"MAX_CENTROID_HISTORY_BYTES.*use max_iter <= 1023"):
        compress_model(MLP(), bits=16, dim=4, max_iter=5000, **CLUSTER_ALL)


def test_a_named_layer_names_itself_in_its_errors():
    with pytest.raises(ValueError, match="layer 'enc': dim=5"):
        DKMLayer(nn.Parameter(torch.randn(12, 4)), n_clusters=4, dim=5, name="enc")
    layer = DKMLayer(nn.Parameter(torch.randn(12, 4)), n_clusters=4, name="enc")
    with pytest.raises(ValueError, match="layer 'enc': weight has shape"):
        layer(torch.randn(4, 12))


def test_compress_model_validates_each_layer_once(monkeypatch):
    calls = []
    original = layer_module.check_layer_options

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "check_layer_options", counting)
    monkeypatch.setattr(dkm_kernels.compress, "check_layer_options", counting)
    compress_model(MLP(), bits=2, **CLUSTER_ALL)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="skip_first_last"):
        compress_model(MLP(), skip_first_last=0)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(10, 6, sparse=True)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2)  # weight (6, 4, 3, 3): out on axis 1
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, tokens):
        x = self.tokens(tokens).mean(1)[:, :, None, None].expand(-1, -1, 3, 3)
        return self.out(torch.relu(self.up(x)))


def test_transposed_convolutions_cluster_and_sparse_embeddings_are_skipped():
    torch.manual_seed(0)
    compressor = compress_model(Decoder(), bits=2, **CLUSTER_ALL)
    assert set(compressor.configs) == {"up", "out"}
    assert compressor.skipped == {"tokens": compressor.skipped["tokens"]}
    assert "sparse=True gradients" in compressor.skipped["tokens"]
    tokens = torch.randint(10, (2, 3))
    compressor(tokens).sum().backward()
    assert compressor.model.up.parametrizations.weight.original.grad is not None
    compressor.snap_weights()
    assert len(torch.unique(compressor.model.up.weight)) <= 4
    plain = load_compressed(compressor.export_compressed(), Decoder())
    assert torch.equal(plain.up.weight, compressor.model.up.weight)

    grouped = compress_model(Decoder(), bits=2, group_size=2, **CLUSTER_ALL)
    assert "axis 1" in grouped.skipped["up"]
    with pytest.raises(ValueError, match=r"layer_configs\['up'\].*axis 1"):
        compress_model(Decoder(), bits=2, layer_configs={"up": {"enable_per_channel_scale": True}})


def test_centroids_stay_float32_when_the_model_changes_dtype():
    compressor = compress_model(MLP(), bits=2, tau="auto", **CLUSTER_ALL)
    compressor.to(torch.bfloat16)
    layer = compressor.get_layer("fc1")
    assert layer.centroids.dtype == layer.pending_centroids.dtype == torch.float32
    compressor(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    compressor(torch.randn(4, 16, dtype=torch.bfloat16))
    codebook = layer.get_codebook()
    # The moves are kept in float32, not rounded to bfloat16's 8-bit mantissa.
    assert codebook.dtype == torch.float32
    assert not torch.equal(codebook, codebook.bfloat16().float())


def test_compressing_twice_is_refused_before_anything_changes():
    model = MLP()
    compress_model(model, bits=2, **CLUSTER_ALL)
    with pytest.raises(ValueError, match="compressed twice"):
        compress_model(model, bits=3)


def test_a_state_dict_written_before_pending_centroids_loads():
    compressor = compress_model(MLP(), bits=2, **CLUSTER_ALL)
    compressor(torch.randn(2, 16))
    state = {k: v for k, v in compressor.state_dict().items() if "pending" not in k}
    fresh = compress_model(MLP(), bits=2, **CLUSTER_ALL)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.get_layer("fc1").pending_centroids,
                       state["model.fc1.parametrizations.weight.0.centroids"])


def test_lazy_modules_must_be_materialised_first():
    model = nn.Sequential(nn.LazyLinear(16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"\['0'\] are lazy modules.*forward pass"):
        compress_model(model, **CLUSTER_ALL)
    model(torch.randn(2, 8))
    assert set(compress_model(model, bits=2, **CLUSTER_ALL).configs) == {"0", "1"}
