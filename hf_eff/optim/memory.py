"""Exact accounting of the memory an optimizer's state holds."""

from __future__ import annotations

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from `optimizer.state` (moments, projectors, masks, counters).

    Tensors that share storage (views, aliases) are counted once, at their storage's full size.
    """
    seen: dict[tuple[str, int], int] = {}
    pending = list(optimizer.state.values())
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            seen.setdefault(_storage_key(item), item.untyped_storage().nbytes())
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return sum(seen.values())
