"""Block-LoRA layer: the down-projection runs on the sum of the input's chunks (summed-input path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base.layer import LowRankLinear, init_factor
from .config import BlockLoraConfig


class BlockLoraLinear(LowRankLinear):
    """y = W·x + B·A_s·(Σ_j x_j)·(alpha/r), x cut into n chunks of in/n features."""

    adapter_layer_names = ("blocklora_A", "blocklora_B")
    other_param_names = (*LowRankLinear.other_param_names, "num_blocks")

    def init_adapter_containers(self) -> None:
        self.blocklora_A = nn.ParameterDict()
        self.blocklora_B = nn.ParameterDict()
        self.num_blocks: dict[str, int] = {}

    @classmethod
    def check_target(cls, config: BlockLoraConfig, in_features: int, out_features: int, module_name: str) -> None:
        if in_features % config.num_blocks:
            raise ValueError(
                f"`num_blocks`={config.num_blocks} does not divide in_features={in_features} of '{module_name}'; "
                "Block-LoRA cuts the input into equal chunks."
            )
        super().check_target(config, in_features, out_features, module_name)

    @classmethod
    def max_rank(cls, config: BlockLoraConfig, in_features: int, out_features: int) -> int:
        return min(in_features // config.num_blocks, out_features)

    def create_adapter(self, adapter_name: str, config: BlockLoraConfig, **kwargs) -> None:
        n = config.num_blocks
        self.num_blocks[adapter_name] = n
        self.blocklora_A[adapter_name] = init_factor((config.r, self.in_features // n), True, config.init_weights)
        self.blocklora_B[adapter_name] = init_factor((self.out_features, config.r), False, config.init_weights)

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        return self.blocklora_A[adapter_name].dtype

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        chunk_sum = x.unflatten(-1, (self.num_blocks[adapter_name], -1)).sum(dim=-2)
        return F.linear(F.linear(chunk_sum, self.blocklora_A[adapter_name]), self.blocklora_B[adapter_name])

    def update_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # the explicit A = [A_s, …, A_s]; only merging needs it, the forward never builds it
        shared_block = self.blocklora_A[adapter_name]
        return self.blocklora_B[adapter_name], shared_block.repeat(1, self.num_blocks[adapter_name])
