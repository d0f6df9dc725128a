"""Trains a tiny Llama with hf_eff's prefix-grouped GRPOTrainer and with stock trl.GRPOTrainer, data-parallel, for
`test_grpo.py`:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainers/grpo_ddp_worker.py OUT

`accelerate` wraps each model in DDP over gloo. num_generations=8 with 4 rows per process splits every group across
the two ranks (TRL's RepeatSampler does that), so each rank packs a half group and TRL gathers the rewards across
ranks. Both runs start from the same weights and random state; rank 0 writes OUT/result.pt with both final state
dicts, the grouped trainer's `prefix_grouping/grouped_fraction` log, and how the run was distributed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import trl
from accelerate import PartialState
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.conftest

from hf_eff.trainers import GRPOConfig, GRPOTrainer  # noqa: E402
from tests.conftest import TINY_MODELS, VOCAB  # noqa: E402


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, VOCAB)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="w2")


def reward(completions, **kwargs):
    return [float(sum(int(w[1:]) < VOCAB // 2 for w in c.split() if w.startswith("w"))) for c in completions]


def train(trainer_cls, config_cls, output_dir: str, extra: dict):
    config = config_cls(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        num_generations=8, max_completion_length=6, max_steps=2, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, seed=0, optim="sgd", learning_rate=0.1, **extra,
    )  # fmt: skip
    prompts = [" ".join(f"w{2 + (7 * i + 3 * j) % (VOCAB - 2)}" for j in range(14 - 2 * i)) for i in range(2)]
    model = TINY_MODELS["llama"].model(seed=0).train()
    trainer = trainer_cls(
        model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer(),
    )  # fmt: skip
    torch.manual_seed(11)
    trainer.train()
    return trainer


def main() -> None:
    torch.set_num_threads(1)
    output = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as scratch:
        grouped = train(GRPOTrainer, GRPOConfig, f"{scratch}/grouped", {"prefix_grouping": True})
        stock = train(trl.GRPOTrainer, trl.GRPOConfig, f"{scratch}/stock", {})
    state = PartialState()
    if state.is_main_process:
        torch.save(
            {
                "grouped": grouped.accelerator.unwrap_model(grouped.model).state_dict(),
                "stock": stock.accelerator.unwrap_model(stock.model).state_dict(),
                "grouped_fraction": [
                    entry["prefix_grouping/grouped_fraction"] for entry in grouped.state.log_history if "loss" in entry
                ],
                "num_processes": state.num_processes,
                "wrapper": type(grouped.model_wrapped).__name__,
            },
            output / "result.pt",
        )
    # Torn down together: a rank that exits while the other still finishes a collective can abort.
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
