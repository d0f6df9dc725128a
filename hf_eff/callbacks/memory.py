"""Optimizer-memory report: parameter, gradient and optimizer-state bytes and the peak, added to the Trainer's logs."""

from __future__ import annotations

import sys

import torch
from transformers import TrainerCallback

from hf_eff.optim.memory import optimizer_state_bytes

from .spike import record_in_logs

__all__ = ["OptimizerMemoryCallback", "gradient_bytes", "parameter_bytes", "peak_memory_bytes"]


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each counted once (tied weights included once), frozen ones included."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients the model's parameters hold now (parameters without a gradient count zero)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory so far: CUDA's allocator peak on a CUDA device, else the whole process's peak resident set.

    The CPU figure (`getrusage(RUSAGE_SELF).ru_maxrss`) covers everything the process ever held resident (Python,
    libraries, data loading), not only tensors. None where `resource` does not exist (Windows).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class OptimizerMemoryCallback(TrainerCallback):
    """Adds memory figures, in bytes, to every Trainer log entry that follows at least one optimizer step.

    - `optimizer_state_bytes`: every tensor reachable from the optimizer's state (`hf_eff.optim.optimizer_state_bytes`),
      measured when the entry is logged, i.e. after the last step;
    - `parameter_bytes`: the model's parameters (frozen ones included, shared ones once), measured when logged;
    - `gradient_bytes`: gradients of the parameters that had one at `on_pre_optimizer_step` of the last step (the
      Trainer frees gradients right after the step, so they are measured then; after gradient clipping);
    - `peak_memory_bytes`: `torch.cuda.max_memory_allocated` when the model is on CUDA; otherwise the whole
      process's peak resident set size (`ru_maxrss`, Linux/macOS), which counts far more than tensors. Omitted when
      neither is available.

    The keys reach `state.log_history` and the callbacks listed after this one; `report_to` reporters run before
    the Trainer's user callbacks: `trainer.callback_handler.callbacks.insert(1, callback)` lets them see the keys.
    """

    def __init__(self) -> None:
        self.last_gradient_bytes: int | None = None
        self._steps_since_log = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("OptimizerMemoryCallback: `on_pre_optimizer_step` needs the `model` keyword argument")
        self.last_gradient_bytes = gradient_bytes(model)
        self._steps_since_log += 1

    def memory_report(self, model: torch.nn.Module, optimizer=None) -> dict[str, int]:
        """The figures as they stand now (gradients: as recorded at the last `on_pre_optimizer_step`)."""
        report = {"parameter_bytes": parameter_bytes(model)}
        if optimizer is not None:
            report["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
        if self.last_gradient_bytes is not None:
            report["gradient_bytes"] = self.last_gradient_bytes
        peak = peak_memory_bytes(_model_device(model))
        if peak is not None:
            report["peak_memory_bytes"] = peak
        return report

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if self._steps_since_log == 0 or model is None:
            return
        record_in_logs(state, logs, self.memory_report(model, optimizer))
        self._steps_since_log = 0
