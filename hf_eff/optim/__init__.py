"""Memory-efficient optimizers (GaLore, Natural GaLore, SPAM, FRUGAL) as thin classes over pure update functions."""

from .factory import create_optimizer, optimizer_cls_and_kwargs, optimizer_param_groups
from .frugal import FRUGAL
from .galore import GaLoreAdamW
from .memory import optimizer_state_bytes
from .natural_galore import NaturalGaLoreAdamW
from .spam import SPAM

__all__ = [
    "FRUGAL",
    "SPAM",
    "GaLoreAdamW",
    "NaturalGaLoreAdamW",
    "create_optimizer",
    "optimizer_cls_and_kwargs",
    "optimizer_param_groups",
    "optimizer_state_bytes",
]
