"""Memory-efficient optimizers (GaLore, Natural GaLore, SPAM, FRUGAL) as thin classes over pure update functions."""

from .memory import optimizer_state_bytes

__all__ = ["optimizer_state_bytes"]
