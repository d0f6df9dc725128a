"""Prefix-grouped attention ("Prefix Grouper") as a transformers attention implementation, on PyTorch SDPA.

For each group of a packed row [prefix, segment_1, …, segment_G] (see `packing.py`), the prefix attends to itself
causally, and every segment attends to [prefix keys/values, its own keys/values (causally)] and to nothing of the
other segments. That is exactly what each prompt + completion sequence sees in the standard forward, so outputs and
gradients are the standard ones; the prefix is encoded once and its gradient is the sum over the segments.

The implementation is registered as `attn_implementation="hf_eff_prefix_grouped"`. The layout reaches it through
`model(..., prefix_group_layout=layout)` (transformers forwards extra model kwargs to the attention function, also
when gradient checkpointing recomputes a layer). Without a layout it is plain SDPA, so a model left in this mode
still runs every ordinary forward correctly.

Backends: the work on one packed row is done by a backend, chosen per call from a registry. "sdpa" (always
available) batches a group's segments as [G, heads, segment, dim] against [prefix; own] keys/values; "triton"
(hf_eff's kernel, registered when the `triton` extra is installed) takes CUDA inputs; other kernels register with
`register_prefix_grouped_backend` and are used for the inputs they accept.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .packing import GroupSpan, PrefixGroupLayout

PREFIX_GROUPED_ATTENTION = "hf_eff_prefix_grouped"
LAYOUT_KWARG = "prefix_group_layout"

# Layer types that attend only over keys/values; anything else (state-space, linear attention, convolutions) mixes
# tokens along the row by other means and would leak across segments.
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}

# Checked by the mask function: while a grouped forward builds its masks, no dense mask is needed (the layout says
# everything, and a [T, T] mask over a long packed row would cost T² memory).
_building_grouped_forward: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hf_eff_building_grouped_forward", default=False
)

PrefixGroupedBackendFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, PrefixGroupLayout, float, float], torch.Tensor
]


@dataclass(frozen=True)
class PrefixGroupedBackend:
    """A way to compute prefix-grouped attention on one packed row.

    `compute(query [1, Hq, T, D], key [1, Hkv, T, D], value [1, Hkv, T, Dv], layout, scaling, dropout)` returns the
    output [1, T, Hq, Dv] and must be differentiable. `accepts(query, key, value)` says whether it handles these
    inputs (device, dtype, head dim). Backends are tried from the highest `priority`; "sdpa" has priority 0.
    """

    name: str
    compute: PrefixGroupedBackendFn
    accepts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]
    priority: int


_BACKENDS: dict[str, PrefixGroupedBackend] = {}
# Most preferred first; rebuilt on (un)registration so the per-layer lookup does not sort.
_ORDERED_BACKENDS: tuple[PrefixGroupedBackend, ...] = ()


def _reorder_backends() -> None:
    global _ORDERED_BACKENDS
    _ORDERED_BACKENDS = tuple(sorted(_BACKENDS.values(), key=lambda backend: -backend.priority))


def register_prefix_grouped_backend(
    name: str,
    compute: PrefixGroupedBackendFn,
    accepts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool] = lambda query, key, value: True,
    priority: int = 10,
) -> None:
    """Add (or replace) a prefix-grouped attention backend; see `PrefixGroupedBackend` for the contract."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_prefix_grouped_backend: `name` must be a non-empty string, got {name!r}")
    if not callable(compute) or not callable(accepts):
        raise TypeError("register_prefix_grouped_backend: `compute` and `accepts` must be callables")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"register_prefix_grouped_backend: `priority` must be an int, got {priority!r}")
    _BACKENDS[name] = PrefixGroupedBackend(name, compute, accepts, priority)
    _reorder_backends()


def unregister_prefix_grouped_backend(name: str) -> None:
    """Remove a backend added with `register_prefix_grouped_backend` ("sdpa" cannot be removed)."""
    if name == "sdpa":
        raise ValueError("unregister_prefix_grouped_backend: the 'sdpa' backend is the fallback and cannot be removed")
    if name not in _BACKENDS:
        raise KeyError(f"unregister_prefix_grouped_backend: no backend named {name!r}; registered: {sorted(_BACKENDS)}")
    del _BACKENDS[name]
    _reorder_backends()


