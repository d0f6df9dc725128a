"""The PEFT contract every hf_eff adapter honours, on every tiny model family (in the spirit of PEFT's common tests)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from .cases import CONFIG_CASES, ZERO_AT_INIT

MERGE_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # fp32


@pytest.fixture(params=sorted(CONFIG_CASES))
def case(request):
    return request.param


def make_peft(tiny_model, case, **config_kwargs):
    config = CONFIG_CASES[case](tiny_model.targets, **config_kwargs)
    return get_peft_model(tiny_model.model(), config)


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def adapter_names_in(model, adapter_name: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if f".{adapter_name}." in name or name.endswith(adapter_name)}


def test_forward_at_init_equals_base(tiny_model, case):
    inputs = tiny_model.inputs()
    expected = tiny_model.output(tiny_model.model(), inputs)
    actual = tiny_model.output(make_peft(tiny_model, case), inputs)
    if case in ZERO_AT_INIT:
        assert torch.equal(actual, expected)
    else:
        # R ~ N(0, 1e-5) perturbs the output by far less than the output's own scale
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_training_step_moves_only_adapter_parameters(tiny_model, case):
    model = make_peft(tiny_model, case, init_weights=False)
    trainable = trainable_names(model)
    assert trainable and trainable == adapter_names_in(model, "default")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tiny_model.output(model, tiny_model.inputs()).float().pow(2).mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable


def test_save_load_is_bit_identical(tiny_model, case, tmp_path):
    model = make_peft(tiny_model, case, init_weights=False)
    inputs = tiny_model.inputs()
    expected = tiny_model.output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model.model(), tmp_path)
    assert torch.equal(tiny_model.output(loaded, inputs), expected)


def test_merge_equals_unmerged_and_unmerge_restores(tiny_model, case):
    model = make_peft(tiny_model, case, init_weights=False)
    inputs = tiny_model.inputs()
    base_weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    unmerged = tiny_model.output(model, inputs)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(tiny_model.output(model, inputs), unmerged, **MERGE_TOLERANCE)
    model.unmerge_adapter()
    for key, weight in model.get_base_model().state_dict().items():
        if key in base_weights:
            torch.testing.assert_close(weight, base_weights[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_model.output(model, inputs), unmerged, **MERGE_TOLERANCE)


def test_merge_and_unload(tiny_model, case):
    model = make_peft(tiny_model, case, init_weights=False)
    inputs = tiny_model.inputs()
    unmerged = tiny_model.output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(tiny_model.output(merged, inputs), unmerged, **MERGE_TOLERANCE)


def test_safe_merge_refuses_non_finite_update(tiny_llama, case):
    model = make_peft(tiny_llama, case, init_weights=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight_before = layer.get_base_layer().weight.clone()
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if p.requires_grad).fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight_before)
    assert not layer.merged


def test_multi_adapter_switch_and_delete(tiny_model, case):
    model = make_peft(tiny_model, case, init_weights=False)
    inputs = tiny_model.inputs()
    first = tiny_model.output(model, inputs)
    model.add_adapter("other", CONFIG_CASES[case](tiny_model.targets, init_weights=False))
    assert torch.equal(tiny_model.output(model, inputs), first), "adding an adapter must not change the active one"
    assert not any(p.requires_grad for p in adapter_names_in_params(model, "other"))
    model.set_adapter("other")
    second = tiny_model.output(model, inputs)
    assert not torch.allclose(second, first)
    assert trainable_names(model) == adapter_names_in(model, "other")
    model.set_adapter("default")
    assert torch.equal(tiny_model.output(model, inputs), first)
    model.delete_adapter("other")
    assert not adapter_names_in(model, "other")
    assert torch.equal(tiny_model.output(model, inputs), first)


def adapter_names_in_params(model, adapter_name):
    names = adapter_names_in(model, adapter_name)
    assert names
    return [p for name, p in model.named_parameters() if name in names]


def test_disable_adapter_gives_base_outputs(tiny_model, case):
    inputs = tiny_model.inputs()
    expected = tiny_model.output(tiny_model.model(), inputs)
    model = make_peft(tiny_model, case, init_weights=False)
    adapted = tiny_model.output(model, inputs)
    with model.disable_adapter():
        assert torch.equal(tiny_model.output(model, inputs), expected)
    assert torch.equal(tiny_model.output(model, inputs), adapted)


def test_loading_frozen_or_trainable(tiny_model, case, tmp_path):
    model = make_peft(tiny_model, case, init_weights=False)
    expected_trainable = trainable_names(model)
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_model.model(), tmp_path)
    assert not trainable_names(frozen)
    trainable = PeftModel.from_pretrained(tiny_model.model(), tmp_path, is_trainable=True)
    assert trainable_names(trainable) == expected_trainable
