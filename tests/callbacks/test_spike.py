"""Tests for hf_eff.callbacks.spike: SPAM's spike count against a hand computation, logs, alerts, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from hf_eff.callbacks import GradientSpikeCallback

from . import tiny_trainer


def _run_steps(model, optimizer, callback, inputs, steps, state):
    """A plain training loop firing the callback as the Trainer does; returns the gradients each step saw."""
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = {p: p.grad.detach().double().clone() for p in model.parameters() if p.grad is not None}
        callback.on_pre_optimizer_step(None, state, TrainerControl(), optimizer=optimizer, model=model)
        yield grads
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1


def test_counts_against_the_optimizers_second_moment(tiny_llama):
    model = tiny_llama.model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # AdamW's v after one step is 0.001·g₁²: with θ = 1000 an entry spikes at step 2 where |g₂| > |g₁|.
    callback = GradientSpikeCallback(threshold=1000.0)
    state = TrainerState()
    counts = []
    for grads in _run_steps(model, optimizer, callback, tiny_llama.inputs(), 3, state):
        expected = 0
        for param, grad in grads.items():
            if "exp_avg_sq" in optimizer.state.get(param, {}):
                expected += int((grad.square() > 1000.0 * optimizer.state[param]["exp_avg_sq"].double()).sum())
        assert callback.last_step_spikes == expected
        counts.append(expected)
    total = sum(p.numel() for p in model.parameters())
    assert counts[0] == 0  # no history at the first step
    assert 0 < counts[1] < total and 0 < counts[2] < total
    assert not callback._exp_avg_sq  # reused the optimizer's moments, kept none of its own


def test_own_moment_when_the_optimizer_keeps_none(tiny_llama):
    model = tiny_llama.model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    beta2, threshold = 0.9, 20.0
    callback = GradientSpikeCallback(threshold=threshold, beta2=beta2)
    moments: dict = {}
    counts = []
    for grads in _run_steps(model, optimizer, callback, tiny_llama.inputs(), 4, TrainerState()):
        expected = 0
        for param, grad in grads.items():
            if param in moments:
                expected += int((grad.square() > threshold * moments[param]).sum())
                moments[param] = beta2 * moments[param] + (1 - beta2) * grad.square()
            else:
                moments[param] = (1 - beta2) * grad.square()
        assert callback.last_step_spikes == expected
        counts.append(expected)
    assert counts[0] == 0 and sum(counts) > 0
    for param, moment in moments.items():
        torch.testing.assert_close(callback._exp_avg_sq[param].double(), moment, rtol=1e-5, atol=0)


def test_logs_the_sum_since_the_last_log_in_the_history(tiny_llama):
    model = tiny_llama.model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    callback = GradientSpikeCallback(threshold=1000.0)
    state = TrainerState()
    counts = []
    for _ in _run_steps(model, optimizer, callback, tiny_llama.inputs(), 3, state):
        counts.append(callback.last_step_spikes)
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": state.global_step})  # as Trainer.log does before on_log
    callback.on_log(None, state, TrainerControl(), logs=logs)
    entries = 3 * sum(p.numel() for p in model.parameters())
    assert logs["grad_spikes"] == sum(counts) > 0
    assert logs["grad_spike_fraction"] == pytest.approx(sum(counts) / entries)
    assert state.log_history[-1] == {"loss": 1.0, "step": 3, **logs}
    later = {"eval_loss": 2.0}
    callback.on_log(None, state, TrainerControl(), logs=later)
    assert later == {"eval_loss": 2.0}  # no step since the last entry: nothing added


class _AddsKey(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        logs["other_metric"] = 1.0


class _Reporter(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_trainer_run_puts_spikes_in_the_log_history(tiny_llama, tmp_path):
    callback = GradientSpikeCallback(threshold=1000.0)
    reporter = _Reporter()
    trainer = tiny_trainer(tiny_llama.model(), tmp_path, [reporter], max_steps=4, logging_steps=2)
    # another callback adding a key before ours, and ours ahead of a reporter (the documented recipe)
    trainer.callback_handler.callbacks[1:1] = [_AddsKey(), callback]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "grad_spikes" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all("loss" in entry and 0 <= entry["grad_spike_fraction"] <= 1 for entry in logged)
    assert logged[-1]["grad_spikes"] > 0  # steps 3 and 4 had AdamW history
    assert [logs["grad_spikes"] for logs in reporter.seen if "grad_spikes" in logs] == [
        e["grad_spikes"] for e in logged
    ]


def test_alert_calls_the_handler_when_forced(tiny_llama):
    model = tiny_llama.model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    alerts = []
    callback = GradientSpikeCallback(
        threshold=1e-12, alert_at=1, on_alert=lambda step, count: alerts.append((step, count))
    )
    counts = [
        callback.last_step_spikes
        for _ in _run_steps(model, optimizer, callback, tiny_llama.inputs(), 3, TrainerState())
    ]
    assert counts[0] == 0 and counts[1] > 0
    assert alerts == [(2, counts[1]), (3, counts[2])]


def test_alert_warns_once_per_step_without_a_handler(tiny_llama, caplog):
    model = tiny_llama.model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    callback = GradientSpikeCallback(threshold=1e-12, alert_at=1)
    with caplog.at_level(logging.WARNING, logger="hf_eff.callbacks.spike"):
        for _ in _run_steps(model, optimizer, callback, tiny_llama.inputs(), 3, TrainerState()):
            pass
    messages = [record.getMessage() for record in caplog.records if record.name == "hf_eff.callbacks.spike"]
    assert len(messages) == 2 and messages[0].startswith("Gradient spikes at step 2:")


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"beta2": 1.0}, "beta2"),
        ({"alert_at": 0}, "alert_at"),
        ({"alert_at": 1.5}, "alert_at"),
        ({"on_alert": "print"}, "on_alert"),
    ],
)
def test_bad_arguments_are_refused(arguments, argument):
    with pytest.raises(ValueError, match=f"GradientSpikeCallback: `{argument}` must be"):
        GradientSpikeCallback(**arguments)
