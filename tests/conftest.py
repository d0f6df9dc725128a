"""Shared fixtures: tiny transformers models built from configs (no downloads) and their example inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

# Triton kernels run in the interpreter on CPU; it reads this variable when kernels are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

# `make test` runs one xdist worker per core; a second intra-op thread per worker only waits for a busy core (tiny
# models gain nothing from it, and steps were ~100x slower on a loaded 2-core machine).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

VOCAB = 96


@dataclass
class TinyModel:
    """A tiny model factory with the inputs and targets a test needs."""

    name: str
    build: Callable[[], torch.nn.Module]
    targets: list[str]
    make_inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output_key: str

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def inputs(self, seed: int = 1) -> dict[str, torch.Tensor]:
        return self.make_inputs(torch.Generator().manual_seed(seed))

    def output(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return getattr(model(**inputs), self.output_key)


def _token_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _clip_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = _token_inputs(generator)
    # CLIP's text tower pools at the end-of-text token; without one it pools a position that sees only itself.
    inputs["input_ids"][:, -1] = VOCAB - 1
    return {**inputs, "pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _qwen2() -> torch.nn.Module:
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=VOCAB - 1
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _roberta() -> torch.nn.Module:
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=3, pad_token_id=1,
    )  # fmt: skip
    return transformers.RobertaForSequenceClassification(config)


def _clip() -> torch.nn.Module:
    config = transformers.CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "projection_dim": 16,
                     "bos_token_id": 0, "eos_token_id": VOCAB - 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 8, "projection_dim": 16},
        projection_dim=16,
    )  # fmt: skip
    return transformers.CLIPModel(config)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TINY_MODELS = {
    "llama": TinyModel("llama", _llama, LLAMA_TARGETS, _token_inputs, "logits"),
    "qwen2": TinyModel("qwen2", _qwen2, LLAMA_TARGETS, _token_inputs, "logits"),
    # GPT-2 uses transformers' Conv1D, whose weight is stored (in, out); two c_proj of different shapes
    "gpt2": TinyModel("gpt2", _gpt2, ["c_attn", "c_proj", "c_fc"], _token_inputs, "logits"),
    "bert": TinyModel("bert", _bert, ["query", "key", "value", "dense"], _token_inputs, "logits"),
    "roberta": TinyModel("roberta", _roberta, ["query", "value"], _token_inputs, "logits"),
    # text and vision towers both have q_proj/v_proj
    "clip": TinyModel("clip", _clip, ["q_proj", "v_proj", "fc1"], _clip_inputs, "logits_per_image"),
}


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny models: a second thread gains nothing there, and on a shared 2-core
    machine it only waits for a busy core (steps measured 15-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request) -> TinyModel:
    return TINY_MODELS[request.param]


@pytest.fixture
def tiny_llama() -> TinyModel:
    return TINY_MODELS["llama"]


@pytest.fixture
def tiny_gpt2() -> TinyModel:
    return TINY_MODELS["gpt2"]
