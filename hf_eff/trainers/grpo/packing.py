"""Packing of GRPO groups into one row [prefix, completion_1, …, completion_G] and back ("Prefix Grouper").

TRL scores a batch laid out as rows [left-padded prompt | right-padded completion]. Rows whose prompts are identical
form a group. Each group is packed as

    [prompt[:-1] | prompt[-1], completion_1, pad… | prompt[-1], completion_2, pad… | …]

i.e. a shared prefix followed by one equal-length segment per completion. A segment starts with the prompt's last
token because the log-probability of a completion's first token is read at that position, and each completion needs
its own. Position ids equal the column each token has in TRL's layout, so rotary (and learned absolute) positions are
exactly those of the standard forward; they restart at the prompt's end for every completion. Everything here is
plain tensor bookkeeping: no model, no library besides torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class GroupSpan:
    """Where one group sits in the packed row: a shared prefix, then `num_completions` segments of equal length."""

    start: int
    prefix_length: int
    num_completions: int
    segment_length: int

    @property
    def completions_start(self) -> int:
        return self.start + self.prefix_length

    @property
    def end(self) -> int:
        return self.completions_start + self.num_completions * self.segment_length

    @property
    def longest_sequence(self) -> int:
        """Tokens in the longest (padded) prompt + completion sequence the group stands for."""
        return self.prefix_length + self.segment_length


@dataclass(frozen=True)
class PrefixGroupLayout:
    """The groups of one packed row, in order; they tile the row [0, length) without gaps."""

    groups: tuple[GroupSpan, ...]
    length: int

    def __post_init__(self) -> None:
        position = 0
        for group in self.groups:
            if group.start != position or group.num_completions < 1 or group.segment_length < 1:
                raise ValueError(f"PrefixGroupLayout: groups must tile the row without gaps, got {self.groups}")
            position = group.end
        if position != self.length:
            raise ValueError(f"PrefixGroupLayout: groups cover {position} tokens, length is {self.length}")


@dataclass(frozen=True)
class PackedGroups:
    """One packed row ready for the model, and where each scored token of TRL's layout is read back from.

    `shift_labels[0, t]` is the token that position t predicts (IGNORE_INDEX where nothing is scored), so a model
    output at position t is the value for row r, completion column c where `source_index[r, c] == t` and
    `source_valid[r, c]` holds.
    """

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    shift_labels: torch.Tensor  # [1, T]
    layout: PrefixGroupLayout
    source_index: torch.Tensor  # [B, C] long
    source_valid: torch.Tensor  # [B, C] bool

    @property
    def num_tokens(self) -> int:
        return self.layout.length


def layout_problem(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> str | None:
    """Why these masks cannot be packed (None when they can): prompts must be left-padded with at least one token,
    completions right-padded, both masks 0/1."""
    for name, mask in (("prompt", prompt_mask), ("completion", completion_mask)):
        if mask.ndim != 2:
            return f"the {name} mask must be 2-D [batch, length], got shape {tuple(mask.shape)}"
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            return f"the {name} mask must hold only 0 and 1"
    if prompt_mask.shape[0] != completion_mask.shape[0]:
        return f"prompt and completion masks have {prompt_mask.shape[0]} and {completion_mask.shape[0]} rows"
    if prompt_mask.shape[1] and bool((prompt_mask[:, 1:] < prompt_mask[:, :-1]).any()):
        return "prompts are not left-padded (a padding token follows a prompt token)"
    if prompt_mask.shape[1] == 0 or bool((prompt_mask[:, -1] == 0).any()):
        return "some prompt is empty (the first completion token needs a prompt token to be predicted from)"
    if completion_mask.shape[1] and bool((completion_mask[:, 1:] > completion_mask[:, :-1]).any()):
        return "completions are not right-padded (a completion token follows a padding token)"
    return None


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group index of each row (rows with identical unpadded prompts share one) and the number of groups.

    Groups are numbered in order of their first row.
    """
    if prompt_ids.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=prompt_ids.device), 0
    # Padding is compared as a value no token has, so equal ids under different masks stay apart.
    keys = torch.where(prompt_mask.bool(), prompt_ids, torch.full_like(prompt_ids, -1))
    _, sorted_group = torch.unique(keys, dim=0, return_inverse=True)
    num_groups = int(sorted_group.max()) + 1
    rows = torch.arange(len(sorted_group), device=keys.device)
    first_row = torch.full((num_groups,), len(sorted_group), device=keys.device, dtype=torch.long)
    first_row = first_row.scatter_reduce(0, sorted_group, rows, reduce="amin")
    renumber = torch.empty_like(first_row)
    renumber[first_row.argsort()] = torch.arange(num_groups, device=keys.device)
    return renumber[sorted_group], num_groups


