"""Param groups for hf_eff optimizers and exact optimizer-state accounting."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_eff.optim import optimizer_state_bytes
from hf_eff.optim.factory import optimizer_class, optimizer_param_groups


def names_of(model, params):
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_default_targets_are_attention_and_mlp_linear_weights(tiny_llama):
    model = tiny_llama.model()
    target, decay, no_decay = optimizer_param_groups(model, weight_decay=0.1)
    target_names = names_of(model, target["params"])
    assert target_names == {
        f"model.layers.{i}.{block}.{proj}.weight"
        for i in range(2)
        for block, projs in (("self_attn", "q k v o"), ("mlp", "gate up down"))
        for proj in (f"{p}_proj" for p in projs.split())
    }
    assert target["target"] and not decay["target"] and not no_decay["target"]
    assert (target["weight_decay"], decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.1, 0.0)
    assert {"model.embed_tokens.weight", "lm_head.weight"} & names_of(model, decay["params"])
    assert all("norm" in n for n in names_of(model, no_decay["params"]))
    all_grouped = target["params"] + decay["params"] + no_decay["params"]
    assert len(all_grouped) == len({id(p) for p in all_grouped}) == len(list(model.parameters()))


def test_custom_targets_and_min_side(tiny_llama):
    model = tiny_llama.model()
    target = optimizer_param_groups(model, target_modules=["q_proj", "k_proj"], min_target_side=32)[0]
    # k_proj is 16 x 32 (two KV heads): its smaller side is below 32, so it stays in the plain group
    assert names_of(model, target["params"]) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_peft_model_targets_the_trainable_adapter_matrices(tiny_llama):
    model = get_peft_model(tiny_llama.model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    target, decay, no_decay = optimizer_param_groups(model)
    assert names_of(model, target["params"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not decay["params"] and not no_decay["params"]


def test_targets_matching_nothing_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match=r"`target_modules`=\['nope'\] matched no trainable Linear weight"):
        optimizer_param_groups(tiny_llama.model(), target_modules=["nope"])


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match=r"`name` must be one of .*'galore_adamw'.*got 'adamw9000'"):
        optimizer_class("adamw9000")


def test_state_bytes_of_adamw_are_exact():
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params)
    assert optimizer_state_bytes(optimizer) == 0
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    # two fp32 moments per parameter plus a 0-d fp32 step counter each
    assert optimizer_state_bytes(optimizer) == 2 * 4 * (35 + 3) + 2 * 4


def test_state_bytes_count_shared_storage_once():
    param = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    buffer = torch.zeros(16)
    optimizer.state[param] = {"whole": buffer, "view": buffer[:8], "again": [buffer.view(4, 4)]}
    assert optimizer_state_bytes(optimizer) == 16 * 4