def prefix_grouped_backends() -> list[str]:
    """Registered backend names, most preferred first."""
    return [backend.name for backend in _ORDERED_BACKENDS]


def select_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> PrefixGroupedBackend:
    for backend in _ORDERED_BACKENDS:
        if backend.accepts(query, key, value):
            return backend
    raise RuntimeError("no prefix-grouped attention backend accepts these inputs")  # "sdpa" accepts everything


def _sdpa(query, key, value, mask, is_causal, scaling, dropout) -> torch.Tensor:
    """SDPA with grouped-query heads: native GQA where the kernel supports it with this mask, else repeated heads."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1 and (mask is not None and query.device.type != "cpu"):
        # CUDA's fused kernels take GQA only without a mask; repeating the heads keeps them off the math path.
        key, value, n_rep = repeat_kv(key, n_rep), repeat_kv(value, n_rep), 1
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling, enable_gqa=n_rep > 1
    )


def sdpa_prefix_grouped(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PrefixGroupLayout,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The "sdpa" backend. Per group: the prefix in one causal SDPA call; the segments as a batch [G, H, L, D], each
    against its keys [prefix; own segment] under one shared mask (all prefix keys, own keys causally).

    Prefix keys/values are copied once per segment (`cat` of an expanded view). That costs G·prefix·D memory per
    layer but computes no score twice and none across segments; on CPU it beat one call over the row with a
    block-diagonal mask (which scores every segment against every other).
    """
    outputs = []
    for group in layout.groups:
        prefix = slice(group.start, group.completions_start)
        if group.prefix_length:
            prefix_out = _sdpa(query[:, :, prefix], key[:, :, prefix], value[:, :, prefix], None, True, scaling, dropout)
            outputs.append(prefix_out[0].transpose(0, 1))  # [p, Hq, Dv]
        segment_query, segment_key, segment_value = (_segments(states, group) for states in (query, key, value))
        if group.prefix_length:
            count, length = group.num_completions, group.segment_length
            segment_key = torch.cat([key[:, :, prefix].expand(count, -1, -1, -1), segment_key], dim=2)
            segment_value = torch.cat([value[:, :, prefix].expand(count, -1, -1, -1), segment_value], dim=2)
            visible = torch.ones(length, group.prefix_length, dtype=torch.bool, device=query.device)
            own = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            mask = torch.cat([visible, own], dim=1)
            segment_out = _sdpa(segment_query, segment_key, segment_value, mask, False, scaling, dropout)
        else:
            segment_out = _sdpa(segment_query, segment_key, segment_value, None, True, scaling, dropout)
        outputs.append(segment_out.transpose(1, 2).flatten(0, 1))  # [G·L, Hq, Dv]
    return torch.cat(outputs, dim=0).unsqueeze(0)


def _segments(states: torch.Tensor, group: GroupSpan) -> torch.Tensor:
    """A group's segments of one packed row [1, H, T, D] as a batch [G, H, L, D] (a view, no copy)."""
    rows = states[0, :, group.completions_start : group.end]
    return rows.unflatten(1, (group.num_completions, group.segment_length)).transpose(0, 1)


register_prefix_grouped_backend("sdpa", sdpa_prefix_grouped, priority=0)


