"""Bad input fails with a clear error before anything is modified."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from hf_eff import BlockLoraConfig, LoraXSConfig, ShareLoraConfig

from .cases import CONFIG_CASES


def assert_untouched(model, state_before):
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # the first targets are valid, the last one is not: nothing may be replaced
        (LoraXSConfig(r=20, target_modules=["q_proj", "gate_proj", "k_proj"]), r"`r`=20 is larger than the rank 16"),
        (BlockLoraConfig(r=4, num_blocks=3, target_modules=["q_proj", "v_proj"]), r"`num_blocks`=3 does not divide"),
        (BlockLoraConfig(r=16, num_blocks=4, target_modules=["q_proj"]), r"`r`=16 is larger than the rank 8"),
        (ShareLoraConfig(r=4, target_modules=["nonexistent_proj"]), r"matched no module.*q_proj"),
    ],
)
def test_invalid_target_fails_before_any_module_is_replaced(tiny_llama, config, message):
    model = tiny_llama.model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config)
    assert_untouched(model, before)


def test_unsupported_module_type_is_named(tiny_llama):
    model = tiny_llama.model()
    before = snapshot(model)
    with pytest.raises(TypeError, match="'model.embed_tokens' is a Embedding"):
        get_peft_model(model, ShareLoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ShareLoraConfig(share="C"), r"`share` must be one of \('A', 'B', 'AB'\), got 'C'"),
        (lambda: ShareLoraConfig(r=0), r"`r` must be a positive integer, got 0"),
        (lambda: LoraXSConfig(r=2.5), r"`r` must be a positive integer, got 2.5"),
        (lambda: BlockLoraConfig(lora_dropout=1.0), r"`lora_dropout` must be in \[0, 1\), got 1.0"),
        (lambda: BlockLoraConfig(num_blocks=0), r"`num_blocks` must be a positive integer, got 0"),
        (lambda: LoraXSConfig(svd_method="qr"), r"`svd_method` must be one of \('full', 'randomized'\), got 'qr'"),
        (lambda: LoraXSConfig(layers_pattern="layers"), r"`layers_pattern` needs `layers_to_transform`"),
    ],
)
def test_config_validation(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_second_adapter_leaves_the_first_intact(tiny_llama):
    model = get_peft_model(tiny_llama.model(), BlockLoraConfig(r=4, target_modules=["q_proj"], init_weights=False))
    inputs = tiny_llama.inputs()
    expected = tiny_llama.output(model, inputs)
    with pytest.raises(ValueError, match="does not divide"):
        model.add_adapter("bad", BlockLoraConfig(r=4, num_blocks=5, target_modules=["q_proj"]))
    assert "bad" not in model.peft_config
    assert not [name for name, _ in model.named_parameters() if ".bad" in name]
    assert torch.equal(tiny_llama.output(model, inputs), expected)


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_adapter_loaded_onto_a_mismatching_base_model(tiny_llama, case, tmp_path):
    import transformers

    targets = ["q_proj", "v_proj"]
    get_peft_model(tiny_llama.model(), CONFIG_CASES[case](targets, init_weights=False)).save_pretrained(tmp_path)
    config = tiny_llama.build().config
    config.hidden_size, config.intermediate_size = 48, 96
    other = transformers.LlamaForCausalLM(config).eval()
    before = snapshot(other)
    with pytest.raises(
        ValueError,
        match=r"(does not fit this base model|differ from the ones it was trained on).*the model is left as it was",
    ):
        PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other, before)
