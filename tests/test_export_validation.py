"""load_compressed checks every field of an export against the others and against the model, and
raises a ValueError naming the layer and the field; a model it was given is never half-loaded.

Each case below corrupts one field of a valid export. "fc" is a 3-bit, 2-dim layer with per-channel
scales and four groups of 8 output channels; "out" a plain 2-bit layer.
"""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from dkm_kernels import compress_model, load_compressed
from dkm_kernels.export import decoded_state_dict, read_export
from export_files import NOT_EXPORTS
from shared_models import assert_same_state


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc=nn.Linear(16, 32), act=nn.ReLU(), out=nn.Linear(32, 8)))


@pytest.fixture(scope="module")
def valid_export():
    compressor = compress_model(
        net(), bits=2, tau=1e-3, skip_first_last=False, small_layer_threshold=0, seed=0,
        layer_configs={"fc": {"bits": 3, "dim": 2, "group_size": 8,
                              "enable_per_channel_scale": True}})
    return compressor.export_compressed()


def set_meta(layer, field, value):
    def corrupt(export):
        export["layer_configs"][layer][field] = value
    return corrupt


def delete(*path):
    def corrupt(export):
        table = export
        for key in path[:-1]:
            table = table[key]
        del table[path[-1]]
    return corrupt


def set_entry(table, name, make):
    def corrupt(export):
        export[table][name] = make(export[table].get(name))
    return corrupt


def fewer_clusters(export):
    """A 3-bit layer that claims 4 palette entries: its stored indices reach past them."""
    export["layer_configs"]["fc"]["n_clusters"] = 4
    export["codebooks"]["fc"] = export["codebooks"]["fc"][:, :4].clone()


def with_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