def register_triton_backend() -> bool:
    """Register hf_eff's Triton prefix-grouped kernel (`hf_eff.kernels.prefix_grouped`) as the "triton" backend for
    the CUDA inputs it supports; returns whether Triton is installed (the `triton` extra)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from hf_eff.kernels.prefix_grouped import packed_prefix_grouped_attention, supports_inputs

    def compute(query, key, value, layout: PrefixGroupLayout, scaling: float, dropout: float) -> torch.Tensor:
        if dropout:  # the kernel has no attention dropout
            return sdpa_prefix_grouped(query, key, value, layout, scaling, dropout)
        groups = [(g.start, g.prefix_length, g.num_completions, g.segment_length) for g in layout.groups]
        return packed_prefix_grouped_attention(query, key, value, groups, scale=scaling)

    def accepts(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        # CUDA only: under TRITON_INTERPRET=1 the kernel also takes CPU tensors, but at interpreter speed.
        return query.is_cuda and supports_inputs(query, key, value)

    register_prefix_grouped_backend("triton", compute, accepts, priority=10)
    return True


def prefix_grouped_backend(name: str) -> PrefixGroupedBackend:
    """The registered backend called `name`."""
    if name not in _BACKENDS:
        raise KeyError(f"prefix_grouped_backend: no backend named {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


register_triton_backend()


def prefix_grouped_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    prefix_group_layout: PrefixGroupLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function registered as `hf_eff_prefix_grouped` (transformers' attention-function contract)."""
    if prefix_group_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    layout = prefix_group_layout
    if not isinstance(layout, PrefixGroupLayout):
        raise TypeError(f"`{LAYOUT_KWARG}` must be a PrefixGroupLayout, got {type(layout).__name__}")
    if query.shape[0] != 1 or query.shape[2] != layout.length or key.shape[2] != layout.length:
        raise ValueError(
            f"prefix-grouped attention expects one packed row of {layout.length} tokens and no cache; got queries "
            f"{tuple(query.shape)} and keys {tuple(key.shape)}"
        )
    if not getattr(module, "is_causal", True) or is_causal is False:
        raise ValueError(f"prefix-grouped attention needs causal self-attention; {type(module).__name__} is not causal")
    if kwargs.get("softcap") is not None:
        raise ValueError("prefix-grouped attention runs on SDPA, which has no attention-logit soft-capping")
    window = kwargs.get("sliding_window")
    longest = max((group.longest_sequence for group in layout.groups), default=0)
    if window is not None and longest > window:
        raise ValueError(
            f"prefix-grouped attention does not apply sliding windows: a sequence of {longest} tokens exceeds the "
            f"window of {window}"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    backend = select_backend(query, key, value)
    return backend.compute(query, key, value, layout, scaling, dropout), None


def prefix_grouped_mask(*args, **kwargs) -> torch.Tensor | None:
    """Mask function registered with the attention: none during a grouped forward, SDPA's mask otherwise."""
    if _building_grouped_forward.get():
        return None
    return sdpa_mask(*args, **kwargs)


def register_prefix_grouped_attention() -> str:
    """Register the attention and its mask function with transformers (idempotent); returns the name."""
    AttentionInterface.register(PREFIX_GROUPED_ATTENTION, prefix_grouped_attention_forward)
    AttentionMaskInterface.register(PREFIX_GROUPED_ATTENTION, prefix_grouped_mask)
    return PREFIX_GROUPED_ATTENTION


@contextlib.contextmanager
def building_grouped_forward() -> Iterator[None]:
    """Mark the `model(...)` call inside as a grouped forward, so that no dense attention mask is built for it."""
    token = _building_grouped_forward.set(True)
    try:
        yield
    finally:
        _building_grouped_forward.reset(token)


def sliding_window_limit(config) -> int | None:
    """The longest sequence (prompt + completion tokens) the model's sliding-window layers see in full, or None."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def unsupported_model_reason(model: torch.nn.Module) -> str | None:
    """Why prefix-grouped attention cannot serve this model (None when it can).

    It serves causal decoders whose every token-mixing layer is attention through transformers' AttentionInterface,
    positions taken from `position_ids`, without attention-logit soft-capping (Llama, Qwen2/3, Mistral, Gemma, …).
    """
    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    if config.get_text_config() is not config:
        return f"{name} is a multimodal model (only text decoders are supported)"
    if not getattr(config, "is_causal", True) or getattr(config, "is_decoder", True) is False:
        return f"{name} is not a causal decoder"
    if not type(model)._can_set_attn_implementation():
        return f"{name}'s attention does not go through transformers' AttentionInterface"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not set(layer_types) <= _ATTENTION_LAYER_TYPES:
        other = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
        return f"{name} has layers that are not attention ({', '.join(other)}); they would mix the packed completions"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return f"{name} soft-caps attention logits, which SDPA cannot do"
    if "position_ids" not in inspect.signature(model.get_decoder().forward).parameters:
        return f"{name}'s decoder takes no position_ids"
    attention_layers = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")]
    if not attention_layers:
        return f"{name} has no self-attention layers that hf_eff recognizes"
    return None
