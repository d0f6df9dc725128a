"""Layer sampling: LISA (Layerwise Importance Sampling, Pan et al. 2024) and OwLore's outlier-weighted sampling."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from hf_eff.optim.checks import is_int, is_real, require
from hf_eff.optim.functional import seeded_generator

__all__ = ["LayerwiseSamplingCallback", "choose_layers", "find_decoder_layers", "outlier_ratio"]

_NAME = "LayerwiseSamplingCallback"
_SAMPLINGS = ("uniform", "outlier")
# Where common architectures keep their decoder blocks, relative to the bare model (PEFT's base model).
_KNOWN_LAYER_PATHS = ("model.layers", "transformer.h")


def _resolve(root: nn.Module, dotted_path: str) -> Any:
    obj: Any = root
    for part in dotted_path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_layer_list(obj: Any) -> bool:
    return isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0


def find_decoder_layers(model: nn.Module, layers_attribute: str | None = None) -> nn.ModuleList:
    """The model's list of decoder blocks.

    With `layers_attribute` ("model.layers"), that dotted path on the model or, for a PEFT model, on its base model.
    Otherwise `model.layers` or `transformer.h` of the base model (`get_base_model()` for PEFT models), else the first
    `nn.ModuleList` whose length equals `config.num_hidden_layers`. ValueError when none is found.
    """
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    roots = [model] if base is model else [model, base]
    if layers_attribute is not None:
        for root in roots:
            found = _resolve(root, layers_attribute)
            if _is_layer_list(found):
                return found
        raise ValueError(
            f"{_NAME}: `layers_attribute` must name a non-empty nn.ModuleList on the model "
            f"({type(model).__name__}) or its base model, got {layers_attribute!r}"
        )
    for path in _KNOWN_LAYER_PATHS:
        found = _resolve(base, path)
        if _is_layer_list(found):
            return found
    num_layers = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    if is_int(num_layers) and num_layers > 0:
        for module in base.modules():
            if isinstance(module, nn.ModuleList) and len(module) == num_layers:
                return module
    raise ValueError(
        f"{_NAME}: could not find the decoder layers of {type(base).__name__} (tried {', '.join(_KNOWN_LAYER_PATHS)} "
        f"and an nn.ModuleList of config.num_hidden_layers={num_layers!r} modules); pass "
        "`layers_attribute`, e.g. layers_attribute='model.layers'"
    )


def _linear_weights(layer: nn.Module) -> Iterator[torch.Tensor]:
    """Floating-point weights of the layer's Linear (and GPT-2 Conv1D) modules; for a PEFT-wrapped Linear, the base
    weight only (adapter matrices are not the pretrained weights whose outliers OwLore measures)."""
    inside_tuner: list[str] = []
    for name, module in layer.named_modules():
        if any(name.startswith(prefix) for prefix in inside_tuner):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_tuner.append(f"{name}.")
            module = module.get_base_layer()
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight.is_floating_point():
            yield module.weight


@torch.no_grad()
def outlier_ratio(layer: nn.Module, outlier_multiple: float = 7.0) -> float:
    """Fraction of the layer's Linear weight entries with |w| > outlier_multiple·mean(|w|), the mean taken per weight
    matrix (projections of one block differ in scale); 0.0 for a layer without Linear weights."""
    outliers = 0
    entries = 0
    for weight in _linear_weights(layer):
        magnitude = weight.detach().abs().float()
        outliers += int((magnitude > outlier_multiple * magnitude.mean()).sum())
        entries += magnitude.numel()
    return outliers / entries if entries else 0.0


def choose_layers(
    num_layers: int, num_active: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> tuple[int, ...]:
    """`num_active` distinct layer indices (sorted): uniformly, or without replacement with probability ∝ `weights`.

    Layers of weight zero are drawn (uniformly) only once every positive-weight layer has been taken.
    """
    if weights is None:
        return tuple(sorted(torch.randperm(num_layers, generator=generator)[:num_active].tolist()))
    positive = int((weights > 0).sum())
    weighted = min(num_active, positive)
    chosen = torch.multinomial(weights, weighted, replacement=False, generator=generator).tolist() if weighted else []
    if weighted < num_active:
        zero_weight = (weights <= 0).nonzero().flatten()
        order = torch.randperm(zero_weight.numel(), generator=generator)
        chosen += zero_weight[order[: num_active - weighted]].tolist()
    return tuple(sorted(chosen))


def _check_always_trainable(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    valid = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(item, str) and item for item in value)
    )
    require(valid, _NAME, "always_trainable", "None or a non-empty list of parameter-name substrings", value)
    return tuple(value)


class LayerwiseSamplingCallback(TrainerCallback):
    """LISA: at any time only `num_active_layers` (γ) of the decoder layers are trained.

    **Schedule.** Layers are drawn before optimizer steps 1, interval + 1, 2·interval + 1, … (1-based), i.e. at
    `on_step_begin` whenever `state.global_step` (steps completed) is a multiple of `interval`; the draw for switch
    k = global_step // interval uses a `torch.Generator` seeded by (seed, k), so a run resumed from a checkpoint
    follows the same schedule as an uninterrupted one with nothing saved by the callback.

    - `sampling="uniform"` (LISA): γ distinct layers, uniformly.
    - `sampling="outlier"` (OwLore, "OwLore: Outlier-weighted Layerwise Sampled Low-Rank Projection"): γ distinct
      layers without replacement, with probability ∝ the layer's outlier ratio, the fraction of its Linear weight
      entries with |w| > outlier_multiple·mean(|w|) (mean per weight matrix; for PEFT-wrapped Linears the base
      weight), computed once at train begin. Layers with ratio 0 are drawn only when fewer than γ layers have a
      positive ratio.

    **What toggles.** At train begin the parameters with `requires_grad` are recorded; parameters frozen then (a
    PEFT base model, user-frozen weights) are never touched. Inside the layer list, the trainable ones (with PEFT:
    the adapter parameters) are switched on and off per layer. Outside it (embeddings, final norm, LM head) they
    stay trainable; with `always_trainable` (a list of name substrings), only trainable parameters whose names
    contain one of them stay trainable — inside the layers too — and the other parameters outside the layers are
    frozen for the run. At train end every parameter trainable at train begin is trainable again.

    **Optimizer state.** At a switch, the parameters of inactive layers get `grad = None` and their optimizer state
    is deleted (`optimizer.state.pop(p)`): that is LISA's memory saving (AdamW's two moments exist for γ layers
    only). A layer drawn again at the next switch keeps its state; a layer switched back on later starts from fresh
    state (AdamW's step count and bias correction restart). Works with any optimizer that skips parameters whose
    gradient is None (torch's, hf_eff's); the optimizer must be built with all layers' parameters (the Trainer
    builds it before `on_train_begin`). Under DDP, set `ddp_find_unused_parameters=True`: frozen layers send no
    gradients.

    Errors: bad arguments raise ValueError here; at train begin, a missing layer list, `num_active_layers` larger
    than the number of layers, or an `always_trainable` entry that matches no trainable parameter raise ValueError
    before anything is frozen. `switch_history` lists (global_step, active layer indices) for every switch.
    """

    def __init__(
        self,
        num_active_layers: int = 2,
        interval: int = 20,
        sampling: str = "uniform",
        seed: int = 0,
        layers_attribute: str | None = None,
        always_trainable: Sequence[str] | None = None,
        outlier_multiple: float = 7.0,
    ) -> None:
        require(
            is_int(num_active_layers) and num_active_layers >= 1,
            _NAME,
            "num_active_layers",
            "an int >= 1",
            num_active_layers,
        )
        require(is_int(interval) and interval >= 1, _NAME, "interval", "an int >= 1 (optimizer steps)", interval)
        require(sampling in _SAMPLINGS, _NAME, "sampling", f"one of {_SAMPLINGS}", sampling)
        require(is_int(seed), _NAME, "seed", "an int", seed)
        require(
            layers_attribute is None or (isinstance(layers_attribute, str) and layers_attribute),
            _NAME,
            "layers_attribute",
            "None or a dotted attribute path such as 'model.layers'",
            layers_attribute,
        )
        require(
            is_real(outlier_multiple) and math.isfinite(outlier_multiple) and outlier_multiple > 0,
            _NAME,
            "outlier_multiple",
            "a finite number > 0",
            outlier_multiple,
        )
        self.num_active_layers = num_active_layers
        self.interval = interval
        self.sampling = sampling
        self.seed = seed
        self.layers_attribute = layers_attribute
        self.always_trainable = _check_always_trainable(always_trainable)
        self.outlier_multiple = float(outlier_multiple)
        self.layer_weights: torch.Tensor | None = None
        self.active_layers: tuple[int, ...] = ()
        self.switch_history: list[tuple[int, tuple[int, ...]]] = []
        self._layer_params: list[list[nn.Parameter]] = []
        self._frozen_for_run: list[nn.Parameter] = []
        self._switch_index: int | None = None

    # -- setup ---------------------------------------------------------------------------------------------------

    def _is_always_trainable(self, name: str) -> bool:
        return self.always_trainable is not None and any(part in name for part in self.always_trainable)

    def setup(self, model: nn.Module) -> None:
        """Finds the layers, records what toggles and computes the sampling weights; changes nothing on the model."""
        layers = find_decoder_layers(model, self.layers_attribute)
        require(
            self.num_active_layers <= len(layers),
            _NAME,
            "num_active_layers",
            f"at most the number of decoder layers ({len(layers)})",
            self.num_active_layers,
        )
        trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        if self.always_trainable is not None:
            unmatched = [part for part in self.always_trainable if not any(part in name for name in trainable.values())]
            require(
                not unmatched,
                _NAME,
                "always_trainable",
                f"substrings of trainable parameter names ({unmatched} match none)",
                self.always_trainable,
            )
        layer_params = [
            [p for p in layer.parameters() if id(p) in trainable and not self._is_always_trainable(trainable[id(p)])]
            for layer in layers
        ]
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        self._frozen_for_run = []
        if self.always_trainable is not None:
            self._frozen_for_run = [
                p
                for name, p in model.named_parameters()
                if p.requires_grad and id(p) not in in_layers and not self._is_always_trainable(name)
            ]
        self._layer_params = layer_params
        self.layer_weights = None
        if self.sampling == "outlier":
            ratios = [outlier_ratio(layer, self.outlier_multiple) for layer in layers]
            self.layer_weights = torch.tensor(ratios, dtype=torch.float64)
        self._switch_index = None

    # -- schedule ------------------------------------------------------------------------------------------------

    def layers_for_switch(self, switch_index: int) -> tuple[int, ...]:
        """The layer indices active after switch `switch_index` (deterministic; needs `setup` or train begin)."""
        if not self._layer_params:
            raise RuntimeError(f"{_NAME}: the layers are not known yet; call `setup(model)` or start training first")
        generator = seeded_generator(self.seed, switch_index)
        return choose_layers(len(self._layer_params), self.num_active_layers, generator, self.layer_weights)

    def switch_to(self, switch_index: int, optimizer: Any = None, global_step: int | None = None) -> None:
        """Makes the layers of `switch_index` trainable and the others frozen, freeing their grads and optimizer
        state."""
        active = self.layers_for_switch(switch_index)
        optimizer_state = optimizer.state if optimizer is not None else None
        for index, params in enumerate(self._layer_params):
            on = index in active
            for param in params:
                if not on:
                    param.grad = None
                    if optimizer_state is not None:
                        optimizer_state.pop(param, None)
                param.requires_grad_(on)
        self.active_layers = active
        self._switch_index = switch_index
        step = switch_index * self.interval if global_step is None else global_step
        self.switch_history.append((step, active))

    def _maybe_switch(self, state, optimizer) -> None:
        switch_index = state.global_step // self.interval
        if switch_index != self._switch_index:
            self.switch_to(switch_index, optimizer, state.global_step)

    # -- Trainer events ------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError(f"{_NAME}: `on_train_begin` needs the `model` keyword argument")
        self.setup(model)
        for param in self._frozen_for_run:
            param.requires_grad_(False)
            param.grad = None
        # A resumed run starts mid-interval: its layers are those of the switch the checkpoint was taken in.
        self._maybe_switch(state, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._maybe_switch(state, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        for params in self._layer_params:
            for param in params:
                param.requires_grad_(True)
        for param in self._frozen_for_run:
            param.requires_grad_(True)
        self._switch_index = None
