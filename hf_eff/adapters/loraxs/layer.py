"""LoRA-XS layer: y = W·x + B·R·A·x·(alpha/r) with A, B frozen from the truncated SVD of W and R (r×r) trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..base import LowRankLinear
from .config import LoraXSConfig
from .svd import truncated_svd, weight_fingerprint

# Paper and official code: R ~ N(0, σ=1e-5), so training starts a hair away from the base model.
R_INIT_STD = 1e-5


class LoraXSLinear(LowRankLinear):
    """LoRA-XS on one linear layer; the frozen factors are recomputable buffers, saved only if the config says so."""

    adapter_layer_names = ("loraxs_R",)
    other_param_names = (*LowRankLinear.other_param_names, "loraxs_A", "loraxs_B", "loraxs_fingerprint")

    def init_adapter_containers(self) -> None:
        self.loraxs_R = nn.ParameterDict()
        # Non-persistent: the tuner decides per adapter whether the factors go into the checkpoint.
        self.loraxs_A = BufferDict(persistent=False)
        self.loraxs_B = BufferDict(persistent=False)
        # A plain dict keeps the fingerprint out of PEFT's device/dtype casts: it must stay float64 to compare.
        self.loraxs_fingerprint: dict[str, torch.Tensor] = {}

    def create_adapter(self, adapter_name: str, config: LoraXSConfig, **kwargs) -> None:
        r = config.r
        weight = self.get_base_weight()
        if self.fan_in_fan_out:
            weight = weight.T
        if weight.is_meta:
            # Shape-only models (parameter counting on the meta device) have no values to decompose.
            u = torch.empty(self.out_features, r, device="meta")
            a = torch.empty(r, self.in_features, device="meta")
            self.loraxs_fingerprint[adapter_name] = torch.zeros(1 + 8, dtype=torch.float64)
        else:
            u, s, vh = truncated_svd(weight, r, config.svd_method, config.svd_niter, config.svd_oversample)
            a = s[:, None] * vh
            self.loraxs_fingerprint[adapter_name] = weight_fingerprint(weight)
        self.loraxs_B[adapter_name] = u
        self.loraxs_A[adapter_name] = a
        self.loraxs_R[adapter_name] = nn.Parameter(torch.randn(r, r) * (R_INIT_STD if config.init_weights else 1 / r))

    def set_factors(self, adapter_name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        """Replaces the frozen factors A (r×in) and B (out×r), keeping their device and dtype."""
        current = self.loraxs_A[adapter_name]
        self.loraxs_A[adapter_name] = down.to(device=current.device, dtype=current.dtype)
        self.loraxs_B[adapter_name] = up.to(device=current.device, dtype=current.dtype)

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        return self.loraxs_R[adapter_name].dtype

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dtype = self.loraxs_R[adapter_name].dtype
        down = F.linear(x, self.loraxs_A[adapter_name].to(dtype))
        return F.linear(F.linear(down, self.loraxs_R[adapter_name]), self.loraxs_B[adapter_name].to(dtype))

    def update_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        trained = self.loraxs_R[adapter_name]
        return self.loraxs_B[adapter_name], trained @ self.loraxs_A[adapter_name].to(trained.dtype)
