"""Tests for hf_eff.callbacks; `tiny_trainer` builds the short CPU Trainer runs they share."""

from __future__ import annotations

import torch
import transformers


def token_rows(count: int = 32, length: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (count, length), generator=generator)]


def tiny_trainer(model, output_dir, callbacks, **arguments) -> transformers.Trainer:
    """A few CPU steps on random tokens, logging every step, no reporters, no checkpoints unless asked."""
    settings = {
        "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
        "report_to": "none", "use_cpu": True, "save_strategy": "no", "seed": 0, "disable_tqdm": True,
    }  # fmt: skip
    settings.update(arguments)
    args = transformers.TrainingArguments(output_dir=str(output_dir), **settings)
    return transformers.Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=callbacks)
