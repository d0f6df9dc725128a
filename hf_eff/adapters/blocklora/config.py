"""Configuration of Block-LoRA (paper "One Head Eight Arms: Block Matrix based Low Rank Adaptation")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import LowRankConfig


@dataclass
class BlockLoraConfig(LowRankConfig):
    """LoRA whose A (r×in) is n copies of one block A_s (r×in/n): ΔW = B·[A_s, …, A_s].

    Then A·x = A_s·Σ_j x_j over the n chunks of x, so the down-projection costs an addition of chunks plus one
    (r × in/n) product. Parameters per module: r·in/n + out·r. `in_features` must be divisible by `num_blocks`.

    Example:
        >>> from peft import get_peft_model
        >>> from hf_eff import BlockLoraConfig
        >>> model = get_peft_model(base_model, BlockLoraConfig(r=8, num_blocks=4, target_modules=["q_proj", "v_proj"]))
    """

    method_name: ClassVar[str] = "blocklora"

    num_blocks: int = field(default=4, metadata={"help": "Number n of input chunks sharing one down-projection block."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"`num_blocks` must be a positive integer, got {self.num_blocks!r}.")
