"""Block-LoRA: the summed-input path equals the explicit ΔW = B·[A_s, …, A_s] in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from hf_eff import BlockLoraConfig

from .cases import lora_with_the_same_update


def first_layer(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("num_blocks", [1, 2, 4, 8])
def test_summed_input_equals_explicit_delta_weight(tiny_llama, num_blocks):
    model = get_peft_model(
        tiny_llama.model(), BlockLoraConfig(r=4, num_blocks=num_blocks, target_modules=["q_proj"], init_weights=False)
    )
    layer = first_layer(model)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    summed = layer.adapter_output(x, "default")
    explicit = F.linear(x, layer.delta_matrix("default"))
    torch.testing.assert_close(summed, explicit, rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(summed)
    params = [x, layer.blocklora_A["default"], layer.blocklora_B["default"]]
    grads_summed = torch.autograd.grad(summed, params, upstream)
    grads_explicit = torch.autograd.grad(explicit, params, upstream)
    for got, want in zip(grads_summed, grads_explicit):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_parameter_count(tiny_llama):
    r, n = 4, 4
    model = get_peft_model(tiny_llama.model(), BlockLoraConfig(r=r, num_blocks=n, target_modules=["q_proj", "o_proj"]))
    layers = [m for m in model.modules() if hasattr(m, "blocklora_A")]
    expected = sum(r * m.in_features // n + m.out_features * r for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_one_block_equals_plain_lora(tiny_llama):
    block = get_peft_model(
        tiny_llama.model(), BlockLoraConfig(r=4, num_blocks=1, target_modules=["q_proj"], init_weights=False)
    )
    lora = lora_with_the_same_update(block, tiny_llama.model(), ["q_proj"])
    inputs = tiny_llama.inputs()
    torch.testing.assert_close(tiny_llama.output(block, inputs), tiny_llama.output(lora, inputs), rtol=1e-5, atol=1e-6)
