"""Configuration of LoRA-XS (paper "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import LowRankConfig

SVD_METHODS = ("full", "randomized")


@dataclass
class LoraXSConfig(LowRankConfig):
    """ΔW = B·R·A·(lora_alpha/r) with W ≈ U_r S_r V_rᵀ, B = U_r and A = S_r V_rᵀ frozen, only R (r×r) trained.

    `save_factors=False` stores only R (r² numbers per module) plus a fingerprint of each base weight; loading then
    recomputes the factors from the base model and refuses one whose weights differ from the training base.

    Example:
        >>> from peft import get_peft_model
        >>> from hf_eff import LoraXSConfig
        >>> model = get_peft_model(base_model, LoraXSConfig(r=16, target_modules=["q_proj", "v_proj"]))
    """

    method_name: ClassVar[str] = "loraxs"

    svd_method: str = field(
        default="full",
        metadata={"help": "'full' (torch.linalg.svd) or 'randomized' (torch.svd_lowrank, fixed seed) for big weights."},
    )
    svd_niter: int = field(default=4, metadata={"help": "Power iterations of the randomized SVD."})
    svd_oversample: int = field(default=10, metadata={"help": "Extra random directions of the randomized SVD."})
    save_factors: bool = field(
        default=True,
        metadata={"help": "Store the frozen SVD factors in the checkpoint; False stores only R and recomputes them."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"`svd_method` must be one of {SVD_METHODS}, got {self.svd_method!r}.")
        if self.svd_niter < 0 or self.svd_oversample < 0:
            raise ValueError(
                f"`svd_niter` and `svd_oversample` must be >= 0, got {self.svd_niter} and {self.svd_oversample}."
            )
