"""Gradient spike monitor, with the spike definition of "SPAM: Spike-Aware Adam with Momentum Reset" (Huang et al.)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from hf_eff.optim.checks import is_int, is_real, require

__all__ = ["GradientSpikeCallback", "count_spikes", "record_in_logs"]

logger = logging.getLogger(__name__)


def record_in_logs(state: Any, logs: dict[str, Any] | None, values: Mapping[str, float]) -> None:
    """Adds `values` to the entry the Trainer is logging, from inside `on_log`.

    `Trainer.log` appends a copy of `logs` to `state.log_history` and only then calls `on_log`, so updating `logs`
    alone would reach the callbacks after this one (the console printer) but not the history: the entry just
    appended is updated too, recognised by its step and by its keys all being in `logs` (earlier callbacks may
    have added keys to `logs` since).
    """
    if logs is None:
        return
    history = getattr(state, "log_history", None)
    if history:
        entry = history[-1]
        same_step = entry.get("step") == getattr(state, "global_step", None)
        if same_step and all(key in logs for key in entry if key != "step"):
            entry.update(values)
    logs.update(values)


def count_spikes(grad: torch.Tensor, exp_avg_sq: torch.Tensor, threshold: float) -> torch.Tensor:
    """Number of entries with g² > threshold·v (a 0-d tensor on the gradient's device; no host sync)."""
    return (grad.float().square() > exp_avg_sq.float() * threshold).sum()


def _params_with_grad(optimizer: Any, model: torch.nn.Module | None) -> Iterable[torch.Tensor]:
    """The parameters the coming step updates: the optimizer's (those with a gradient), else the model's."""
    if optimizer is not None:
        params = (p for group in optimizer.param_groups for p in group["params"])
    elif model is not None:
        params = model.parameters()
    else:
        raise ValueError("GradientSpikeCallback: the event needs `optimizer` or `model` among its keyword arguments")
    return [p for p in params if p.grad is not None]


class GradientSpikeCallback(TrainerCallback):
    """Counts gradient spikes at every optimizer step and adds them to the Trainer's logs.

    An entry of a gradient is a spike when g² > threshold·v, v being the running second moment of that entry before
    this step's gradient enters it (SPAM's v_{t−1}, no bias correction). Counted at `on_pre_optimizer_step`, i.e.
    after the Trainer's gradient clipping and before `optimizer.step()`.

    Where v comes from, per parameter:

    - the optimizer's own `state[p]["exp_avg_sq"]` when it exists with the gradient's shape (torch AdamW, SPAM
      dense, GaLore's untargeted weights): read, never copied, so monitoring costs no memory;
    - otherwise (SGD, Adafactor, GaLore's projected moments, SPAM sparse momentum, 8-bit optimizers) an EMA kept by
      the callback, v := beta2·v + (1 − beta2)·g², in float32: **4 bytes per entry of every such parameter**.

    A parameter's first step has no history (v does not exist yet, or would be zero): nothing is counted for it
    then. Note that raw v after one step is (1 − beta2)·g₁², so with the defaults a gradient that grows by √5 from
    step 1 to step 2 counts as a spike, as SPAM would clip it (SPAM itself pauses clipping for its first steps).

    Logged keys (added in `on_log` to the entry being logged, in `state.log_history` included):

    - `grad_spikes`: spikes counted over the optimizer steps since the previous log entry (with logging_steps=1 the
      count of the last step; with logging_steps > 1 the sum over those steps);
    - `grad_spike_fraction`: those spikes over all gradient entries seen at those steps.

    Nothing is added to a log entry with no optimizer step since the previous one. Reporters (`report_to`) run their
    `on_log` before the callbacks passed to the Trainer and so do not see these keys; to feed them, put the callback
    ahead of them: `trainer.callback_handler.callbacks.insert(1, callback)`.

    Alert: when one step's count reaches `alert_at`, `on_alert(step, count)` is called if given, else one warning is
    logged for that step; `step` is the number of the optimizer step being taken (its log entry's `step`).

    Cost: one host synchronization per optimizer step (the count), plus one elementwise comparison per gradient.
    """

    def __init__(
        self,
        threshold: float = 5000.0,
        beta2: float = 0.999,
        alert_at: int | None = None,
        on_alert: Callable[[int, int], Any] | None = None,
    ) -> None:
        name = type(self).__name__
        require(
            is_real(threshold) and math.isfinite(threshold) and threshold > 0,
            name,
            "threshold",
            "a finite number > 0",
            threshold,
        )
        require(is_real(beta2) and 0 <= beta2 < 1, name, "beta2", "a number in [0, 1)", beta2)
        require(
            alert_at is None or (is_int(alert_at) and alert_at >= 1), name, "alert_at", "None or an int >= 1", alert_at
        )
        require(on_alert is None or callable(on_alert), name, "on_alert", "None or a callable (step, count)", on_alert)
        self.threshold = float(threshold)
        self.beta2 = float(beta2)
        self.alert_at = alert_at
        self.on_alert = on_alert
        # Own second moments, only for parameters whose optimizer keeps none of the gradient's shape.
        self._exp_avg_sq: dict[torch.Tensor, torch.Tensor] = {}
        self.last_step_spikes = 0
        self._pending_spikes = 0
        self._pending_entries = 0
        self._pending_steps = 0

    def _second_moment(self, param: torch.Tensor, optimizer: Any) -> torch.Tensor | None:
        """v_{t−1} for `param`, or None when it has no history yet; updates the callback's own EMA."""
        grad = param.grad
        optimizer_state = optimizer.state.get(param) if optimizer is not None else None
        exp_avg_sq = optimizer_state.get("exp_avg_sq") if optimizer_state else None
        if isinstance(exp_avg_sq, torch.Tensor) and exp_avg_sq.shape == grad.shape:
            self._exp_avg_sq.pop(param, None)  # the optimizer has (again) a usable one; drop ours
            return exp_avg_sq
        own = self._exp_avg_sq.get(param)
        if own is None:
            self._exp_avg_sq[param] = (1 - self.beta2) * grad.detach().float().square()
            return None
        previous = own.clone()
        own.mul_(self.beta2).addcmul_(grad.detach().float(), grad.detach().float(), value=1 - self.beta2)
        return previous

    def count_step(self, optimizer: Any = None, model: torch.nn.Module | None = None) -> tuple[int, int]:
        """Spikes and gradient entries of the step about to be taken (its gradients, before `optimizer.step()`)."""
        spikes: dict[torch.device, torch.Tensor] = {}
        entries = 0
        for param in _params_with_grad(optimizer, model):
            entries += param.grad.numel()
            exp_avg_sq = self._second_moment(param, optimizer)
            if exp_avg_sq is None:
                continue
            count = count_spikes(param.grad.detach(), exp_avg_sq, self.threshold)
            spikes[count.device] = spikes.get(count.device, 0) + count
        return sum(int(count) for count in spikes.values()), entries

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        count, entries = self.count_step(optimizer, model)
        self.last_step_spikes = count
        self._pending_spikes += count
        self._pending_entries += entries
        self._pending_steps += 1
        if self.alert_at is not None and count >= self.alert_at:
            step = state.global_step + 1
            if self.on_alert is not None:
                self.on_alert(step, count)
            else:
                logger.warning(f"Gradient spikes at step {step}: {count} entries with g² > {self.threshold:g}·v")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_steps == 0:
            return
        fraction = self._pending_spikes / self._pending_entries if self._pending_entries else 0.0
        record_in_logs(state, logs, {"grad_spikes": self._pending_spikes, "grad_spike_fraction": fraction})
        self._pending_spikes = self._pending_entries = self._pending_steps = 0
