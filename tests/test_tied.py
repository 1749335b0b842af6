"""Tied weights (one Parameter shared by several modules, as in `head.weight = emb.weight`): the
export writes the weight once, loading fills every module with it, sizes count it once.

The compressor lists shared weights in `compressor.tied` ({clustered layer: [other modules]});
here it is set by hand on a compressor whose `head` is left out of clustering.
"""
import pytest
import torch
import torch.nn as nn

from dkm_kernels import compress_model, load_compressed
from dkm_kernels.export import export_bytes
from shared_models import TiedLM


def tied_compressor():
    torch.manual_seed(0)
    compressor = compress_model(TiedLM(), bits=3, tau=1e-3, skip_first_last=False,
                                small_layer_threshold=0, layer_configs={"head": None}, seed=0)
    compressor.tied = {"emb": ["head"]}
    return compressor


TOKENS = torch.arange(40).reshape(5, 8)


def test_a_tied_weight_is_written_once_and_listed_with_its_layer():
    export = tied_compressor().export_compressed()
    assert export["layer_configs"]["emb"]["tied"] == ["head"]
    assert "head.weight" not in export["uncompressed"]
    assert "emb.weight" not in export["uncompressed"]


@pytest.mark.parametrize("tie", [True, False], ids=["tied model", "untied model"])
def test_loading_fills_every_tied_key_and_keeps_the_model_tied(tie, tmp_path):
    compressor = tied_compressor()
    compressor.eval()
    compressor.snap_weights()
    path = tmp_path / "tied.pt"
    compressor.save_compressed(path)
    model = load_compressed(path, lambda: TiedLM(tie=tie))
    assert torch.equal(model.emb.weight, compressor.model.emb.weight)
    assert torch.equal(model.head.weight, compressor.model.emb.weight)
    assert (model.head.weight is model.emb.weight) == tie
    assert torch.equal(model(TOKENS), compressor(TOKENS))


def test_sizes_count_a_tied_weight_once():
    compressor = tied_compressor()
    info = compressor.get_compression_info()
    export = compressor.export_compressed()
    assert info["compressed_bytes"] == export_bytes(export)
    # parameters() lists a shared Parameter once: the model's real size.
    assert info["original_bytes"] == sum(p.numel() * p.element_size()
                                         for p in TiedLM().parameters())
    assert info["layers"][0]["tied"] == ["head"]


def test_a_module_listed_as_tied_that_holds_another_weight_is_refused():
    compressor = tied_compressor()
    compressor.model.head.weight = nn.Parameter(torch.zeros(40, 16))
    with pytest.raises(ValueError, match=r"layer 'emb': module 'head'.*tie them"):
        compressor.export_compressed()
