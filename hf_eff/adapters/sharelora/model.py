"""ShareLoRA tuner: owns the cross-layer factor store and keeps its trainability in step with the active adapters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..base import LowRankTuner
from .config import ShareLoraConfig
from .layer import ShareLoraLinear

_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def projection_name(module_key: str) -> str:
    """The projection a module plays in every layer: its path without layer indices, usable as a ParameterDict key.

    "model.layers.3.self_attn.q_proj" -> "model-layers-self_attn-q_proj"; RoBERTa's "attention.output.dense" and
    "output.dense" stay apart although both end in "dense".
    """
    return "-".join(part for part in module_key.split(".") if not part.isdigit())


class ShareLoraModel(LowRankTuner):
    """Creates a ShareLoRA model; use through `peft.get_peft_model(model, ShareLoraConfig(...))`.

    Shared factors live in `sharelora_shared[adapter][group]`, so the checkpoint holds each of them once.
    """

    prefix = "sharelora_"
    tuner_layer_cls = ShareLoraLinear
    # PEFT refuses `inject_adapter_in_model` for tuners whose state lives outside the injected layers.
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: ShareLoraConfig, adapter_name: str) -> None:
        self.sharelora_shared = nn.ModuleDict()

    def layer_kwargs(self, config: ShareLoraConfig, adapter_name: str, module_key: str) -> dict[str, Any]:
        if adapter_name not in self.sharelora_shared:
            self.sharelora_shared[adapter_name] = nn.ParameterDict()
        return {"shared_store": self.sharelora_shared, "group_name": projection_name(module_key)}

    # PEFT sets requires_grad by visiting the injected layers; the tuner-level store needs the same treatment.

    def _set_shared_trainable(self, adapter_names: Sequence[str], trainable: bool) -> None:
        for name in adapter_names:
            if name in self.sharelora_shared:
                self.sharelora_shared[name].requires_grad_(trainable)

    def _sync_shared_trainable(self, trainable_adapters: Sequence[str]) -> None:
        for name in self.sharelora_shared:
            self._set_shared_trainable([name], name in trainable_adapters)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_shared_trainable([a for a in self.active_adapters if not self.peft_config[a].inference_mode])

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        self._sync_shared_trainable([] if inference_mode else names)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._set_shared_trainable([adapter_names] if isinstance(adapter_names, str) else adapter_names, requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_shared_trainable(self.active_adapters if enabled else [])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.sharelora_shared[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype or adapter_name not in self.sharelora_shared:
            return
        store = self.sharelora_shared[adapter_name]
        for key, param in list(store.items()):
            if param.dtype in _UPCAST_DTYPES:
                store[key] = nn.Parameter(param.data.float(), requires_grad=param.requires_grad)
