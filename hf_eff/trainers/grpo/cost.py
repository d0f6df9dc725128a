"""Estimated compute of a standard vs a prefix-grouped GRPO forward ("Prefix Grouper"), used by `"auto"` to decide.

A rough FLOP count from the model config: projections and MLP per token, attention per query-key pair, the LM head
per scored position. Only the ratio matters, and backward is a multiple of forward for every term, so forward
FLOPs suffice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .packing import PrefixGroupLayout


@dataclass(frozen=True)
class ModelCost:
    """Forward FLOPs per token (all layers' linear maps), per attention query-key pair, per LM-head position."""

    per_token: float
    per_pair: float
    per_scored_position: float

    @classmethod
    def from_config(cls, config) -> ModelCost:
        config = config.get_text_config()
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        layers = config.num_hidden_layers
        projections = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
        mlp = 3 * hidden * intermediate
        return cls(
            per_token=2.0 * layers * (projections + mlp),
            per_pair=4.0 * layers * heads * head_dim,
            per_scored_position=2.0 * hidden * config.vocab_size,
        )


def standard_cost(cost: ModelCost, rows: int, columns: int, padded: bool, scored_positions: int) -> float:
    """FLOPs of TRL's forward over `rows` × `columns` [prompt | completion] tokens.

    With padding the attention gets a mask and SDPA computes every pair; without, it runs causal and skips about half.
    """
    pairs = rows * columns * columns * (1.0 if padded else 0.5)
    return rows * columns * cost.per_token + pairs * cost.per_pair + scored_positions * cost.per_scored_position


def grouped_cost(cost: ModelCost, layout: PrefixGroupLayout, scored_positions: int) -> float:
    """FLOPs of the prefix-grouped forward: causal prefixes, each segment against [prefix; own segment]."""
    pairs = 0.0
    for group in layout.groups:
        prefix, length = group.prefix_length, group.segment_length
        pairs += 0.5 * prefix * prefix + group.num_completions * length * (prefix + length)
    return layout.length * cost.per_token + pairs * cost.per_pair + scored_positions * cost.per_scored_position
