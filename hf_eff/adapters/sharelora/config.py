"""Configuration of ShareLoRA (paper "ShareLoRA: … via Shared Low-Rank Adaptation"): factors shared across layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..base import LowRankConfig

SHARE_CHOICES = ("A", "B", "AB")


@dataclass
class ShareLoraConfig(LowRankConfig):
    """LoRA with A (down), B (up) or both shared by all targeted layers of one projection and shape.

    A projection is a module's path without its layer index (`model.layers.*.self_attn.q_proj`). With `share="A"`
    every layer's `q_proj` uses one A and keeps its own B, every `v_proj` another A, and so on; modules of one
    projection but different shapes form separate groups. A shared tensor exists once in memory and in the checkpoint.

    Example:
        >>> from peft import get_peft_model
        >>> from hf_eff import ShareLoraConfig
        >>> model = get_peft_model(base_model, ShareLoraConfig(r=8, share="A", target_modules=["q_proj", "v_proj"]))
    """

    method_name: ClassVar[str] = "sharelora"

    share: str = field(
        default="A",
        metadata={"help": "Which factor is shared across layers: 'A' (paper's default), 'B' or 'AB'."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.share not in SHARE_CHOICES:
            raise ValueError(f"`share` must be one of {SHARE_CHOICES}, got {self.share!r}.")
