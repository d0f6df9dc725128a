"""LoRA-XS tuner: writes the frozen factors (or only a fingerprint) into checkpoints and checks them on load."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..base import LowRankTuner
from ..base.model import raise_load_error
from .config import LoraXSConfig
from .layer import LoraXSLinear
from .svd import fingerprints_match

_PEFT_MODEL_PREFIX = "base_model.model."
_SAVED_KINDS = ("A", "B", "fingerprint")


def _layers_with_adapter(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, LoraXSLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraXSLinear) and adapter_name in module.loraxs_R:
            yield name, module


class LoraXSModel(LowRankTuner):
    """Creates a LoRA-XS model; use through `peft.get_peft_model(model, LoraXSConfig(...))`."""

    prefix = "loraxs_"
    tuner_layer_cls = LoraXSLinear

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_save = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in _layers_with_adapter(model, adapter_name):
            to_save[f"{name}.loraxs_fingerprint.{adapter_name}"] = layer.loraxs_fingerprint[adapter_name]
            if config.save_factors:
                to_save[f"{name}.loraxs_A.{adapter_name}"] = layer.loraxs_A[adapter_name]
                to_save[f"{name}.loraxs_B.{adapter_name}"] = layer.loraxs_B[adapter_name]
        return to_save

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LoraXSConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = dict(state_dict)
        saved = {}
        for name, layer in _layers_with_adapter(model, adapter_name):
            # Checkpoints always carry PeftModel's key prefix; a model with directly injected layers does not.
            key = name if name.startswith(_PEFT_MODEL_PREFIX) else _PEFT_MODEL_PREFIX + name
            saved[name] = (layer, {kind: state_dict.pop(f"{key}.loraxs_{kind}", None) for kind in _SAVED_KINDS})
        # Factors of layers this model lacks stay in state_dict, so the base check reports them.
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

        if config.save_factors:
            problems = [
                problem
                for name, (layer, entries) in saved.items()
                for problem in _factor_problems(name, layer, adapter_name, entries)
            ]
            if problems:
                reason = f"LoRA-XS adapter '{adapter_name}' does not fit this base model"
                raise_load_error(model, adapter_name, reason, problems)
        changed = [
            name
            for name, (layer, entries) in saved.items()
            if entries["fingerprint"] is None
            or not fingerprints_match(entries["fingerprint"], layer.loraxs_fingerprint[adapter_name])
        ]
        if changed and not config.save_factors:
            raise_load_error(
                model,
                adapter_name,
                f"LoRA-XS adapter '{adapter_name}' was saved without its SVD factors (save_factors=False), so they "
                f"must be recomputed from the base model, but the base weights of {len(changed)} module(s) differ "
                "from the ones it was trained on. Load it onto the same base model it was trained with",
                [f"{name}: base weight differs" for name in changed],
            )
        if changed:
            warnings.warn(
                f"LoRA-XS adapter '{adapter_name}': the base weights of {len(changed)} module(s) differ from the "
                f"training base (first: '{changed[0]}'); the adapter's saved factors are applied unchanged.",
                stacklevel=2,
            )
        if config.save_factors:
            for layer, entries in saved.values():
                layer.set_factors(adapter_name, entries["A"], entries["B"])
        return state_dict


def _factor_problems(
    name: str, layer: LoraXSLinear, adapter_name: str, entries: dict[str, torch.Tensor | None]
) -> list[str]:
    """Saved factors that are absent or shaped for another layer."""
    problems = []
    for kind, factors in (("A", layer.loraxs_A), ("B", layer.loraxs_B)):
        saved, expected = entries[kind], tuple(factors[adapter_name].shape)
        if saved is None:
            problems.append(f"{name}.loraxs_{kind}: in this model, not in the checkpoint")
        elif tuple(saved.shape) != expected:
            problems.append(f"{name}.loraxs_{kind}: checkpoint {tuple(saved.shape)}, model {expected}")
    return problems
