"""ShareLoRA layer: LoRA factors looked up either on the layer or in the tuner's cross-layer store."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base.layer import LowRankLinear, init_factor
from .config import ShareLoraConfig


class ShareLoraLinear(LowRankLinear):
    """y = W·x + B·A·x·(alpha/r) where A, B or both come from a store shared across layers."""

    adapter_layer_names = ("sharelora_A", "sharelora_B")
    other_param_names = (*LowRankLinear.other_param_names, "shared_keys")

    def init_adapter_containers(self) -> None:
        # Unshared factors live on the layer; shared ones in the tuner's ModuleDict {adapter: ParameterDict}.
        self.sharelora_A = nn.ParameterDict()
        self.sharelora_B = nn.ParameterDict()
        self.shared_keys: dict[str, dict[str, str]] = {}

    def create_adapter(
        self, adapter_name: str, config: ShareLoraConfig, shared_store: nn.ModuleDict, group_name: str, **kwargs
    ) -> None:
        # Kept out of nn.Module's registry: the store is owned (and saved once) by the tuner. Looking it up at each
        # forward, rather than holding its Parameters, survives PEFT replacing them (dtype casts, assign=True loads).
        self.__dict__["shared_store"] = shared_store
        r = config.r
        self.shared_keys[adapter_name] = {}
        for factor, shape, own in (
            ("A", (r, self.in_features), self.sharelora_A),
            ("B", (self.out_features, r), self.sharelora_B),
        ):
            if factor in config.share:
                store = shared_store[adapter_name]
                key = f"{group_name}-{factor}{shape[1] if factor == 'A' else shape[0]}"
                if key not in store:
                    store[key] = self._on_base_device(init_factor(shape, factor == "A", config.init_weights))
                self.shared_keys[adapter_name][factor] = key
            else:
                own[adapter_name] = init_factor(shape, factor == "A", config.init_weights)

    def _on_base_device(self, param: nn.Parameter) -> nn.Parameter:
        """Places a shared factor like PEFT places per-layer ones: the base layer's device and float dtype."""
        device, dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        if device is None or param.device.type == "meta":
            return param
        dtype = dtype if dtype is not None and dtype.is_floating_point else param.dtype
        return nn.Parameter(param.data.to(device=device, dtype=dtype))

    def factor(self, name: str, adapter_name: str) -> torch.Tensor:
        """Factor "A" (r × in) or "B" (out × r) of an adapter, wherever it is stored."""
        key = self.shared_keys[adapter_name].get(name)
        if key is not None:
            return self.shared_store[adapter_name][key]
        return (self.sharelora_A if name == "A" else self.sharelora_B)[adapter_name]

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        return self.factor("A", adapter_name).dtype

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return F.linear(F.linear(x, self.factor("A", adapter_name)), self.factor("B", adapter_name))

    def update_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factor("B", adapter_name), self.factor("A", adapter_name)
