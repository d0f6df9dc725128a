"""The transformers quantizer `quant_method="hf_eff_lowbit"`: registration, save_pretrained / from_pretrained round
trips of exported (low-bit) and quantization-aware (L4Q) models, conversion of float checkpoints, and Trainer."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from hf_eff.kernels.quantization import LowBitLinear
from hf_eff.quantization import (
    QUANT_METHOD,
    HfEffLowBitConfig,
    HfEffLowBitQuantizer,
    L4QLinear,
    apply_l4q,
    apply_quantization,
    export_l4q,
    register_quantizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def _perturb_quantizers(model, seed=0):
    """Moves LoRA B, steps and offsets away from their initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, L4QLinear):
                module.lora_B.add_(0.02 * torch.randn(module.lora_B.shape, generator=generator))
                module.step.mul_(1 + 0.1 * torch.rand(module.step.shape, generator=generator))
                module.offset.add_(0.01 * torch.randn(module.offset.shape, generator=generator))


def _load(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def test_register_is_idempotent_and_guarded(monkeypatch):
    register_quantizer()
    register_quantizer()
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is HfEffLowBitQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is HfEffLowBitConfig
    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, QUANT_METHOD, type("OtherQuantizer", (HfEffLowBitQuantizer,), {}))
    with pytest.raises(RuntimeError, match=r"already has .*OtherQuantizer registered as 'hf_eff_lowbit'"):
        register_quantizer()
    # the module object hf_eff reads (importing peft re-creates transformers' lazy module in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.0")
    with pytest.raises(RuntimeError, match=r"supports transformers >= 5.23, < 6; found 4.57.0"):
        register_quantizer()


def test_config_round_trip_and_errors():
    config = HfEffLowBitConfig(bits=3, group_size=64, symmetric=True, mode="qat", r=4, alpha=8,
                               target_modules=["q_proj"])  # fmt: skip
    data = config.to_dict()
    assert data["quant_method"] == QUANT_METHOD
    assert HfEffLowBitConfig.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match=r"`bits` must be one of \(2, 3, 4, 5, 6, 7, 8\), got 1"):
        HfEffLowBitConfig(bits=1)
    with pytest.raises(ValueError, match=r"`group_size` must be None \(per channel\) or a power of two >= 32, got 100"):
        HfEffLowBitConfig(group_size=100)
    with pytest.raises(ValueError, match=r"`quant_method` must be 'hf_eff_lowbit', got 'gptq'"):
        HfEffLowBitConfig(quant_method="gptq")
    with pytest.raises(ValueError, match=r"`target_modules` must be None or a list of module names, got 'q_proj'"):
        HfEffLowBitConfig(target_modules="q_proj")
    with pytest.raises(ValueError, match=r"unknown arguments \['bit'\]"):
        HfEffLowBitConfig(bit=4)


def test_exported_model_round_trip(tiny_llama, tmp_path):
    model = apply_l4q(tiny_llama.model(), bits=4, group_size=32, r=4)
    _perturb_quantizers(model)
    export_l4q(model)
    inputs = tiny_llama.inputs()
    with torch.no_grad():
        logits = tiny_llama.output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = _load(tmp_path)  # the saved config names the quantizer; no quantization_config argument needed
    assert isinstance(loaded.hf_quantizer, HfEffLowBitQuantizer) and loaded.hf_quantizer.pre_quantized
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, LowBitLinear)}
    assert sorted(layers) == sorted(model.config.quantization_config.target_modules)
    for name, layer in layers.items():
        original = model.get_submodule(name)
        assert torch.equal(layer.qweight, original.qweight) and torch.equal(layer.scales, original.scales)
    with torch.no_grad():
        assert torch.equal(tiny_llama.output(loaded, inputs), logits)
    # an explicit config is accepted too (transformers keeps the saved one)
    with pytest.warns(UserWarning, match="already has a `quantization_config`"):
        again = _load(tmp_path, quantization_config=HfEffLowBitConfig(bits=4, group_size=32))
    with torch.no_grad():
        assert torch.equal(tiny_llama.output(again, inputs), logits)


