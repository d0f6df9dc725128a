"""Tests for hf_eff.callbacks.memory: parameter, gradient, optimizer-state and peak bytes, in the Trainer's logs."""

from __future__ import annotations

import resource
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState

from hf_eff.callbacks import OptimizerMemoryCallback
from hf_eff.callbacks.memory import peak_memory_bytes
from hf_eff.optim import SPAM, optimizer_state_bytes

from . import tiny_trainer


def _step(model, optimizer, callback, inputs, state):
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    callback.on_pre_optimizer_step(None, state, TrainerControl(), model=model, optimizer=optimizer)
    optimizer.step()
    optimizer.zero_grad()
    state.global_step += 1


def _log(callback, state, model, optimizer):
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": state.global_step})
    callback.on_log(None, state, TrainerControl(), logs=logs, model=model, optimizer=optimizer)
    return logs


def test_figures_equal_the_hand_computed_ones_on_a_peft_model(tiny_llama):
    model = get_peft_model(tiny_llama.model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = SPAM([p for p in model.parameters() if p.requires_grad], density=0.5)
    callback = OptimizerMemoryCallback()
    state = TrainerState()
    for _ in range(2):
        _step(model, optimizer, callback, tiny_llama.inputs(), state)
    logs = _log(callback, state, model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert logs["parameter_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert logs["gradient_bytes"] == 4 * sum(p.numel() for p in trainable) < logs["parameter_bytes"]
    assert logs["optimizer_state_bytes"] == optimizer_state_bytes(optimizer) > 0
    assert state.log_history[-1] == {"loss": 1.0, "step": 2, **logs}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    assert peak <= logs["peak_memory_bytes"] <= peak_memory_bytes(torch.device("cpu"))
    later = {"eval_loss": 2.0}
    callback.on_log(None, state, TrainerControl(), logs=later, model=model, optimizer=optimizer)
    assert later == {"eval_loss": 2.0}  # nothing added without an optimizer step since the last entry


def test_gradient_bytes_count_only_parameters_with_a_gradient(tiny_llama):
    model = tiny_llama.model().train()
    model.lm_head.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = OptimizerMemoryCallback()
    state = TrainerState()
    _step(model, optimizer, callback, tiny_llama.inputs(), state)
    logs = _log(callback, state, model, optimizer)
    with_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert logs["gradient_bytes"] == 4 * with_grad
    # AdamW: two fp32 moments per trained entry plus a scalar step per parameter
    assert logs["optimizer_state_bytes"] == 2 * 4 * with_grad + 4 * len(optimizer.state)


def test_trainer_run_puts_memory_in_the_log_history(tiny_llama, tmp_path):
    model = tiny_llama.model()
    trainer = tiny_trainer(model, tmp_path, [OptimizerMemoryCallback()], max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "optimizer_state_bytes" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    last = logged[-1]
    assert last["optimizer_state_bytes"] == optimizer_state_bytes(trainer.optimizer)
    assert last["parameter_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert last["gradient_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert last["peak_memory_bytes"] > last["parameter_bytes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_peak_on_cuda_is_the_allocator_peak():
    device = torch.device("cuda")
    assert peak_memory_bytes(device) == torch.cuda.max_memory_allocated(device)
