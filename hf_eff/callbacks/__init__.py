"""transformers `TrainerCallback`s: gradient-spike monitor (SPAM), optimizer-memory report, layerwise sampling (LISA, OwLore)."""

from .layerwise import LayerwiseSamplingCallback
from .memory import OptimizerMemoryCallback
from .spike import GradientSpikeCallback

__all__ = ["GradientSpikeCallback", "LayerwiseSamplingCallback", "OptimizerMemoryCallback"]
