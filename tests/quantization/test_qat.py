"""L4Q quantization-aware fine-tuning (Jeon et al., 2024): the recomputing layer against plain autograd, training a
tiny Llama, export to packed low-bit layers, reversible patches and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_eff.kernels.quantization import LowBitLinear, lsq_fake_quantize_reference
from hf_eff.quantization import (
    HfEffLowBitConfig,
    L4QLinear,
    apply_l4q,
    apply_quantization,
    export_l4q,
    revert_quantization,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def _trained_layer(symmetric: bool, backend: str, seed: int = 0) -> L4QLinear:
    """An L4Q layer with non-zero LoRA B and perturbed steps, as after some training."""
    torch.manual_seed(seed)
    layer = L4QLinear.from_linear(nn.Linear(64, 24), bits=3, group_size=32, r=4, alpha=8, symmetric=symmetric,
                                  backend=backend)  # fmt: skip
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.step.mul_(1 + 0.2 * torch.rand_like(layer.step))
        if layer.offset is not None:
            layer.offset.add_(0.01 * torch.randn_like(layer.offset))
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "offset"])
def test_recomputing_backward_matches_plain_autograd(symmetric, backend):
    layer = _trained_layer(symmetric, backend).to(DEVICE if backend == "triton" else "cpu")
    device = layer.weight.device
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    grad_out = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2)).to(device)
    trainable = [layer.lora_A, layer.lora_B, layer.step] + ([] if symmetric else [layer.offset])

    out = layer(x)
    got = torch.autograd.grad(out, [x, *trainable], grad_out)

    merged = layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
    quantized = lsq_fake_quantize_reference(merged, layer.step, layer.offset, bits=3, group_size=32)
    expected_out = F.linear(x, quantized, layer.bias)
    want = torch.autograd.grad(expected_out, [x, *trainable], grad_out)

    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(["x", "lora_A", "lora_B", "step", "offset"], got, want):
        assert g is not None, name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_frozen_weight_gets_gradient_only_when_unfrozen():
    layer = _trained_layer(False, "torch")
    x = torch.randn(3, 64)
    layer.weight.requires_grad_(True)
    merged = layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
    reference = F.linear(x, lsq_fake_quantize_reference(merged, layer.step, layer.offset, bits=3, group_size=32))
    (want,) = torch.autograd.grad(reference.sum(), layer.weight)
    (got,) = torch.autograd.grad(layer(x).sum(), layer.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_starts_as_the_quantized_pretrained_layer():
    torch.manual_seed(3)
    linear = nn.Linear(64, 16)
    layer = L4QLinear.from_linear(linear, bits=4, group_size=32, symmetric=False, backend="torch")
    assert layer.weight is linear.weight and layer.bias is linear.bias  # shared, not copied
    assert torch.count_nonzero(layer.lora_B) == 0
    # min-max steps: every weight within half a step of its quantized value
    error = (layer.quantized_weight() - linear.weight).abs()
    assert torch.all(error <= layer.step.detach().repeat_interleave(32, dim=1) / 2 + 1e-6)


def _causal_lm_loss(model, inputs):
    return model(**inputs, labels=inputs["input_ids"]).loss


def test_l4q_trains_tiny_llama(tiny_llama):
    model = tiny_llama.model()
    generator = torch.Generator().manual_seed(0)
    # one fixed batch: a few steps must lower its loss if A, B and the steps learn
    inputs = {"input_ids": torch.randint(0, 96, (4, 16), generator=generator)}
    apply_l4q(model, bits=4, group_size=32, r=8, alpha=16, backend="torch")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    steps_before = [m.step.detach().clone() for m in model.modules() if isinstance(m, L4QLinear)]
    model.train()
    losses = []
    for _ in range(15):
        loss = _causal_lm_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses  # measured: 4.57 -> 4.20
    steps_after = [m.step.detach() for m in model.modules() if isinstance(m, L4QLinear)]
    assert any(not torch.equal(a, b) for a, b in zip(steps_before, steps_after))  # the quantizer learned too


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "offset"])
def test_export_reproduces_qat_forward(symmetric, backend):
    layer = _trained_layer(symmetric, backend)
    device = DEVICE if backend == "triton" else "cpu"
    layer = layer.to(device)
    packed = LowBitLinear.from_qat(layer)
    # the packed codes stand for exactly the weight the QAT forward multiplies by
    assert torch.equal(packed.dequantized_weight(), layer.quantized_weight())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        qat_out = layer(x)
    if backend == "torch":
        assert torch.equal(packed(x), qat_out)
    else:  # the kernel applies the scales to partial sums instead of to the weight
        torch.testing.assert_close(packed(x), qat_out, rtol=1e-5, atol=1e-5)


def test_export_model_and_errors(tiny_llama):
    model = tiny_llama.model()
    inputs = tiny_llama.inputs()
    with pytest.raises(ValueError, match=r"export_l4q: LlamaForCausalLM has no L4QLinear layer; call apply_l4q"):
        export_l4q(model)
    apply_l4q(model, bits=4, group_size=32, r=4, backend="torch")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, L4QLinear):
                module.lora_B.normal_(0, 0.02)
        qat_logits = tiny_llama.output(model, inputs)
    export_l4q(model)
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    assert len(layers) == 14 and not any(isinstance(m, L4QLinear) for m in model.modules())
    assert isinstance(model.lm_head, nn.Linear)  # the output embedding stays in full precision
    assert model.config.quantization_config.mode == "lowbit"
    with torch.no_grad():
        assert torch.equal(tiny_llama.output(model, inputs), qat_logits)
    with pytest.raises(ValueError, match=r"exported with export_l4q\(keep_originals=False\).*cannot be reverted"):
        revert_quantization(model)


def _snapshot(model):
    return {
        "modules": {name: module for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "config": model.config.__dict__.get("quantization_config", "absent"),
    }


@pytest.mark.parametrize("method", ["l4q", "lowbit"])
def test_apply_revert_is_bit_identical(tiny_llama, method):
    model = tiny_llama.model()
    inputs = tiny_llama.inputs()
    model.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag that revert must keep
    with torch.no_grad():
        before = tiny_llama.output(model, inputs)
    snapshot = _snapshot(model)

    apply_quantization(model, method, bits=4, group_size=32, backend="torch")
    first = dict(model.named_modules())
    apply_quantization(model, method, bits=4, group_size=32, backend="torch")  # idempotent
    assert dict(model.named_modules()) == first
    with torch.no_grad():
        assert not torch.equal(tiny_llama.output(model, inputs), before)  # it did quantize
    assert model.is_quantized and model.config.quantization_config.mode == ("qat" if method == "l4q" else "lowbit")
    with pytest.raises(ValueError, match=r"already quantized .* call hf_eff.quantization.revert_quantization"):
        apply_quantization(model, method, bits=8, group_size=32, backend="torch")

    revert_quantization(model)
    after = _snapshot(model)
    assert all(after["modules"][name] is module for name, module in snapshot["modules"].items())
    assert after["modules"].keys() == snapshot["modules"].keys()
    assert after["requires_grad"] == snapshot["requires_grad"]
    assert after["config"] == "absent" and "hf_quantizer" not in model.__dict__
    assert not getattr(model, "is_quantized", False)
    with torch.no_grad():
        assert torch.equal(tiny_llama.output(model, inputs), before)
    revert_quantization(model)  # a no-op on an unquantized model


def test_only_lora_and_steps_train(tiny_llama):
    model = apply_l4q(tiny_llama.model(), bits=4, group_size=32, r=4, target_modules=["q_proj", "v_proj"])
    trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "step", "offset"}
    assert sum(isinstance(m, L4QLinear) for m in model.modules()) == 4
    assert model.config.quantization_config.target_modules == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
    ]  # fmt: skip


def test_export_keep_originals_can_revert(tiny_llama):
    model = tiny_llama.model()
    inputs = tiny_llama.inputs()
    with torch.no_grad():
        before = tiny_llama.output(model, inputs)
    apply_l4q(model, bits=4, group_size=32, backend="torch")
    export_l4q(model, keep_originals=True)
    revert_quantization(model)
    with torch.no_grad():
        assert torch.equal(tiny_llama.output(model, inputs), before)


def test_bad_input_leaves_model_untouched(tiny_llama, tiny_gpt2):
    model = tiny_llama.model()
    modules = dict(model.named_modules())
    cases = [
        (dict(bits=1), r"apply_l4q: `bits` must be one of \(2, 3, 4, 5, 6, 7, 8\), got 1"),
        (dict(group_size=48), r"`group_size` must be None \(per channel\) or a power of two >= 32 that divides "
                              r"in_features \(32\), got 48 \(layer 'model.layers.0.self_attn.q_proj'\)"),
        (dict(group_size=64), r"divides in_features \(32\), got 64"),
        (dict(r=0), r"`r` must be a positive int, got 0"),
        (dict(alpha=-1), r"`alpha` must be a finite number > 0, got -1"),
        (dict(symmetric="yes"), r"`symmetric` must be a bool, got 'yes'"),
        (dict(backend="gpu"), r"`backend` must be one of \('auto', 'triton', 'torch'\), got 'gpu'"),
        (dict(target_modules=["qkv"]), r"`target_modules` entry 'qkv' matches no module of LlamaForCausalLM"),
        (dict(target_modules=["mlp"]), r"only nn.Linear layers can be quantized; 'model.layers.0.mlp' \(matched by "
                                       r"'mlp'\) is a LlamaMLP"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            apply_l4q(model, **{"group_size": 32, **kwargs})
        assert dict(model.named_modules()) == modules
        assert all(p.requires_grad for p in model.parameters())
        assert "quantization_config" not in model.config.__dict__
    with pytest.raises(ValueError, match=r"`method` must be one of \('l4q', 'lowbit'\), got 'gptq'"):
        apply_quantization(model, "gptq")
    # GPT-2 keeps its projections in transformers' Conv1D: only the (excluded) LM head is an nn.Linear
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no nn.Linear layer to quantize"):
        apply_l4q(tiny_gpt2.model(), group_size=32)
    with pytest.raises(ValueError, match=r"is a Conv1D"):
        apply_l4q(tiny_gpt2.model(), group_size=32, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"HfEffLowBitConfig: `mode` must be one of \('lowbit', 'qat'\), got 'ptq'"):
        HfEffLowBitConfig(mode="ptq")