def with_inf(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[-1] = float("inf")
    return tensor


# (case, corruption, layer named in the error or None for the export itself, field named)
FIELD_CASES = [
    ("lut_dtype unknown", lambda e: e.update(lut_dtype="float8_e4m3fn"), None, "lut_dtype"),
    ("lut_dtype not the palettes'", lambda e: e.update(lut_dtype="float32"), "fc", "codebooks"),
    ("table missing", delete("scales"), None, "scales"),
    ("table not a dict", lambda e: e.update(codebooks=[]), None, "codebooks"),
    ("unknown top-level field", lambda e: e.update(notes="hi"), None, "notes"),
    ("codebook of no layer", set_entry("codebooks", "ghost", lambda _: torch.zeros(1, 4, 1)),
     "ghost", "codebooks"),
    ("uncompressed not a tensor", set_entry("uncompressed", "fc.bias", lambda t: t.tolist()),
     None, "uncompressed"),
    ("layer config not a dict", lambda e: e["layer_configs"].update(out=[2, 1]), "out",
     "layer_configs"),
    ("field missing", delete("layer_configs", "fc", "bits"), "fc", "bits"),
    ("field unknown", set_meta("fc", "colour", "red"), "fc", "colour"),
    ("shape not a list", set_meta("fc", "shape", "32x16"), "fc", "shape"),
    ("shape with a zero", set_meta("fc", "shape", [0, 16]), "fc", "shape"),
    ("dtype not a float", set_meta("fc", "dtype", "int32"), "fc", "dtype"),
    ("dtype unknown", set_meta("fc", "dtype", "float128"), "fc", "dtype"),
    ("dtype not a name", set_meta("fc", "dtype", torch.float32), "fc", "dtype"),
    ("bits 0", set_meta("fc", "bits", 0), "fc", "bits"),
    ("bits 17", set_meta("fc", "bits", 17), "fc", "bits"),
    ("bits a bool", set_meta("out", "bits", True), "out", "bits"),
    ("bits below the palette", set_meta("fc", "bits", 2), "fc", "n_clusters"),
    ("dim not dividing", set_meta("fc", "dim", 3), "fc", "dim"),
    ("dim against n_vectors", set_meta("fc", "dim", 4), "fc", "n_vectors"),
    ("n_vectors", set_meta("out", "n_vectors", 257), "out", "n_vectors"),
    ("n_clusters above 2**bits", set_meta("fc", "n_clusters", 9), "fc", "n_clusters"),
    ("n_clusters against the codebook", set_meta("out", "n_clusters", 2), "out", "codebooks"),
    ("groups not dividing", set_meta("fc", "groups", 3), "fc", "groups"),
    ("groups against group_size", set_meta("fc", "groups", 2), "fc", "group_size"),
    ("group_size missing", set_meta("fc", "group_size", None), "fc", "group_size"),
    ("group_size wrong", set_meta("fc", "group_size", 16), "fc", "group_size"),
    ("group_size without groups", set_meta("out", "group_size", 4), "out", "group_size"),
    ("per_channel_scale not a bool", set_meta("fc", "per_channel_scale", "yes"), "fc",
     "per_channel_scale"),
    ("scale of an unscaled layer", set_meta("fc", "per_channel_scale", False), "fc", "scales"),
    ("scale added", set_entry("scales", "out", lambda _: torch.ones(8, dtype=torch.float16)),
     "out", "scales"),
    ("scale missing", delete("scales", "fc"), "fc", "scales"),
    ("scale length", set_entry("scales", "fc", lambda t: t[:-1].clone()), "fc", "scales"),
    ("scale dtype", set_entry("scales", "fc", lambda t: t.float()), "fc", "scales"),
    ("scale NaN", set_entry("scales", "fc", with_nan), "fc", "scales"),
    ("scale not a tensor", set_entry("scales", "fc", lambda t: t.tolist()), "fc", "scales"),
    ("codebook NaN", set_entry("codebooks", "out", with_nan), "out", "codebooks"),
    ("codebook inf", set_entry("codebooks", "fc", with_inf), "fc", "codebooks"),
    ("codebook dtype", set_entry("codebooks", "out", lambda t: t.float()), "out", "codebooks"),
    ("codebook shape", set_entry("codebooks", "out", lambda t: t[0].clone()), "out", "codebooks"),
    ("codebook missing", delete("codebooks", "out"), "out", "codebooks"),
    ("assignments truncated", set_entry("assignments", "out", lambda t: t[:-1].clone()), "out",
     "assignments"),
    ("assignments dtype", set_entry("assignments", "out", lambda t: t.long()), "out",
     "assignments"),
    ("assignments not a tensor", set_entry("assignments", "out", lambda t: bytes(t.tolist())),
     "out", "assignments"),
    ("assignments missing", delete("assignments", "fc"), "fc", "assignments"),
    ("index beyond the palette", fewer_clusters, "fc", "assignments"),
    ("tied not a list", set_meta("out", "tied", "fc"), "out", "tied"),
    ("tied onto a clustered layer", set_meta("out", "tied", ["fc"]), "out", "tied"),
    ("weight also uncompressed", set_entry("uncompressed", "out.weight",
                                           lambda _: torch.zeros(8, 32)), "out", "layer_configs"),
    ("quantization scale of a float palette", lambda e: e.update(
        lut_scales={"out": torch.ones(1, dtype=torch.float16)}), "out", "lut_scales"),
]


def error_pattern(layer, field):
    where = "export" if layer is None else f"export layer '{layer}'"
    return rf"{where}, field '{field}'"


def assert_refused_and_unchanged(source, model, pattern):
    """load_compressed(source, model) raises a ValueError matching `pattern` and leaves every
    tensor of `model` as it was."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=pattern):
        load_compressed(source, model)
    assert_same_state(model.state_dict(), before)


# The same for quantized palettes: "fc" uint8 (four palettes), "out" int8 (one palette).
QUANTIZED_CASES = [
    ("quantization unknown", set_meta("fc", "lut_quantization", "int4"), "fc",
     "lut_quantization"),
    ("quantization dropped", delete("layer_configs", "out", "lut_quantization"), "out",
     "codebooks"),
    ("codebook of the other sign", set_entry("codebooks", "fc", lambda t: t.to(torch.int8)),
     "fc", "codebooks"),
    ("codebook as floats", set_entry("codebooks", "out", lambda t: t.half()), "out",
     "codebooks"),
    ("scales table missing", delete("lut_scales"), "fc", "lut_scales"),
    ("scales not a dict", lambda e: e.update(lut_scales=[1.0]), None, "lut_scales"),
    ("scale of no layer", set_entry("lut_scales", "ghost", lambda _: torch.ones(1)), "ghost",
     "lut_scales"),
    ("scale missing", delete("lut_scales", "out"), "out", "lut_scales"),
    ("scale dtype", set_entry("lut_scales", "fc", lambda t: t.float()), "fc", "lut_scales"),
    ("scale length", set_entry("lut_scales", "fc", lambda t: t[:-1].clone()), "fc",
     "lut_scales"),
    ("scale NaN", set_entry("lut_scales", "out", with_nan), "out", "lut_scales"),
    ("scale zero", set_entry("lut_scales", "fc", lambda t: t * 0), "fc", "lut_scales"),
    ("scale negative", set_entry("lut_scales", "out", lambda t: -t), "out", "lut_scales"),
    ("zero points missing", delete("lut_zero_points"), "fc", "lut_zero_points"),
    ("zero point dtype", set_entry("lut_zero_points", "fc", lambda t: t.to(torch.int8)), "fc",
     "lut_zero_points"),
    ("zero point length", set_entry("lut_zero_points", "fc", lambda t: t[:1].clone()), "fc",
     "lut_zero_points"),
    ("zero point of an int8 palette", set_entry(
        "lut_zero_points", "out", lambda _: torch.full((1,), 127, dtype=torch.uint8)), "out",
     "lut_zero_points"),
]


@pytest.fixture(scope="module")
def quantized_export():
    compressor = compress_model(
        net(), bits=2, tau=1e-3, skip_first_last=False, small_layer_threshold=0, seed=0,
        lut_quantization="int8",
        layer_configs={"fc": {"bits": 3, "dim": 2, "group_size": 8,
                              "lut_quantization": "uint8"}})
    return compressor.export_compressed()


def test_a_quantized_export_loads_and_a_float_one_has_no_quantization_tables(valid_export,
                                                                            quantized_export):
    assert "lut_scales" not in valid_export and "lut_zero_points" not in valid_export
    assert set(quantized_export["lut_scales"]) == {"fc", "out"}
    assert set(quantized_export["lut_zero_points"]) == {"fc"}
    model = load_compressed(copy.deepcopy(quantized_export), net)
    assert torch.isfinite(model.fc.weight).all()


@pytest.mark.parametrize("corrupt,layer,field", [case[1:] for case in QUANTIZED_CASES],
                         ids=[case[0] for case in QUANTIZED_CASES])
def test_a_corrupted_quantization_field_is_named(quantized_export, corrupt, layer, field):
    export = copy.deepcopy(quantized_export)
    corrupt(export)
    assert_refused_and_unchanged(export, net(), error_pattern(layer, field))


@pytest.mark.parametrize("corrupt,layer,field", [case[1:] for case in FIELD_CASES],
                         ids=[case[0] for case in FIELD_CASES])
def test_a_corrupted_field_is_named_and_the_model_left_as_it_was(valid_export, corrupt, layer,
                                                                 field, tmp_path):
    export = copy.deepcopy(valid_export)
    corrupt(export)
    assert_refused_and_unchanged(export, net(), error_pattern(layer, field))
    with pytest.raises(ValueError, match=error_pattern(layer, field)):
        decoded_state_dict(export)
    path = tmp_path / "corrupted.pt"
    torch.save(export, path)
    with pytest.raises(ValueError, match=rf"{path}: {error_pattern(layer, field)}"):
        read_export(path)


class Transposed(nn.Module):
    """The same keys as net(), one weight transposed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.out = nn.Module()
        self.out.weight = nn.Parameter(torch.zeros(32, 8))
        self.out.bias = nn.Parameter(torch.zeros(8))


class Wider(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 9)


class Extra(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)
        self.norm = nn.LayerNorm(8)


def no_fc_bias(export):
    del export["uncompressed"]["fc.bias"]


def tied_to_a_missing_module(export):
    export["layer_configs"]["out"]["tied"] = ["ghost"]


# (case, corruption of the export, architecture, the error's words)
MODEL_CASES = [
    ("clustered shape", None, Transposed, r"export layer 'out', field 'shape': \[8, 32\]"),
    ("uncompressed shape", None, Wider, r"field 'uncompressed': 'out.bias' has shape"),
    ("keys the model adds", None, Extra, r"the export lacks: \['norm.weight', 'norm.bias'\]"),
    ("key missing from the export", no_fc_bias, net, r"the export lacks: \['fc.bias'\]"),
    ("tied module not in the model", tied_to_a_missing_module, net,
     r"the model lacks: \['ghost.weight'\]"),
]


@pytest.mark.parametrize("corrupt,architecture,pattern", [case[1:] for case in MODEL_CASES],
                         ids=[case[0] for case in MODEL_CASES])
def test_an_export_that_does_not_fit_the_model_leaves_it_as_it_was(valid_export, corrupt,
                                                                   architecture, pattern):
    export = copy.deepcopy(valid_export)
    if corrupt is not None:
        corrupt(export)
    assert_refused_and_unchanged(export, architecture(), pattern)


def test_the_valid_export_loads(valid_export):
    model = load_compressed(copy.deepcopy(valid_export), net)
    assert torch.isfinite(model.fc.weight).all()


@pytest.mark.parametrize("write,pattern", [case[1:] for case in NOT_EXPORTS],
                         ids=[case[0] for case in NOT_EXPORTS])
def test_a_file_that_is_not_an_export_says_what_it_is_not(write, pattern, tmp_path):
    path = tmp_path / "model.pt"
    write(path)
    assert_refused_and_unchanged(path, net(), rf"not a dkm_kernels export.*{pattern}")


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "absent.pt", net)
