"""The tuner shared by hf_eff's low-rank methods: target validation before injection, module creation, load checks."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_in_out_features,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LowRankConfig
from .layer import LowRankLinear


def is_supported_base_layer(module: nn.Module) -> bool:
    """nn.Linear, transformers Conv1D, or a linear layer of a quantization backend PEFT knows (bitsandbytes, …)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"


class LowRankTuner(BaseTuner):
    """BaseTuner for a `LowRankLinear` subclass; a method sets `prefix` and `tuner_layer_cls`."""

    tuner_layer_cls: type[LowRankLinear]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: LowRankConfig, model_config: dict) -> LowRankConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"`target_modules` must be given for model type {model_type!r}: hf_eff knows default targets only "
                    f"for {sorted(self.target_module_mapping)}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _check_new_adapter_config(self, config: LowRankConfig) -> None:
        # PEFT replaces modules one by one; checking every target first means bad input never half-applies.
        super()._check_new_adapter_config(config)
        self._check_targets(config)

    def _check_targets(self, config: LowRankConfig) -> None:
        config = copy.deepcopy(config)
        config = self._prepare_adapter_config(config, self.get_model_config(self.model))
        config = _maybe_include_all_linear_layers(config, self.model)
        wrapped_prefixes: list[str] = []
        matched = 0
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in wrapped_prefixes):
                continue
            if isinstance(module, BaseTunerLayer):
                wrapped_prefixes.append(key + ".")
            if not self._check_target_module_exists(config, key):
                continue
            base_layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not is_supported_base_layer(base_layer):
                raise TypeError(
                    f"Target module '{key}' is a {type(base_layer).__name__}; {type(self).__name__} adapts "
                    "torch.nn.Linear, transformers Conv1D and quantized linear layers (bitsandbytes, …)."
                )
            in_features, out_features = _get_in_out_features(base_layer)
            self.tuner_layer_cls.check_target(config, in_features, out_features, key)
            matched += 1
        if matched == 0:
            linear_names = sorted(
                {key.rsplit(".", 1)[-1] for key, m in self.model.named_modules() if is_supported_base_layer(m)}
            )
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no module of {type(self.model).__name__}; "
                f"its linear layers are named {linear_names}."
            )

    def _create_and_replace(
        self,
        peft_config: LowRankConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        method_kwargs = self.layer_kwargs(peft_config, adapter_name, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **method_kwargs)
            return
        new_module = self.tuner_layer_cls(
            target, adapter_name, peft_config, **method_kwargs, **get_quantization_kwargs(self.model)
        )
        if adapter_name not in self.active_adapters:
            # an added adapter is not trainable until the user activates it, as in PEFT
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def layer_kwargs(self, config: LowRankConfig, adapter_name: str, module_key: str) -> dict[str, Any]:
        """Extra keyword arguments a method's layer needs from the tuner (e.g. shared tensors)."""
        return {}

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LowRankConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems = checkpoint_mismatches(model, adapter_name, remapped, cls.prefix)
        if problems:
            raise_load_error(
                model,
                adapter_name,
                f"The {config.peft_type.value} adapter '{adapter_name}' does not fit this base model (it was trained "
                "on one with other layers or layer shapes)",
                problems,
            )
        return remapped


def checkpoint_mismatches(
    model: nn.Module, adapter_name: str, remapped: dict[str, torch.Tensor], prefix: str
) -> list[str]:
    """Adapter entries whose shape differs, that the checkpoint lacks, or that this model has no place for."""
    model_state = model.state_dict()
    adapter_keys = _filter_state_dict_by_key_prefixes(
        model_state, _get_tuner_state_dict_key_prefixes(model, adapter_name)
    )
    problems = []
    for key, value in remapped.items():
        if key in model_state:
            if model_state[key].shape != value.shape:
                problems.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(model_state[key].shape)}")
        elif prefix in key:
            problems.append(f"{key}: in the checkpoint, not in this model")
    problems.extend(f"{key}: in this model, not in the checkpoint" for key in sorted(adapter_keys.keys() - remapped))
    return problems


def raise_load_error(model: nn.Module, adapter_name: str, reason: str, problems: list[str]) -> None:
    """Removes the adapter that could not be loaded, then raises ValueError listing (the first) problems."""
    _roll_back_adapter(model, adapter_name)
    shown = "\n  ".join(problems[:8]) + (f"\n  … and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise ValueError(f"{reason}; the model is left as it was. Mismatches:\n  {shown}")


def _roll_back_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes a just-injected adapter whose weights cannot be loaded, restoring the base modules it replaced."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, LowRankTuner):
        return
    if len(tuner.peft_config) > 1:
        tuner.delete_adapter(adapter_name)
        return
    tuner._unload_and_optionally_merge(merge=False)
    if hasattr(tuner.model, "peft_config"):
        del tuner.model.peft_config