def test_qat_model_round_trip_keeps_learned_steps(tiny_llama, tmp_path):
    model = apply_l4q(tiny_llama.model(), bits=4, group_size=32, r=4)
    _perturb_quantizers(model)
    inputs = tiny_llama.inputs()
    with torch.no_grad():
        logits = tiny_llama.output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = _load(tmp_path)
    assert loaded.hf_quantizer.is_qat_trainable
    for name, module in model.named_modules():
        if isinstance(module, L4QLinear):
            twin = loaded.get_submodule(name)
            assert isinstance(twin, L4QLinear)
            for attribute in ("weight", "lora_A", "lora_B", "step", "offset"):
                assert torch.equal(getattr(twin, attribute), getattr(module, attribute)), (name, attribute)
            fresh_step = L4QLinear.from_linear(nn.Linear(32, module.out_features), group_size=32).step
            assert not torch.equal(twin.step, fresh_step)
    trainable = {name.rsplit(".", 1)[-1] for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "step", "offset"}
    with torch.no_grad():
        assert torch.equal(tiny_llama.output(loaded, inputs), logits)


@pytest.mark.parametrize("mode", ["lowbit", "qat"])
def test_float_checkpoint_converted_on_load(tiny_llama, tmp_path, mode):
    model = tiny_llama.model()
    model.save_pretrained(tmp_path)
    inputs = tiny_llama.inputs()
    register_quantizer()
    config = HfEffLowBitConfig(bits=4, group_size=32, mode=mode, backend="torch")
    loaded = _load(tmp_path, quantization_config=config)
    assert not loaded.hf_quantizer.pre_quantized
    # the same layers as the in-place conversion of the float model, with the same forward
    method = "l4q" if mode == "qat" else "lowbit"
    apply_quantization(model, method, bits=4, group_size=32, backend="torch")
    layer_type = L4QLinear if mode == "qat" else LowBitLinear
    names = [name for name, m in model.named_modules() if isinstance(m, layer_type)]
    assert [name for name, m in loaded.named_modules() if isinstance(m, layer_type)] == names
    assert loaded.config.quantization_config.target_modules == names
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama.output(loaded, inputs), tiny_llama.output(model, inputs),
                                   rtol=0, atol=0)  # fmt: skip


class _FixedBatches(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(index % 4))
        return {"input_ids": ids, "labels": ids}


def _trainer(model, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=_FixedBatches())


def test_trainer_trains_qat_model_and_refuses_packed_one(tiny_llama, tmp_path):
    model = apply_l4q(tiny_llama.model(), bits=4, group_size=32, r=8, alpha=16, backend="torch")
    model.save_pretrained(tmp_path / "qat")
    loaded = _load(tmp_path / "qat")
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    _trainer(loaded, tmp_path).train()
    changed = {n.rsplit(".", 1)[-1] for n, p in loaded.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"lora_A", "lora_B", "step", "offset"}  # and nothing else moved

    export_l4q(loaded)
    with pytest.raises(ValueError, match="purely quantized models"):
        _trainer(loaded, tmp_path)


def test_dequantize_gives_plain_linear_layers(tiny_llama, tmp_path):
    model = apply_l4q(tiny_llama.model(), bits=4, group_size=32, r=4)
    _perturb_quantizers(model)
    export_l4q(model)
    model.save_pretrained(tmp_path)
    loaded = _load(tmp_path)
    inputs = tiny_llama.inputs()
    with torch.no_grad():
        logits = tiny_llama.output(loaded, inputs)
        expected = {name: m.dequantized_weight() for name, m in loaded.named_modules() if isinstance(m, LowBitLinear)}
    loaded.dequantize()
    assert not any(isinstance(m, LowBitLinear) for m in loaded.modules())
    assert "quantization_config" not in loaded.config.to_dict() and not getattr(loaded, "is_quantized", False)
    for name, weight in expected.items():
        layer = loaded.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama.output(loaded, inputs), logits, rtol=1e-5, atol=1e-5)
