"""DKM on a transformers model: a GPT-2 built from a tiny config (no download).

Every Conv1D (GPT-2's transposed Linear) is clustered with the fc config; the tied wte / lm_head
share one palette; gradient checkpointing gives the gradients of the plain forward; a snapped model
round-trips through save_pretrained; a bfloat16 model trains with float32 centroids; a compiled
forward (fullgraph) trains as eager does.
"""
import pytest
import torch

import dkm_kernels
from dkm_kernels import unique

transformers = pytest.importorskip(
    "transformers", reason="transformers is an optional test dependency (pip install transformers)")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 96


def gpt2(layers=2, seed=0):
    config = GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the default, named (transformers warns otherwise)
    return model


def compressed_gpt2(layers=2, **kwargs):
    model = gpt2(layers)
    options = dict(bits=3, skip_first_last=False, small_layer_threshold=0, seed=0, tau="auto")
    compressor = dkm_kernels.compress_model(model, **{**options, **kwargs})
    return model, compressor


def tokens(seed=1):
    return torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_every_conv1d_is_clustered_with_the_fc_config():
    model, compressor = compressed_gpt2(fc_config="2/1", embedding_config="4/1")
    conv1d = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    assert len(conv1d) == 8
    for name in conv1d:
        assert compressor.configs[name].bits == 2
        assert compressor.get_layer(name).original_shape == tuple(
            dict(model.named_modules())[name].parametrizations.weight.original.shape)
    assert compressor.configs["transformer.wte"].bits == 4
    info = compressor.get_compression_info()
    assert {row["type"] for row in info["layers"]} >= {"Conv1D", "Embedding"}


def test_tied_embedding_and_head_share_one_palette():
    model, compressor = compressed_gpt2()
    assert compressor.tied == {"transformer.wte": ["lm_head"]}
    wte, head = model.transformer.wte, model.lm_head
    assert wte.parametrizations.weight[0] is head.parametrizations.weight[0]
    assert wte.parametrizations.weight.original is head.parametrizations.weight.original
    model.train()
    model(tokens(), labels=tokens()).loss.backward()
    assert torch.equal(wte.weight, head.weight)
    compressor.snap_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.unique(model.lm_head.weight).numel() <= 8


def test_gradient_checkpointing_gives_the_same_gradients():
    results = []
    for checkpointing in (False, True):
        model, compressor = compressed_gpt2()
        if checkpointing:
            enable = (getattr(model, "activation_checkpointing_enable", None)
                      or model.gradient_checkpointing_enable)
            enable()
            assert getattr(model, "is_activation_checkpointing", None) or \
                model.is_gradient_checkpointing
        model.train()
        for step in range(2):  # the second step starts from the first one's centroids
            model.zero_grad()
            loss = model(tokens(step), labels=tokens(step)).loss
            loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss, plain), (loss_ckpt, ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_save_pretrained_after_snapping_reloads(tmp_path):
    model, compressor = compressed_gpt2()
    model.train()
    model(tokens(), labels=tokens()).loss.backward()
    compressor.snap_weights()
    model.eval()
    expected = model(tokens()).logits
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(reloaded(tokens()).logits, expected, rtol=0, atol=0)


def test_bfloat16_training_keeps_float32_centroids(monkeypatch):
    model, compressor = compressed_gpt2()
    model.to(torch.bfloat16)
    calls = []
    real = unique.dkm_unique_forward
    monkeypatch.setattr(unique, "dkm_unique_forward", lambda *a: calls.append(1) or real(*a))
    layer = compressor.get_layer("transformer.h.0.mlp.c_fc")
    before = layer.centroids.clone()
    model.train()
    for step in range(2):
        model(tokens(step), labels=tokens(step)).loss.backward()
    assert len(calls) == 2 * len(compressor.dkm_layers)  # every weight uniquified, every step
    for dkm_layer in compressor.dkm_layers.values():
        assert dkm_layer.centroids.dtype == torch.float32
    moved = layer.centroids - before
    assert moved.abs().max() > 0
    # Moves kept in float32, not rounded to bfloat16's 8-bit mantissa.
    assert not torch.equal(layer.centroids, layer.centroids.bfloat16().float())
    weight = model.transformer.h[0].mlp.c_fc.parametrizations.weight.original
    assert weight.dtype == torch.bfloat16 and weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_compiled_forward_trains_as_eager():
    """torch.compile(fullgraph=True) of the model's forward (the compressor's per-step hooks run
    around it): no graph break, no recompilation from step to step, eager's losses and gradients.
    About 35 s on a 2-core CPU, mostly compiling; the op-level compile test is in test_unique.py."""
    torch._dynamo.reset()
    eager, _ = compressed_gpt2(layers=1)
    compiled, _ = compressed_gpt2(layers=1)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend="aot_eager")
    for model in (eager, compiled):
        model.train()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            for model in (eager, compiled):
                model.zero_grad()
                model(tokens(step), labels=tokens(step)).loss.backward()
    torch.testing.assert_close(compiled(tokens()).loss, eager(tokens()).loss)
    expected = grads(eager)
    for name, grad in grads(compiled).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
