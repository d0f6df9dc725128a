"""GRPOTrainer: TRL's GRPO where each group's shared prompt is encoded once (paper "Prefix Grouper").

Only the per-token log-prob/entropy computation changes (policy, old-policy and reference passes all go through
`_get_per_token_logps_and_entropies`): rows sharing a prompt are packed into one row and run with the
`hf_eff_prefix_grouped` attention, and the values are put back in TRL's [B, T] layout, so the loss, its normalization
and everything downstream are TRL's own. The row shuffle after generation keeps groups together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import peft
import torch
import trl
from accelerate.utils import extract_model_from_parallel
from transformers import PreTrainedModel
from trl.extras.profiling import profiling_decorator
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from .attention import (
    LAYOUT_KWARG,
    PREFIX_GROUPED_ATTENTION,
    building_grouped_forward,
    register_prefix_grouped_attention,
    sliding_window_limit,
    unsupported_model_reason,
)
from .config import GRPOConfig, normalize_prefix_grouping
from .cost import ModelCost, grouped_cost, standard_cost
from .packing import (
    PackedGroups,
    group_preserving_permutation,
    layout_problem,
    pack_groups,
    permute_rows,
    prompt_groups,
    unpack_per_token,
)

logger = logging.getLogger(__name__)

# "auto" groups a batch only when the estimated FLOPs drop at least this much. On CPU the measured gain tracks the
# estimate (benchmarks/prefix_grpo.py: 1.16-1.23x at an estimated 1.13-1.18x); the margin is kept for accelerators,
# where the grouped forward's more and smaller kernel calls weigh more and short prompts were reported to lose.
AUTO_MIN_ESTIMATED_SPEEDUP = 1.2


def _unprofiled(method):
    """TRL's method without its profiling wrapper: the overrides are profiled once, under the same names, whichever
    path they take."""
    return getattr(method, "__wrapped__", method)


_stock_logps_and_entropies = _unprofiled(trl.GRPOTrainer._get_per_token_logps_and_entropies)
_stock_prepare_inputs = _unprofiled(trl.GRPOTrainer._prepare_inputs)

_MULTIMODAL_INPUTS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles", "image_sizes",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


class _CannotGroup(Exception):
    """Why a batch runs the standard forward: `kind` names the reason for logging once, `message` explains it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` with prefix grouping (`GRPOConfig.prefix_grouping`); same arguments, same results."""

    _tag_names = ["trl", "grpo", "hf_eff", "prefix-grouping"]

    def __init__(self, model, reward_funcs=None, args=None, *positional, **keyword):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = GRPOConfig(f"{name.split('/')[-1]}-GRPO")
        # A plain trl.GRPOConfig has no such field and means "auto".
        mode = normalize_prefix_grouping(getattr(args, "prefix_grouping", "auto"))
        if mode is True and isinstance(model, torch.nn.Module):
            self._require_supported(_base_model(model))  # before TRL builds anything around the model
        register_prefix_grouped_attention()
        super().__init__(model, reward_funcs, args, *positional, **keyword)
        self.prefix_grouping = mode
        self._logged_fallbacks: set[str] = set()
        self._attention_to_restore: dict[int, tuple[PreTrainedModel, str]] = {}
        self._other_model_reasons: dict[int, str | None] = {}
        self._model_cost = ModelCost.from_config(_base_model(self.model).config)
        self._unsupported_model = unsupported_model_reason(_base_model(self.model)) if mode is not False else None
        if self._unsupported_model is not None:
            if mode is True:
                self._require_supported(_base_model(self.model))
            self._log_fallback("model", f"{self._unsupported_model}")

    # --- the passes TRL makes -----------------------------------------------------------------------------------

    @profiling_decorator
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ):
        def standard(ids, mask, size):
            return _stock_logps_and_entropies(
                self, model, ids, mask, logits_to_keep, batch_size=size, compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss, **multimodal_inputs,
            )  # fmt: skip

        if self.prefix_grouping is False:
            return standard(input_ids, attention_mask, batch_size)
        try:
            self._check_whole_call(model, compute_aux_loss, multimodal_inputs)
        except _CannotGroup as reason:
            self._fall_back(reason)
            return standard(input_ids, attention_mask, batch_size)

        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, grouped_rows = [], [], 0
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            try:
                packed = self._pack(model, ids, mask, logits_to_keep)
            except _CannotGroup as reason:
                self._fall_back(reason)
                logps, entropies, _ = standard(ids, mask, None)
            else:
                logps, entropies = self._grouped_forward(model, packed, compute_entropy)
                grouped_rows += ids.size(0)
            all_logps.append(logps)
            all_entropies.append(entropies)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["prefix_grouping/grouped_fraction"].append(grouped_rows / max(input_ids.size(0), 1))
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return torch.cat(all_logps, dim=0), entropies, None

    def _grouped_forward(self, model, packed: PackedGroups, compute_entropy: bool):
        base = _base_model(model)
        with self._grouped_attention(base), building_grouped_forward(), self.accelerator.autocast():
            outputs = model(
                input_ids=packed.input_ids,
                position_ids=packed.position_ids,
                shift_labels=packed.shift_labels,
                fused_lm_head=True,
                use_cache=False,
                **{LAYOUT_KWARG: packed.layout},
            )
        logps = unpack_per_token(outputs.log_probs, packed)
        entropies = unpack_per_token(outputs.entropy, packed) if compute_entropy else None
        return logps, entropies

    # --- keeping groups together ----------------------------------------------------------------------------------

    @profiling_decorator
    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        # TRL's own buffering, with its row shuffle replaced by one that moves whole groups (same random draw).
        if self.prefix_grouping is False or not self.model.training:
            return _stock_prepare_inputs(self, generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            permutation = group_preserving_permutation(batch["prompt_ids"], batch["prompt_mask"])
            batch = permute_rows(batch, permutation)
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(chunk) for chunk in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # --- switching the attention implementation ------------------------------------------------------------------

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._restore_attention()

    @contextlib.contextmanager
    def _grouped_attention(self, base: PreTrainedModel) -> Iterator[None]:
        """Switch `base` to the grouped attention for the forward inside, and back afterwards.

        With gradient checkpointing the layers run again during backward, so the switch then lasts until the end of
        the training step (`training_step` restores it). The grouped implementation is plain SDPA for any forward
        without a layout, so a model still switched computes ordinary forwards correctly.
        """
        key = id(base)
        if key not in self._attention_to_restore:
            self._attention_to_restore[key] = (base, base.config._attn_implementation)
            base.set_attn_implementation(PREFIX_GROUPED_ATTENTION)
            if base.config._attn_implementation != PREFIX_GROUPED_ATTENTION:  # transformers only warns when it can't
                self._restore_attention()
                raise RuntimeError(f"could not switch {type(base).__name__} to the prefix-grouped attention")
        try:
            yield
        except BaseException:
            self._restore_attention()
            raise
        if not (torch.is_grad_enabled() and _checkpoints_activations(base)):
            self._restore_attention()

    def _restore_attention(self) -> None:
        while self._attention_to_restore:
            _, (base, previous) = self._attention_to_restore.popitem()
            base.set_attn_implementation(previous)

    # --- deciding ---------------------------------------------------------------------------------------------------

    def _check_whole_call(self, model, compute_aux_loss: bool, multimodal_inputs: dict[str, Any]) -> None:
        if self._unsupported_model is not None:
            raise _CannotGroup("model", self._unsupported_model)
        if any(multimodal_inputs.get(name) is not None for name in _MULTIMODAL_INPUTS):
            raise _CannotGroup("multimodal", "the batch has image or token-type inputs (text-only batches are grouped)")
        if compute_aux_loss:
            raise _CannotGroup(
                "aux_loss", "the MoE load-balancing loss is computed per token and would change with grouping"
            )
        base = _base_model(model)
        if base is not _base_model(self.model):  # the reference model
            if id(base) not in self._other_model_reasons:
                self._other_model_reasons[id(base)] = unsupported_model_reason(base)
            reason = self._other_model_reasons[id(base)]
            if reason is not None:
                raise _CannotGroup("model", f"reference model: {reason}")

    def _pack(self, model, input_ids, attention_mask, logits_to_keep) -> PackedGroups:
        prompt_width = input_ids.size(1) - logits_to_keep
        prompt_ids, prompt_mask = input_ids[:, :prompt_width], attention_mask[:, :prompt_width]
        problem = layout_problem(prompt_mask, attention_mask[:, prompt_width:])
        if problem is not None:
            raise _CannotGroup("layout", problem)
        _, num_groups = prompt_groups(prompt_ids, prompt_mask)
        if num_groups == input_ids.size(0):
            raise _CannotGroup(
                "no_shared_prompt",
                f"no two of the {input_ids.size(0)} completions in a batch share a prompt, so there is nothing to "
                "group (prompts in a group differ, or the per-device batch holds one completion per prompt)",
            )
        packed = pack_groups(input_ids, attention_mask, logits_to_keep)
        if not packed.layout.groups:
            raise _CannotGroup("empty", "no completion in the batch has tokens")
        base = _base_model(model)
        window = sliding_window_limit(base.config)
        longest = max(group.longest_sequence for group in packed.layout.groups)
        if window is not None and longest > window:
            raise _CannotGroup(
                "sliding_window",
                f"a sequence of {longest} tokens exceeds the model's sliding window ({window}), which grouping does "
                "not apply",
            )
        if self.prefix_grouping == "auto":
            speedup = self._estimated_speedup(input_ids, attention_mask, packed)
            if speedup < AUTO_MIN_ESTIMATED_SPEEDUP:
                raise _CannotGroup(
                    "saving",
                    f"the estimated saving is too small to pay (about {speedup:.2f}x fewer FLOPs, below "
                    f"{AUTO_MIN_ESTIMATED_SPEEDUP}x; prompts are short next to the completions)",
                )
        return packed

    def _estimated_speedup(self, input_ids, attention_mask, packed: PackedGroups) -> float:
        rows, columns = input_ids.shape
        # TRL's fused LM head scores every position on CPU and only the scored ones on accelerators.
        every_position = input_ids.device.type == "cpu"
        scored = int(packed.source_valid.sum())
        standard = standard_cost(
            self._model_cost, rows, columns, padded=not bool(attention_mask.all()),
            scored_positions=rows * (columns - 1) if every_position else scored,
        )  # fmt: skip
        grouped = grouped_cost(self._model_cost, packed.layout, packed.num_tokens if every_position else scored)
        return standard / grouped

    def _fall_back(self, reason: _CannotGroup) -> None:
        if self.prefix_grouping is True:
            raise ValueError(f"prefix_grouping=True, but this batch cannot be grouped: {reason}")
        self._log_fallback(reason.kind, str(reason))

    def _log_fallback(self, kind: str, message: str) -> None:
        if kind not in self._logged_fallbacks:
            self._logged_fallbacks.add(kind)
            logger.warning("prefix_grouping='auto' uses the standard forward: %s", message)

    @staticmethod
    def _require_supported(base: torch.nn.Module) -> None:
        reason = unsupported_model_reason(base)
        if reason is not None:
            raise ValueError(
                f'prefix_grouping=True, but the model cannot be prefix-grouped: {reason}. Use prefix_grouping="auto" '
                "(falls back to the standard forward) or False."
            )


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside accelerate/DDP and PEFT wrappers."""
    model = extract_model_from_parallel(model)
    if isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    return model


def _checkpoints_activations(model: torch.nn.Module) -> bool:
    """Whether some layer recomputes its forward during backward (transformers' gradient checkpointing)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
