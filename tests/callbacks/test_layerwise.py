"""Tests for hf_eff.callbacks.layerwise: LISA's schedule, what toggles, optimizer state, resume, OwLore, errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState

from hf_eff.callbacks import LayerwiseSamplingCallback
from hf_eff.callbacks.layerwise import find_decoder_layers, outlier_ratio
from hf_eff.optim import SPAM

from . import tiny_trainer

NUM_LAYERS = 4


def _llama(seed: int = 0, num_layers: int = NUM_LAYERS) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _layers_with_grad(model) -> tuple[int, ...]:
    return tuple(
        i for i, layer in enumerate(find_decoder_layers(model)) if any(p.grad is not None for p in layer.parameters())
    )


def _manual_run(model, optimizer, callback, inputs, steps, check=None):
    """The Trainer's event order, by hand: train begin, then per step: step begin, backward, (check), step."""
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control, model=model, optimizer=optimizer)
    for _ in range(steps):
        callback.on_step_begin(None, state, control, model=model, optimizer=optimizer)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        if check is not None:
            check(state.global_step)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
    callback.on_train_end(None, state, control, model=model, optimizer=optimizer)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, SPAM])
def test_exactly_gamma_layers_train_and_inactive_ones_hold_no_state(tiny_llama, optimizer_cls):
    model = _llama().train()
    optimizer = optimizer_cls(model.parameters(), lr=1e-3)
    callback = LayerwiseSamplingCallback(num_active_layers=2, interval=3, seed=1)
    layers = find_decoder_layers(model)
    always = [model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight]
    seen = []

    def check(step):
        active = callback.active_layers
        assert len(active) == 2 and _layers_with_grad(model) == active
        assert all(p.requires_grad and p.grad is not None for p in always)
        for index, layer in enumerate(layers):
            assert all(p.requires_grad == (index in active) for p in layer.parameters())
            if index not in active:
                assert not any(p in optimizer.state for p in layer.parameters())
        seen.append(active)

    _manual_run(model, optimizer, callback, tiny_llama.inputs(), 7, check)
    assert [step for step, _ in callback.switch_history] == [0, 3, 6]
    assert seen == [callback.switch_history[k][1] for k in (0, 0, 0, 1, 1, 1, 2)]
    assert len(set(seen)) > 1
    assert [callback.layers_for_switch(k) for k in range(3)] == [layers for _, layers in callback.switch_history]
    assert all(p.requires_grad for p in model.parameters())  # restored at train end


def test_a_layer_switched_back_on_starts_with_fresh_state(tiny_llama):
    model = _llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = LayerwiseSamplingCallback(num_active_layers=1, interval=1, seed=0)
    steps = {}

    def check(global_step):
        layer = find_decoder_layers(model)[callback.active_layers[0]]
        state = optimizer.state.get(layer.self_attn.q_proj.weight, {})
        steps[global_step] = int(state["step"]) if state else 0

    _manual_run(model, optimizer, callback, tiny_llama.inputs(), 8, check)
    history = [layers for _, layers in callback.switch_history]
    for k in range(1, 8):  # the state before step k: kept when the layer stays on, absent after a pause
        expected = steps[k - 1] + 1 if history[k] == history[k - 1] else 0
        assert steps[k] == expected
    assert any(history[k] == history[k - 1] for k in range(1, 8))  # a layer kept on
    assert any(history[k] in history[: k - 1] and history[k] != history[k - 1] for k in range(2, 8))  # back on


def test_peft_only_adapters_toggle_and_frozen_parameters_stay_frozen():
    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    callback = LayerwiseSamplingCallback(num_active_layers=1, interval=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)
    (active,) = callback.active_layers
    for index, layer in enumerate(find_decoder_layers(model)):
        for name, param in layer.named_parameters():
            assert param.requires_grad == ("lora_" in name and index == active), name
    callback.on_train_end(None, TrainerState(), TrainerControl())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_always_trainable_keeps_matching_parameters_and_freezes_the_rest_outside_the_layers():
    model = _llama()
    callback = LayerwiseSamplingCallback(num_active_layers=1, always_trainable=["embed_tokens", "norm"])
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trainable
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= trainable
    assert all(f"model.layers.{i}.input_layernorm.weight" in trainable for i in range(NUM_LAYERS))
    (active,) = callback.active_layers
    assert {name.split(".")[2] for name in trainable if "proj" in name} == {str(active)}
    callback.on_train_end(None, TrainerState(), TrainerControl())
    assert all(p.requires_grad for p in model.parameters())


class _RecordActiveLayers(TrainerCallback):
    def __init__(self):
        self.by_step = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step + 1] = _layers_with_grad(model)


def _lisa_trainer(output_dir, **arguments):
    recorder = _RecordActiveLayers()
    callback = LayerwiseSamplingCallback(num_active_layers=2, interval=3, seed=3)
    settings = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "learning_rate": 1e-2}
    settings.update(arguments)
    return tiny_trainer(_llama(), output_dir, [callback, recorder], **settings), recorder


