"""The adapted linear layer shared by hf_eff's low-rank methods: forward, merge and unmerge over any ΔW = B·M·A."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LowRankConfig


def init_factor(shape: tuple[int, int], is_down_projection: bool, init_weights: bool) -> nn.Parameter:
    """LoRA's init: A Kaiming-uniform, B zero so training starts at the base model; all random if not init_weights."""
    weight = torch.empty(shape)
    if is_down_projection or not init_weights:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    else:
        nn.init.zeros_(weight)
    return nn.Parameter(weight)


class LowRankLinear(nn.Module, BaseTunerLayer):
    """Wraps an `nn.Linear`, a transformers `Conv1D` or a quantized linear with low-rank adapters.

    A method subclass defines its parameters (`create_adapter`), the unscaled update of an input (`adapter_output`)
    and the factors of the unscaled ΔW = up·down (`update_factors`); scaling, dropout, dtype handling, merging and the
    adapter bookkeeping live here.
    """

    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LowRankConfig, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            base_layer, get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        # Conv1D (GPT-2) stores its weight as (in, out); adapters keep (out, in) and transpose only when merging.
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.init_adapter_containers()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    # --- method-specific part -------------------------------------------------------------------------------------

    def init_adapter_containers(self) -> None:
        """Creates the (empty) per-adapter ParameterDicts / BufferDicts named in `adapter_layer_names`."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, config: LowRankConfig, in_features: int, out_features: int) -> int:
        """Largest rank the update of a (out_features × in_features) layer can have under `config`."""
        return min(in_features, out_features)

    @classmethod
    def check_target(cls, config: LowRankConfig, in_features: int, out_features: int, module_name: str) -> None:
        """Raises ValueError when `config` cannot adapt a (out_features × in_features) layer named `module_name`."""
        limit = cls.max_rank(config, in_features, out_features)
        if config.r > limit:
            raise ValueError(
                f"`r`={config.r} is larger than the rank {limit} that {config.peft_type.value} allows for "
                f"'{module_name}' (out_features={out_features}, in_features={in_features})."
            )

    def create_adapter(self, adapter_name: str, config: LowRankConfig, **kwargs: Any) -> None:
        """Creates and initialises the parameters of `adapter_name`."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Unscaled ΔW·x for an input already dropped-out and cast to the adapter's dtype."""
        raise NotImplementedError

    def update_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with unscaled ΔW = up·down: up is (out_features × r), down is (r × in_features)."""
        raise NotImplementedError

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        """Dtype the adapter computes in (its trainable parameters' dtype)."""
        raise NotImplementedError

    # --- shared part ----------------------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: LowRankConfig, **kwargs: Any) -> None:
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_adapter(adapter_name, config, **kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """Unscaled ΔW in (out_features, in_features) layout, in float32."""
        up, down = self.update_factors(adapter_name)
        return up.float() @ down.float()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Scaled ΔW in the base weight's layout ((in, out) for Conv1D), in float32."""
        delta = self.delta_matrix(adapter_name).float() * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Adds the active (or given) adapters' ΔW into the base weight; `safe_merge` refuses non-finite results."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.r:
                continue
            base_weight = self.get_base_weight()
            # Sum in float32 so that a bf16/fp16 base is rounded once, not once per operand.
            merged = (base_weight.float() + self.get_delta_weight(name).to(base_weight.device)).to(base_weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter '{name}' gives non-finite weights; the adapter is broken.")
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtracts every merged adapter's ΔW, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base_weight = self.get_base_weight()
            restored = base_weight.float() - self.get_delta_weight(name).to(base_weight.device)
            self.set_base_weight(restored.to(base_weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for name in self.active_adapters:
            if name not in self.r:
                continue
            h = self.lora_dropout[name](self._cast_input_dtype(x, self.adapter_dtype(name)))
            result = result + (self.adapter_output(h, name) * self.scaling[name]).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)
