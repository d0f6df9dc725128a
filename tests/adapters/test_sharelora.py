"""ShareLoRA: one tensor per (projection, shape) group, saved once, equal to LoRA with the factor copied per layer."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from hf_eff import ShareLoraConfig

from .cases import lora_with_the_same_update


def layers_of(model, suffix):
    return [m for name, m in model.named_modules() if name.endswith(suffix) and hasattr(m, "shared_keys")]


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_shared_factor_is_one_tensor(tiny_llama, share):
    model = get_peft_model(tiny_llama.model(), ShareLoraConfig(r=4, share=share, target_modules=["q_proj", "v_proj"]))
    for suffix in ("q_proj", "v_proj"):
        layers = layers_of(model, suffix)
        assert len(layers) == 2
        for factor in "AB":
            tensors = [layer.factor(factor, "default") for layer in layers]
            same = all(t is tensors[0] for t in tensors)
            assert same == (factor in share)
    q_a = layers_of(model, "q_proj")[0].factor("A", "default")
    v_a = layers_of(model, "v_proj")[0].factor("A", "default")
    assert q_a is not v_a, "each projection name has its own group"


def test_groups_are_projections_across_layers_and_shapes(tiny_gpt2):
    model = get_peft_model(tiny_gpt2.model(), ShareLoraConfig(r=4, target_modules=["c_proj"]))
    # attention c_proj is 32 -> 32, MLP c_proj is 128 -> 32: two projections named alike, each shared by both layers
    assert sorted(model.base_model.sharelora_shared["default"].keys()) == [
        "transformer-h-attn-c_proj-A32",
        "transformer-h-mlp-c_proj-A128",
    ]


def test_projections_with_one_attribute_name_and_shape_stay_apart():
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    base = transformers.RobertaForSequenceClassification(config)
    # both are 64/32 -> 32 and named "dense": attention.output.dense and output.dense
    model = get_peft_model(
        base, ShareLoraConfig(r=4, share="B", target_modules=["attention.output.dense", "output.dense"])
    )
    assert sorted(model.base_model.sharelora_shared["default"].keys()) == [
        "roberta-encoder-layer-attention-output-dense-B32",
        "roberta-encoder-layer-output-dense-B32",
    ]


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_checkpoint_holds_each_shared_tensor_once(tiny_llama, share, tmp_path):
    model = get_peft_model(
        tiny_llama.model(), ShareLoraConfig(r=4, share=share, target_modules=tiny_llama.targets, init_weights=False)
    )
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    shared_keys = [k for k in saved if ".sharelora_shared." in k]
    assert len(shared_keys) == len(model.base_model.sharelora_shared["default"])
    trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == trainable_numel


def test_equals_lora_with_the_shared_factor_copied_into_every_layer(tiny_llama):
    """Forward equal, and the shared A's gradient is the sum of the per-layer A gradients of plain LoRA."""
    targets = ["q_proj", "v_proj"]
    shared = get_peft_model(tiny_llama.model(), ShareLoraConfig(r=4, target_modules=targets, init_weights=False))
    lora = lora_with_the_same_update(shared, tiny_llama.model(), targets)
    inputs = tiny_llama.inputs()
    out_shared, out_lora = tiny_llama.output(shared, inputs), tiny_llama.output(lora, inputs)
    torch.testing.assert_close(out_shared, out_lora, rtol=1e-5, atol=1e-6)
    out_shared.pow(2).mean().backward()
    out_lora.pow(2).mean().backward()
    for suffix in targets:
        shared_grad = layers_of(shared, suffix)[0].factor("A", "default").grad
        lora_grads = [m.lora_A["default"].weight.grad for n, m in lora.named_modules() if n.endswith(suffix)]
        torch.testing.assert_close(shared_grad, sum(lora_grads), rtol=1e-5, atol=1e-7)


def test_low_cpu_mem_usage_load(tiny_llama, tmp_path):
    model = get_peft_model(
        tiny_llama.model(), ShareLoraConfig(r=4, target_modules=tiny_llama.targets, init_weights=False)
    )
    inputs = tiny_llama.inputs()
    expected = tiny_llama.output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama.model(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(tiny_llama.output(loaded, inputs), expected)


def test_inject_adapter_in_model_is_refused(tiny_llama):
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError):
        inject_adapter_in_model(ShareLoraConfig(r=4, target_modules=["q_proj"]), tiny_llama.model())
