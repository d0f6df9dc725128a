"""GRPO with prefix grouping (paper "Prefix Grouper") on TRL's GRPOTrainer (needs the `trl` extra)."""

from __future__ import annotations

try:
    import trl  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('hf_eff.trainers.grpo needs TRL: pip install "hf-eff[trl]"') from error

from .attention import (
    PREFIX_GROUPED_ATTENTION,
    prefix_grouped_attention_forward,
    prefix_grouped_backend,
    prefix_grouped_backends,
    register_prefix_grouped_attention,
    register_prefix_grouped_backend,
    unregister_prefix_grouped_backend,
    unsupported_model_reason,
)
from .config import GRPOConfig
from .packing import PackedGroups, PrefixGroupLayout, pack_groups, unpack_per_token
from .trainer import GRPOTrainer

__all__ = [
    "PREFIX_GROUPED_ATTENTION",
    "GRPOConfig",
    "GRPOTrainer",
    "PackedGroups",
    "PrefixGroupLayout",
    "pack_groups",
    "prefix_grouped_attention_forward",
    "prefix_grouped_backend",
    "prefix_grouped_backends",
    "register_prefix_grouped_attention",
    "register_prefix_grouped_backend",
    "unpack_per_token",
    "unregister_prefix_grouped_backend",
    "unsupported_model_reason",
]