def pack_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> PackedGroups:
    """Pack TRL's [prompt | completion] rows (the last `logits_to_keep` columns are the completion) by prompt.

    Padding is dropped, except at the end of a segment shorter than its group's longest completion (those tokens are
    never attended to by real ones and never scored). Completions without tokens get no segment, and a group none of
    whose completions has tokens is left out. The masks must pass `layout_problem`.
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"pack_groups: input_ids and attention_mask must be 2-D of one shape, got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if not 0 < logits_to_keep <= input_ids.shape[1] - 1:
        raise ValueError(
            f"pack_groups: logits_to_keep must be in [1, {input_ids.shape[1] - 1}] for {input_ids.shape[1]} columns, "
            f"got {logits_to_keep}"
        )
    prompt_width = input_ids.shape[1] - logits_to_keep
    prompt_ids, completion_ids = input_ids[:, :prompt_width], input_ids[:, prompt_width:]
    prompt_mask, completion_mask = attention_mask[:, :prompt_width], attention_mask[:, prompt_width:]
    problem = layout_problem(prompt_mask, completion_mask)
    if problem is not None:
        raise ValueError(f"pack_groups: {problem}")

    device = input_ids.device
    group_of_row, num_groups = prompt_groups(prompt_ids, prompt_mask)
    prompt_lengths = prompt_mask.sum(dim=1).tolist()
    completion_lengths = completion_mask.sum(dim=1).tolist()
    group_list = group_of_row.tolist()

    pieces_ids: list[torch.Tensor] = []
    pieces_positions: list[torch.Tensor] = []
    pieces_labels: list[torch.Tensor] = []
    spans: list[GroupSpan] = []
    segment_start_of_row = [-1] * len(group_list)
    cursor = 0
    for group in range(num_groups):
        rows = [row for row, g in enumerate(group_list) if g == group and completion_lengths[row] > 0]
        if not rows:
            continue
        prompt_length = prompt_lengths[rows[0]]
        segment_length = 1 + max(completion_lengths[row] for row in rows)
        prefix_length = prompt_length - 1
        first_column = prompt_width - prompt_length
        pieces_ids.append(prompt_ids[rows[0], first_column : prompt_width - 1])
        pieces_positions.append(torch.arange(first_column, prompt_width - 1, device=device))
        pieces_labels.append(torch.full((prefix_length,), IGNORE_INDEX, device=device, dtype=input_ids.dtype))
        last_prompt_token = prompt_ids[rows[0], prompt_width - 1 :]
        segment_positions = torch.arange(prompt_width - 1, prompt_width - 1 + segment_length, device=device)
        for index, row in enumerate(rows):
            segment_start_of_row[row] = cursor + prefix_length + index * segment_length
            completion = completion_ids[row, : segment_length - 1]
            pieces_ids += [last_prompt_token, completion]
            pieces_positions.append(segment_positions)
            labels = completion.masked_fill(~completion_mask[row, : segment_length - 1].bool(), IGNORE_INDEX)
            pieces_labels += [labels, torch.full((1,), IGNORE_INDEX, device=device, dtype=input_ids.dtype)]
        span = GroupSpan(cursor, prefix_length, len(rows), segment_length)
        spans.append(span)
        cursor = span.end

    layout = PrefixGroupLayout(tuple(spans), cursor)
    columns = torch.arange(logits_to_keep, device=device)
    segment_start = torch.tensor(segment_start_of_row, device=device, dtype=torch.long)
    source_valid = columns[None, :] < completion_mask.sum(dim=1, keepdim=True)
    source_index = torch.where(source_valid, segment_start[:, None] + columns[None, :], torch.zeros_like(columns))

    def row(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)).unsqueeze(0)

    return PackedGroups(
        input_ids=row(pieces_ids, input_ids.dtype),
        position_ids=row(pieces_positions, torch.long),
        shift_labels=row(pieces_labels, input_ids.dtype),
        layout=layout,
        source_index=source_index,
        source_valid=source_valid,
    )


def unpack_per_token(values: torch.Tensor, packed: PackedGroups) -> torch.Tensor:
    """Per-token values of the packed row [1, T] back in TRL's completion layout [B, C], zero where not scored."""
    if values.shape != packed.input_ids.shape:
        raise ValueError(f"unpack_per_token: expected values of shape {tuple(packed.input_ids.shape)}, got {tuple(values.shape)}")
    gathered = values[0][packed.source_index]
    return torch.where(packed.source_valid, gathered, torch.zeros_like(gathered))


def group_preserving_permutation(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """A random row order that keeps rows with identical prompts next to each other.

    It is derived from exactly one `torch.randperm(batch)` draw, the same draw TRL's row shuffle makes, so the random
    stream (and hence every later generation) is the one the stock trainer sees. Groups come in the order their first
    member takes in that draw; rows within a group keep that draw's order.
    """
    batch = prompt_ids.shape[0]
    row_permutation = torch.randperm(batch)
    group_of_row, num_groups = prompt_groups(prompt_ids.cpu(), prompt_mask.cpu())
    rank_of_row = torch.empty(batch, dtype=torch.long)
    rank_of_row[row_permutation] = torch.arange(batch)
    group_rank = torch.full((num_groups,), batch, dtype=torch.long).scatter_reduce(
        0, group_of_row, rank_of_row, reduce="amin"
    )
    # Sort by (rank of the row's group, rank of the row); both are < batch, so one integer key orders them.
    return torch.argsort(group_rank[group_of_row] * batch + rank_of_row)


def permute_rows(batch: Mapping[str, Any], permutation: torch.Tensor) -> dict[str, Any]:
    """Every sequence value of `batch` reordered by `permutation` along its first dimension (scalars, 0-d tensors
    and None kept as they are), like TRL's `shuffle_sequence_dict` with a given order."""
    order = permutation.tolist()

    def permute(value: Any) -> Any:
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[permutation.to(value.device)]
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [value[i] for i in order]
        return value

    return {key: permute(value) for key, value in batch.items()}
