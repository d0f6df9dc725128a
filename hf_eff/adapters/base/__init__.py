"""Shared machinery of hf_eff's low-rank PEFT methods: config fields, the adapted linear layer, the tuner."""

from .config import LowRankConfig
from .layer import LowRankLinear
from .model import LowRankTuner

__all__ = ["LowRankConfig", "LowRankLinear", "LowRankTuner"]