def test_trainer_resume_reproduces_the_schedule_and_the_parameters(tmp_path):
    uninterrupted, full = _lisa_trainer(tmp_path / "full")
    uninterrupted.train()
    assert sorted(full.by_step) == list(range(1, 9))
    switches = [full.by_step[step] for step in (1, 4, 7)]
    assert all(full.by_step[step] == switches[(step - 1) // 3] for step in full.by_step)
    assert len(set(switches)) > 1
    layers = find_decoder_layers(uninterrupted.model)
    for index, layer in enumerate(layers):  # through the Trainer's wrapped optimizer too
        held = [p in uninterrupted.optimizer.state for p in layer.parameters()]
        assert all(held) if index in switches[-1] else not any(held)

    resumed, partial = _lisa_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert partial.by_step == {step: full.by_step[step] for step in range(5, 9)}
    for (name, expected), actual in zip(uninterrupted.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def _plant_outliers(layer: nn.Module, fraction: float) -> None:
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                flat = module.weight.view(-1)
                flat[: round(fraction * flat.numel())] = 1.0


def test_outlier_sampling_prefers_the_outlier_heavy_layer():
    model = _llama()
    layers = find_decoder_layers(model)
    for index, fraction in enumerate([0.01, 0.01, 0.1, 0.01]):
        _plant_outliers(layers[index], fraction)
    weights = [module.weight for module in layers[2].modules() if isinstance(module, nn.Linear)]
    expected = sum(int((w.abs() > 7 * w.abs().mean()).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert outlier_ratio(layers[2]) == pytest.approx(expected) == pytest.approx(0.1, abs=0.002)

    callback = LayerwiseSamplingCallback(num_active_layers=1, sampling="outlier")
    callback.setup(model)
    draws = [callback.layers_for_switch(k)[0] for k in range(50)]
    counts = [draws.count(index) for index in range(NUM_LAYERS)]
    # P(layer 2) = 0.1 / 0.13 ≈ 0.77, i.e. ≈ 38 of 50; uniform sampling would give ≈ 12.5
    assert counts[2] >= 25 and counts[2] > 2 * max(counts[:2] + counts[3:])
    uniform = LayerwiseSamplingCallback(num_active_layers=1, sampling="uniform")
    uniform.setup(model)
    assert [uniform.layers_for_switch(k)[0] for k in range(50)].count(2) < 25


def test_outlier_sampling_fills_with_zero_ratio_layers_when_too_few_have_outliers():
    model = _llama()
    _plant_outliers(find_decoder_layers(model)[1], 0.05)  # the other layers' Gaussian weights have no outlier
    callback = LayerwiseSamplingCallback(num_active_layers=3, sampling="outlier")
    callback.setup(model)
    draws = [callback.layers_for_switch(k) for k in range(20)]
    assert all(len(set(layers)) == 3 and 1 in layers for layers in draws)


def test_finds_the_layers_of_common_models(tiny_gpt2):
    gpt2 = tiny_gpt2.model()
    assert find_decoder_layers(gpt2) is gpt2.transformer.h
    llama = _llama()
    peft_model = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_decoder_layers(peft_model) is llama.model.layers
    assert find_decoder_layers(peft_model, "model.layers") is llama.model.layers

    class Wrapped(nn.Module):  # neither known path: found by config.num_hidden_layers
        def __init__(self):
            super().__init__()
            self.config = llama.config
            self.stack = nn.ModuleDict({"blocks": llama.model.layers})

    assert find_decoder_layers(Wrapped()) is llama.model.layers
    assert find_decoder_layers(Wrapped(), "stack.blocks") is llama.model.layers


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"num_active_layers": 0}, "num_active_layers"),
        ({"num_active_layers": 1.0}, "num_active_layers"),
        ({"interval": 0}, "interval"),
        ({"sampling": "topk"}, "sampling"),
        ({"seed": "0"}, "seed"),
        ({"layers_attribute": ""}, "layers_attribute"),
        ({"always_trainable": "lm_head"}, "always_trainable"),
        ({"always_trainable": []}, "always_trainable"),
        ({"outlier_multiple": 0}, "outlier_multiple"),
    ],
)
def test_bad_arguments_are_refused(arguments, argument):
    with pytest.raises(ValueError, match=f"LayerwiseSamplingCallback: `{argument}` must be"):
        LayerwiseSamplingCallback(**arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_active_layers": NUM_LAYERS + 1}, "`num_active_layers` must be at most the number of decoder layers"),
        ({"layers_attribute": "model.missing"}, "`layers_attribute` must name a non-empty nn.ModuleList"),
        ({"always_trainable": ["lm_head", "nowhere"]}, r"\['nowhere'\] match none"),
    ],
)
def test_train_begin_errors_change_nothing(arguments, message):
    model = _llama()
    callback = LayerwiseSamplingCallback(**arguments)
    with pytest.raises(ValueError, match=message):
        callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_a_layer_list_gets_a_clear_error():
    with pytest.raises(ValueError, match="could not find the decoder layers of Sequential.*layers_attribute"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))
