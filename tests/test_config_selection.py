"""Which config a layer gets: module_name_configs (regular expressions), module_type_configs,
weight_threshold, and the translation of coremltools' DKMPalettizerConfig."""
import pytest
import torch
import torch.nn as nn

from dkm_kernels import compress_model, from_coremltools_config
from shared_models import seeded


class Blocks(nn.Module):
    """Two blocks of a 3x3 convolution, a 1x1 convolution and a linear head, plus an embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)  # 2048 weights
        self.block1 = nn.Sequential(nn.Conv2d(4, 16, 3), nn.Conv2d(16, 16, 1))  # 576, 256
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1))  # 4608, 1024
        self.head = nn.Linear(32, 128)  # 4096

    def forward(self, x):
        return x


def train_two_steps(compressor):
    """Two SGD steps of a compressed Net (below) on fixed inputs; returns the inputs."""
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        compressor(x).square().mean().backward()
        optimizer.step()
    return x


def configs_of(compressor):
    return {name: (c.bits, c.dim, c.group_size) for name, c in compressor.configs.items()}


def compress(**options):
    options.setdefault("skip_first_last", False)
    options.setdefault("small_layer_threshold", 0)
    return compress_model(seeded(Blocks), **options)


def test_name_patterns_match_whole_names_and_come_before_types():
    compressor = compress(bits=4, module_name_configs={r"block\d\.0": {"bits": 3},
                                                       r"block2\..*": None,
                                                       r"block": {"bits": 1}},  # never whole
                          module_type_configs={nn.Conv2d: {"bits": 2}, "Embedding": None})
    # the first matching pattern wins: block2.0 is block\d\.0's
    assert configs_of(compressor) == {"block1.0": (3, 1, None), "block1.1": (2, 1, None),
                                      "block2.0": (3, 1, None), "head": (4, 1, None)}
    assert compressor.skipped["block2.1"] == r"module_name_configs['block2\\..*']: None"
    assert compressor.skipped["emb"] == "module_type_configs['Embedding']: None"


def test_weight_threshold_skips_small_weights_and_configs_can_override_it():
    compressor = compress(bits=2, weight_threshold=1024, conv_config={"bits": 3},
                          module_name_configs={"block1.1": {"bits": 4, "weight_threshold": 0}})
    assert configs_of(compressor) == {"emb": (2, 1, None), "block1.1": (4, 1, None),
                                      "block2.0": (3, 1, None), "head": (2, 1, None)}
    assert compressor.skipped["block1.0"] == "weight_threshold: 576 weights, not more than 1024"
    assert "block2.1" in compressor.skipped  # 1024 is not more than 1024
    # layer_configs names a module: clustered whatever its size
    compressor = compress(weight_threshold=10_000, layer_configs={"block1.0": "3/1"})
    assert list(compressor.configs) == ["block1.0"]


def test_a_list_of_configs_picks_the_largest_threshold_below_the_size():
    compressor = compress(module_type_configs={nn.Conv2d: [
        {"bits": 2, "weight_threshold": 300}, {"bits": 4, "weight_threshold": 1000}]})
    assert {name: c.bits for name, c in compressor.configs.items() if "block" in name} == {
        "block1.0": 2, "block2.0": 4, "block2.1": 4}
    assert "block1.1" in compressor.skipped  # 256 weights: no config of the list


@pytest.mark.parametrize("options,match", [
    (dict(module_name_configs={"(": {"bits": 2}}), "not a regular expression"),
    (dict(module_type_configs={3: {"bits": 2}}), "module class or its name"),
    (dict(module_type_configs={nn.Linear: {"nbits": 2}}), "unknown option"),
    (dict(weight_threshold=-1), "weight_threshold must be"),
    (dict(module_name_configs={"head": {"bits": 2, "weight_threshold": 1.5}}), "weight_threshold"),
])
def test_bad_selection_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        compress(**options)


# -- coremltools' DKMPalettizerConfig ----------------------------------------------------------

def test_translation_of_a_config_dict():
    settings = from_coremltools_config({
        "global_config": {"n_bits": 4, "weight_threshold": 500, "milestone": 2,
                          "lut_dtype": "f16", "palett_tau": 2e-4},
        "module_type_configs": {"Embedding": None, nn.Linear: {
            "n_bits": 3, "granularity": "per_grouped_channel", "group_size": 32,
            "enable_per_channel_scale": True, "lut_dtype": "f16", "milestone": 2}},
        "module_name_configs": {r"block2\.0": {"n_bits": 2, "cluster_dim": 4,
                                               "lut_dtype": "f16", "milestone": 2}},
    })
    assert settings["milestone"] == 2 and settings["lut_dtype"] == torch.float16
    compressor = compress_model(seeded(Blocks), **settings)
    assert compressor.target == "coreml" and compressor.milestone == 2
    assert configs_of(compressor) == {"block1.0": (4, 1, None), "block2.0": (2, 4, None),
                                      "block2.1": (4, 1, None), "head": (3, 1, 32)}
    assert compressor.configs["block2.0"].vector_axis == "output"  # coremltools' layout
    assert compressor.configs["head"].enable_per_channel_scale
    assert compressor.configs["block1.0"].tau == 2e-4
    assert compressor.configs["block1.0"].max_iter == 3  # coremltools' kmeans_max_iter
    assert "block1.1" in compressor.skipped  # 256 weights, threshold 500
    assert compressor.skipped["emb"] == "module_type_configs['Embedding']: None"


def test_translation_of_the_default_scheme():
    settings = from_coremltools_config({})
    compressor = compress_model(seeded(Blocks), **settings)
    # 4-bit Linear, 2-bit Conv and Embedding, weights of more than 2048 elements, float32 LUTs
    assert configs_of(compressor) == {"block2.0": (2, 1, None), "head": (4, 1, None)}
    assert settings["lut_dtype"] == torch.float32


@pytest.mark.parametrize("config,match", [
    ({"global_config": {"n_bits": 4, "lut_dtype": "i4"}}, "lut_dtype='i4' is not one of"),
    ({"global_config": {"n_bits": 4, "enforce_zero": True}}, "enforce_zero=True"),
    ({"global_config": {"n_bits": 4, "quantize_activations": True}}, "quantize_activations"),
    ({"global_config": {"n_bits": 4, "kmeans_init": "opt1d"}}, "k-means\\+\\+"),
    ({"global_config": {"n_bits": 4, "palett_sparsity": 0.5}}, "unknown coremltools option"),
    ({"module_name_configs": {"a": {"milestone": 1}, "b": {"milestone": 2}}}, "one milestone"),
    ({"module_type_configs": {"LayerNorm": {"n_bits": 2}}}, "not LayerNorm"),
    ({"global": {}}, "unknown key"),
])
def test_untranslatable_options_are_named(config, match):
    with pytest.raises(ValueError, match=match):
        from_coremltools_config(config)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_a_coremltools_config_object_trains_and_converts(tmp_path):
    pytest.importorskip("coremltools", reason="the config object needs coremltools "
                                              "(pip install coremltools)")
    from coremltools.optimize.torch.palettization import DKMPalettizerConfig

    config = DKMPalettizerConfig.from_dict({
        "global_config": {"n_bits": 2, "weight_threshold": 100, "lut_dtype": "f16"},
        "module_name_configs": {"fc": {"n_bits": 4, "cluster_dim": 2, "lut_dtype": "f16",
                                       "weight_threshold": 100}}})
    model = seeded(Net)
    compressor = compress_model(model, seed=0, backend="cpu", **from_coremltools_config(config))
    assert configs_of(compressor) == {"conv": (2, 1, None), "fc": (4, 2, None)}
    x = train_two_steps(compressor)
    mlmodel = compressor.to_coreml(x[:1], path=tmp_path / "net.mlpackage")
    from dkm_kernels.coreml import read_palettes

    palettes = read_palettes(mlmodel)
    assert palettes["fc_weight"].vector_axis == 0 and palettes["fc_weight"].lut.shape[-1] == 2
    assert (tmp_path / "net.mlpackage").is_dir()


def test_integer_lut_dtypes_translate_to_quantized_palettes():
    settings = from_coremltools_config({
        "global_config": {"n_bits": 4, "weight_threshold": 500, "lut_dtype": "i8"},
        "module_type_configs": {"Embedding": None, nn.Linear: {"n_bits": 3,
                                                               "lut_dtype": torch.uint8}},
        "module_name_configs": {r"block2\.0": {"n_bits": 2, "lut_dtype": "u8"},
                                r"block2\.1": {"n_bits": 2, "lut_dtype": "f16",
                                               "weight_threshold": 0}}})
    assert settings["lut_dtype"] == torch.float16  # the float palette's: the scales' dtype
    compressor = compress_model(seeded(Blocks), **settings)
    assert {name: config.lut_quantization for name, config in compressor.configs.items()} == {
        "block1.0": "int8", "block2.0": "uint8", "block2.1": None, "head": "uint8"}
    # integer palettes alone: their scales in float32, coremltools' default LUT dtype
    assert from_coremltools_config({"global_config": {"n_bits": 4, "lut_dtype": "u8"}})[
        "lut_dtype"] == torch.float32
    for name, kind in (("int8", "int8"), (torch.int8, "int8"), ("uint8", "uint8")):
        settings = from_coremltools_config({"global_config": {"n_bits": 4, "lut_dtype": name}})
        assert settings["module_type_configs"][nn.Linear]["lut_quantization"] == kind


def test_a_coremltools_config_with_integer_luts_trains_and_converts():
    pytest.importorskip("coremltools", reason="the config object needs coremltools "
                                              "(pip install coremltools)")
    import numpy as np
    from coremltools.optimize.torch.palettization import DKMPalettizerConfig

    from dkm_kernels.coreml import read_palettes

    config = DKMPalettizerConfig.from_dict({
        "global_config": {"n_bits": 3, "weight_threshold": 100, "lut_dtype": "u8"},
        "module_name_configs": {"fc": {"n_bits": 4, "lut_dtype": "i8", "weight_threshold": 100,
                                       "granularity": "per_grouped_channel", "group_size": 5}}})
    model = seeded(Net)
    compressor = compress_model(model, seed=0, backend="cpu", **from_coremltools_config(config))
    x = train_two_steps(compressor)
    export = compressor.export_compressed()
    palettes = read_palettes(compressor.to_coreml(x[:1]))
    for name, kind, groups in (("conv", "uint8", 1), ("fc", "int8", 2)):
        assert export["layer_configs"][name]["lut_quantization"] == kind
        found = palettes[f"{name}_weight"]
        q = export["codebooks"][name].numpy().astype(np.int64)
        assert found.lut.dtype == (np.int8 if kind == "int8" and q.min() < 0 else np.uint8)
        assert np.array_equal(found.lut.reshape(groups, -1)[:, :q.shape[1]], q[..., 0])
        assert np.array_equal(found.scale.reshape(-1), export["lut_scales"][name].numpy())
        assert np.array_equal(found.dense(), getattr(model, name).weight.detach().numpy())


def test_the_default_config_object_translates_as_the_empty_dict():
    pytest.importorskip("coremltools", reason="the config object needs coremltools "
                                              "(pip install coremltools)")
    from coremltools.optimize.torch.palettization import DKMPalettizerConfig

    def by_name(settings):
        return {getattr(key, "__name__", key): value
                for key, value in settings["module_type_configs"].items()}

    # The object carries coremltools' whole default scheme, LayerNorm and attention included:
    # those two are not clustered here, and the rest is the same as for the empty dict.
    assert by_name(from_coremltools_config(DKMPalettizerConfig())) == by_name(
        from_coremltools_config({}))
