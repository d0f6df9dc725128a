"""Tests of hf_eff.trainers.grpo: prefix-grouped attention and packing against the plain computation, and the
GRPOTrainer against stock `trl.GRPOTrainer` on tiny Llama / Qwen2 (fp32, no downloads)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hf_eff.trainers import GRPOConfig, GRPOTrainer  # noqa: E402
from hf_eff.trainers.grpo import (  # noqa: E402
    PREFIX_GROUPED_ATTENTION,
    PrefixGroupLayout,
    pack_groups,
    prefix_grouped_backend,
    prefix_grouped_backends,
    register_prefix_grouped_backend,
    unpack_per_token,
    unregister_prefix_grouped_backend,
    unsupported_model_reason,
)
from hf_eff.trainers.grpo.attention import prefix_grouped_attention_forward, sdpa_prefix_grouped  # noqa: E402
from hf_eff.trainers.grpo.packing import (  # noqa: E402
    GroupSpan,
    group_preserving_permutation,
    layout_problem,
    permute_rows,
    prompt_groups,
)
from tests.conftest import TINY_MODELS, VOCAB  # noqa: E402

PAD, EOS = 0, 1
TRAINER_LOGGER = "hf_eff.trainers.grpo.trainer"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


# --- tiny tokenizer, models and batches ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, VOCAB)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="w2"
    )


# Tiny decoders of the families the grouped path supports (and Gemma2, which it refuses), one shape for all.
TINY_DECODER = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
}  # fmt: skip


def _tiny_decoder(family: str, **overrides) -> torch.nn.Module:
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    return model_class(config_class(**{**TINY_DECODER, **overrides}))


def _gemma2() -> torch.nn.Module:  # soft-caps attention logits: cannot be grouped
    return _tiny_decoder("Gemma2")


def _mistral() -> torch.nn.Module:
    return _tiny_decoder("Mistral", num_key_value_heads=1, sliding_window=32)


FAMILIES = {
    "llama": TINY_MODELS["llama"].build,
    "qwen2": TINY_MODELS["qwen2"].build,
    "qwen3": lambda: _tiny_decoder("Qwen3"),
    "mistral": _mistral,
    "gemma": lambda: _tiny_decoder("Gemma"),
}


def _model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]()


def _dataset(num_prompts: int = 4, prompt_words: int = 14):
    # Prompts of different lengths, so the batch has left padding.
    prompts = [" ".join(f"w{2 + (7 * i + 3 * j) % (VOCAB - 2)}" for j in range(prompt_words - 2 * i)) for i in range(num_prompts)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def _reward(completions, **kwargs):
    # Deterministic and varied: how many times the completion uses words from the lower half of the vocabulary.
    return [float(sum(int(w[1:]) < VOCAB // 2 for w in c.split() if w.startswith("w"))) for c in completions]


def _config(tmp_path, config_cls=GRPOConfig, **overrides) -> GRPOConfig:
    values = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8,
        num_generations=4, max_completion_length=6, max_steps=1, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, seed=0, optim="sgd", learning_rate=0.1, temperature=1.0,
    )  # fmt: skip
    values.update(overrides)
    return config_cls(**values)


def _trainer(tokenizer, tmp_path, model=None, trainer_cls=GRPOTrainer, dataset=None, peft_config=None, **overrides):
    config = _config(tmp_path, GRPOConfig if trainer_cls is GRPOTrainer else trl.GRPOConfig, **overrides)
    return trainer_cls(
        model=model if model is not None else _model(),
        reward_funcs=_reward,
        args=config,
        train_dataset=dataset if dataset is not None else _dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _handmade_batch(seed: int = 1):
    """Three groups (sizes 3, 1, 3) with left-padded prompts of lengths 5, 7, 2 and right-padded completions of
    lengths 5, 3, 0 | 2 | 5, 1, 4 (the empty one fully masked, as TRL's truncation masking leaves it)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_width, completion_width = 7, 5
    group_prompt_lengths = [5, 7, 2]
    group_of_row = [0, 0, 0, 1, 2, 2, 2]
    completion_lengths = [5, 3, 0, 2, 5, 1, 4]
    prompts = [torch.randint(2, VOCAB, (length,), generator=generator) for length in group_prompt_lengths]
    rows, masks = [], []
    for group, completion_length in zip(group_of_row, completion_lengths):
        prompt = prompts[group]
        ids = torch.full((prompt_width + completion_width,), PAD)
        mask = torch.zeros(prompt_width + completion_width, dtype=torch.long)
        ids[prompt_width - len(prompt) : prompt_width] = prompt
        mask[prompt_width - len(prompt) : prompt_width] = 1
        ids[prompt_width : prompt_width + completion_length] = torch.randint(2, VOCAB, (completion_length,), generator=generator)
        mask[prompt_width : prompt_width + completion_length] = 1
        rows.append(ids)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks), completion_width


# --- attention against the plain computation ---------------------------------------------------------------------


def _random_layout(spec: list[tuple[int, int, int]]) -> PrefixGroupLayout:
    spans, cursor = [], 0
    for prefix, count, length in spec:
        spans.append(GroupSpan(cursor, prefix, count, length))
        cursor = spans[-1].end
    return PrefixGroupLayout(tuple(spans), cursor)


def _reference_attention(query, key, value, layout, real_lengths, scaling):
    """Each prompt + completion sequence on its own: causal softmax attention in float64, gathered from the packed
    leaves (so the prefix gradient is summed over sequences by autograd), scattered back to packed positions."""
    out = torch.zeros(query.shape[2], query.shape[1], value.shape[-1], dtype=torch.float64)
    n_rep = query.shape[1] // key.shape[1]
    written = torch.zeros(query.shape[2], dtype=torch.bool)
    for group, lengths in zip(layout.groups, real_lengths):
        prefix = list(range(group.start, group.completions_start))
        for index, real in enumerate(lengths):
            segment_start = group.completions_start + index * group.segment_length
            positions = torch.tensor(prefix + list(range(segment_start, segment_start + real)))
            q = query[0, :, positions].double()
            k = key[0, :, positions].double().repeat_interleave(n_rep, dim=0)
            v = value[0, :, positions].double().repeat_interleave(n_rep, dim=0)
            scores = q @ k.transpose(-1, -2) * scaling
            causal = torch.ones(len(positions), len(positions), dtype=torch.bool).tril()
            weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            result = (weights @ v).transpose(0, 1)  # [n, H, Dv]
            fresh = ~written[positions]
            out = out.index_put((positions[fresh],), result[fresh])
            written[positions] = True
    return out.unsqueeze(0), written


@pytest.mark.parametrize(
    "heads, kv_heads, spec, real_lengths",
    [
        (4, 4, [(6, 3, 4)], [[4, 4, 4]]),
        # GQA; groups of different sizes; padded segments; a group without prefix (one-token prompt)
        (4, 2, [(5, 3, 5), (0, 2, 3), (9, 1, 2)], [[5, 2, 4], [3, 1], [2]]),
        (6, 1, [(3, 4, 6), (7, 2, 4)], [[6, 6, 1, 3], [4, 2]]),
    ],
)
def test_sdpa_backend_equals_per_sequence_causal_attention(heads, kv_heads, spec, real_lengths):
    generator = torch.Generator().manual_seed(0)
    layout = _random_layout(spec)
    head_dim, value_dim, scaling = 8, 6, 0.3
    query = torch.randn(1, heads, layout.length, head_dim, generator=generator, requires_grad=True)
    key = torch.randn(1, kv_heads, layout.length, head_dim, generator=generator, requires_grad=True)
    value = torch.randn(1, kv_heads, layout.length, value_dim, generator=generator, requires_grad=True)

    expected, real = _reference_attention(query, key, value, layout, real_lengths, scaling)
    actual = sdpa_prefix_grouped(query, key, value, layout, scaling)
    assert actual.shape == (1, layout.length, heads, value_dim)
    # fp32 kernel against a float64 reference, on every real position (padding positions are never read)
    torch.testing.assert_close(actual[0, real].double(), expected[0, real], rtol=1e-5, atol=1e-5)

    weights = torch.randn(expected.shape, generator=generator, dtype=torch.float64) * real[None, :, None, None]
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    actual_grads = torch.autograd.grad((actual.double() * weights).sum(), (query, key, value))
    for name, want, got in zip("qkv", expected_grads, actual_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_attention_function_without_layout_is_plain_sdpa():
    model = _model("llama").eval()
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 7, 8, generator=generator)
    key, value = torch.randn(2, 2, 7, 8, generator=generator), torch.randn(2, 2, 7, 8, generator=generator)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False
    expected, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(
        module, query, key, value, mask, scaling=0.35
    )
    actual, _ = prefix_grouped_attention_forward(module, query, key, value, mask, scaling=0.35)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_model_left_on_the_grouped_attention_runs_ordinary_forwards_and_generation():
    from hf_eff.trainers.grpo import register_prefix_grouped_attention

    model = _model("llama").eval()
    input_ids, attention_mask, _ = _handmade_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected_tokens = model.generate(input_ids=input_ids[:2], attention_mask=attention_mask[:2], max_new_tokens=4, do_sample=False)
        model.set_attn_implementation(register_prefix_grouped_attention())
        assert model.config._attn_implementation == PREFIX_GROUPED_ATTENTION
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
        actual_tokens = model.generate(input_ids=input_ids[:2], attention_mask=attention_mask[:2], max_new_tokens=4, do_sample=False)
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=0)
    assert torch.equal(actual_tokens, expected_tokens)


def test_attention_function_rejects_what_it_cannot_compute():
    module = _model("llama").model.layers[0].self_attn
    layout = _random_layout([(4, 2, 3)])
    query, key = torch.randn(1, 4, layout.length, 8), torch.randn(1, 2, layout.length, 8)
    with pytest.raises(ValueError, match="soft-capping"):
        prefix_grouped_attention_forward(module, query, key, key, None, prefix_group_layout=layout, softcap=30.0)
    with pytest.raises(ValueError, match="sliding window"):
        prefix_grouped_attention_forward(module, query, key, key, None, prefix_group_layout=layout, sliding_window=5)
    with pytest.raises(ValueError, match="one packed row"):
        prefix_grouped_attention_forward(module, query[:, :, :-1], key, key, None, prefix_group_layout=layout)


def test_backend_registry_prefers_a_registered_backend_for_the_inputs_it_accepts():
    layout = _random_layout([(4, 2, 3)])
    calls = []

    def traced(query, key, value, layout, scaling, dropout):
        calls.append(query.shape)
        return sdpa_prefix_grouped(query, key, value, layout, scaling, dropout)

    before = prefix_grouped_backends()
    register_prefix_grouped_backend("traced", traced, accepts=lambda q, k, v: q.shape[-1] == 8, priority=5)
    try:
        assert prefix_grouped_backends()[-2:] == ["traced", "sdpa"]
        module = _model("llama").model.layers[0].self_attn
        for head_dim in (8, 4):
            query, key = torch.randn(1, 4, layout.length, head_dim), torch.randn(1, 2, layout.length, head_dim)
            prefix_grouped_attention_forward(module, query, key, key, None, prefix_group_layout=layout)
        assert len(calls) == 1
    finally:
        unregister_prefix_grouped_backend("traced")
    assert prefix_grouped_backends() == before
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_prefix_grouped_backend("sdpa")


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_triton_backend_equals_sdpa_backend_and_takes_only_cuda_inputs(dropout):
    pytest.importorskip("triton")
    triton_backend = prefix_grouped_backend("triton")
    assert prefix_grouped_backends()[0] == "triton"
    generator = torch.Generator().manual_seed(5)
    # GQA; groups of different sizes; a group without prefix
    layout = _random_layout([(5, 3, 4), (0, 2, 3), (6, 1, 2)])
    query = torch.randn(1, 4, layout.length, 16, generator=generator, requires_grad=True)
    key = torch.randn(1, 2, layout.length, 16, generator=generator, requires_grad=True)
    value = torch.randn(1, 2, layout.length, 16, generator=generator, requires_grad=True)
    # The CPU tensors here run in Triton's interpreter only because the backend is called directly.
    assert not triton_backend.accepts(query, key, value)
    torch.manual_seed(0)
    actual = triton_backend.compute(query, key, value, layout, 0.3, dropout)
    torch.manual_seed(0)
    expected = sdpa_prefix_grouped(query, key, value, layout, 0.3, dropout)
    # fp32 accumulation in both; dropout falls back to SDPA, so with the same seed the masks agree
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5)
    weights = torch.randn(expected.shape, generator=generator)
    actual_grads = torch.autograd.grad((actual * weights).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    for name, got, want in zip("qkv", actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=lambda m, name=name: f"gradient of {name}: {m}")


# --- packing ------------------------------------------------------------------------------------------------------


def test_pack_groups_lays_out_a_hand_built_batch():
    # prompt width 3, completion width 3; rows 0 and 2 share prompt [5, 6] (left-padded), row 1 has [7, 8, 9]
    input_ids = torch.tensor([[0, 5, 6, 10, 11, 0], [7, 8, 9, 12, 1, 0], [0, 5, 6, 13, 14, 15]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    packed = pack_groups(input_ids, attention_mask, logits_to_keep=3)
    # group [5, 6]: prefix [5], segments [6, 10, 11, 0] and [6, 13, 14, 15]; group [7, 8, 9]: prefix [7, 8],
    # segment [9, 12, 1]
    assert packed.input_ids.tolist() == [[5, 6, 10, 11, 0, 6, 13, 14, 15, 7, 8, 9, 12, 1]]
    assert packed.position_ids.tolist() == [[1, 2, 3, 4, 5, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    ignore = -100
    assert packed.shift_labels.tolist() == [[ignore, 10, 11, ignore, ignore, 13, 14, 15, ignore, ignore, ignore, 12, 1, ignore]]
    assert packed.layout.groups == (GroupSpan(0, 1, 2, 4), GroupSpan(9, 2, 1, 3))
    assert packed.source_valid.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    assert packed.source_index[packed.source_valid].tolist() == [1, 2, 11, 12, 5, 6, 7]
    values = torch.arange(14.0).unsqueeze(0)
    assert unpack_per_token(values, packed).tolist() == [[1, 2, 0], [11, 12, 0], [5, 6, 7]]


def test_layout_problems_are_named():
    ok_prompt, ok_completion = torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0]])
    assert layout_problem(ok_prompt, ok_completion) is None
    assert "left-padded" in layout_problem(torch.tensor([[1, 1, 0]]), ok_completion)
    assert "right-padded" in layout_problem(ok_prompt, torch.tensor([[0, 1, 1]]))
    assert "empty" in layout_problem(torch.tensor([[0, 0, 0]]), ok_completion)
    assert "0 and 1" in layout_problem(torch.tensor([[0, 2, 1]]), ok_completion)
    with pytest.raises(ValueError, match="right-padded"):
        pack_groups(torch.ones(1, 6, dtype=torch.long), torch.tensor([[0, 1, 1, 0, 1, 1]]), 3)
    with pytest.raises(ValueError, match="logits_to_keep"):
        pack_groups(torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long), 6)


def test_group_preserving_shuffle_keeps_groups_together_and_draws_like_trl():
    input_ids, attention_mask, width = _handmade_batch()
    prompt_ids, prompt_mask = input_ids[:, :-width], attention_mask[:, :-width]
    group_of_row, num_groups = prompt_groups(prompt_ids, prompt_mask)
    assert group_of_row.tolist() == [0, 0, 0, 1, 2, 2, 2] and num_groups == 3
    torch.manual_seed(5)
    permutation = group_preserving_permutation(prompt_ids, prompt_mask)
    after_ours = torch.rand(1)
    torch.manual_seed(5)
    torch.randperm(len(input_ids))  # TRL's shuffle: the same single draw
    assert torch.equal(torch.rand(1), after_ours)
    assert sorted(permutation.tolist()) == list(range(7))
    groups = group_of_row[permutation].tolist()
    runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
    assert sorted(runs) == [0, 1, 2]  # each group is one contiguous run
    shuffled = permute_rows({"ids": input_ids, "texts": list("abcdefg"), "scalar": torch.tensor(2.0), "none": None}, permutation)
    assert torch.equal(shuffled["ids"], input_ids[permutation])
    assert shuffled["texts"] == [list("abcdefg")[i] for i in permutation.tolist()]
    assert shuffled["scalar"] == 2.0 and shuffled["none"] is None


# --- the trainer against stock TRL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logps_and_entropies_equal_stock(tokenizer, tmp_path, family):
    trainer = _trainer(tokenizer, tmp_path, model=_model(family), prefix_grouping=True)
    input_ids, attention_mask, width = _handmade_batch()
    trainer.model.train()
    with torch.no_grad():
        stock = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, width, compute_entropy=True
        )
        # batch_size=4 splits the first and last group across two forwards
        for batch_size in (None, 4):
            grouped = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, width, batch_size=batch_size, compute_entropy=True
            )
            torch.testing.assert_close(grouped[0], stock[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(grouped[1], stock[1], rtol=0, atol=1e-5)
    assert trainer._metrics["train"]["prefix_grouping/grouped_fraction"] == [1.0, 1.0]
    assert (stock[0] != 0).sum() == attention_mask[:, -width:].sum()  # every real completion token was scored
    assert trainer.model.config._attn_implementation == "sdpa"  # restored after each forward


def test_row_shuffle_keeps_each_group_in_one_micro_batch(tokenizer, tmp_path):
    dataset = _dataset(num_prompts=4)
    trainer = _trainer(tokenizer, tmp_path, dataset=dataset, per_device_train_batch_size=4, steps_per_generation=4)
    trainer.model.train()
    batch = [dataset[i] for i in range(4) for _ in range(trainer.num_generations)]
    torch.manual_seed(0)
    micro_batches = [trainer._prepare_inputs(batch)]
    for step in range(1, 4):
        trainer._step = step
        micro_batches.append(trainer._prepare_inputs(batch))
    prompts = set()
    for inputs in micro_batches:
        rows = {tuple(row.tolist()) for row in inputs["prompt_ids"]}
        assert len(rows) == 1, "a micro-batch mixes groups"
        prompts |= rows
    assert len(prompts) == 4


def _generated_inputs(trainer, dataset, seed=7):
    torch.manual_seed(seed)
    batch = [dataset[i] for i in range(len(dataset)) for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(batch)


def _vary(inputs, seed=3):
    """Give completions different lengths (as EOS would) and non-zero advantages, so every term of the loss and
    every gradient is exercised."""
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(inputs)
    mask = inputs["completion_mask"].clone()
    lengths = torch.randint(1, mask.shape[1] + 1, (mask.shape[0],), generator=generator)
    mask &= (torch.arange(mask.shape[1])[None, :] < lengths[:, None]).to(mask.dtype)
    inputs["completion_mask"] = mask
    inputs["completion_ids"] = inputs["completion_ids"].masked_fill(mask == 0, PAD)
    inputs["advantages"] = torch.randn(mask.shape[0], generator=generator)
    return inputs


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by the dapo normalizer
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_grads_close(grouped, stock):
    assert grouped.keys() == stock.keys()
    for name in stock:
        scale = stock[name].abs().max().clamp(min=1e-12)
        assert scale > 1e-8, f"{name}: the test should give every parameter a gradient"
        torch.testing.assert_close(grouped[name] / scale, stock[name] / scale, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "family, loss_type, checkpointing",
    [("llama", "dapo", False), ("llama", "grpo", True), ("llama", "dr_grpo", False), ("qwen2", "bnpo", True)],
)
def test_loss_and_every_gradient_equal_stock(tokenizer, tmp_path, family, loss_type, checkpointing):
    overrides = dict(loss_type=loss_type, gradient_checkpointing=checkpointing, num_iterations=2)
    dataset = _dataset()
    grouped = _trainer(tokenizer, tmp_path / "g", model=_model(family), dataset=dataset, prefix_grouping=True, **overrides)
    stock = _trainer(tokenizer, tmp_path / "s", model=_model(family), dataset=dataset, trainer_cls=trl.GRPOTrainer, **overrides)
    grouped_inputs = _generated_inputs(grouped, dataset)
    stock_inputs = _generated_inputs(stock, dataset)
    assert torch.equal(grouped_inputs["completion_ids"], stock_inputs["completion_ids"])
    # num_iterations=2 makes TRL compute old-policy log-probs, here by the grouped forward
    torch.testing.assert_close(
        grouped_inputs["old_per_token_logps"], stock_inputs["old_per_token_logps"], rtol=0, atol=1e-5
    )
    inputs = _vary(stock_inputs)
    if checkpointing:  # the training loop would switch it on
        for trainer in (grouped, stock):
            trainer.model.activation_checkpointing_enable(grouped.args.gradient_checkpointing_kwargs)
    grouped_loss, grouped_grads = _loss_and_grads(grouped, inputs)
    stock_loss, stock_grads = _loss_and_grads(stock, inputs)
    torch.testing.assert_close(grouped_loss, stock_loss, rtol=1e-5, atol=1e-7)
    _assert_grads_close(grouped_grads, stock_grads)
    # Checkpointed layers rerun in backward with the grouped attention, so outside `training_step` it stays on.
    expected = PREFIX_GROUPED_ATTENTION if checkpointing else "sdpa"
    assert grouped.model.config._attn_implementation == expected
    grouped._restore_attention()
    assert grouped.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_three_training_steps_give_stock_parameters(tokenizer, tmp_path, family):
    # Default TRL setup (gradient checkpointing on, one micro-batch per generation); SGD so that parameters differ
    # from stock exactly as much as the gradients do. Generation is random: both runs start from the same seed.
    overrides = dict(max_steps=3, gradient_checkpointing=True, beta=0.0)
    dataset = _dataset(num_prompts=2)
    runs = {}
    for name, cls, extra in [("grouped", GRPOTrainer, {"prefix_grouping": True}), ("stock", trl.GRPOTrainer, {})]:
        trainer = _trainer(tokenizer, tmp_path / name, model=_model(family), dataset=dataset, trainer_cls=cls, **overrides, **extra)
        torch.manual_seed(11)
        trainer.train()
        runs[name] = trainer
    grouped, stock = (dict(runs[name].model.named_parameters()) for name in ("grouped", "stock"))
    initial = dict(_model(family).named_parameters())
    moved = 0
    for name, param in stock.items():
        torch.testing.assert_close(grouped[name], param, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(param, initial[name]))
    assert moved == len(stock)  # training changed every parameter
    log = runs["grouped"].state.log_history
    assert [entry["prefix_grouping/grouped_fraction"] for entry in log if "loss" in entry] == [1.0, 1.0, 1.0]
    assert runs["grouped"].model.config._attn_implementation == "sdpa"


def test_peft_models_equal_stock(tokenizer, tmp_path):
    from peft import LoraConfig

    from hf_eff import ShareLoraConfig

    dataset = _dataset()
    for index, adapter in enumerate([LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), ShareLoraConfig(r=4, target_modules=["q_proj", "v_proj"])]):
        # beta > 0 adds the reference pass, which PEFT runs with the adapter disabled
        overrides = dict(beta=0.1)
        runs = {}
        for name, cls, extra in [("grouped", GRPOTrainer, {"prefix_grouping": True}), ("stock", trl.GRPOTrainer, {})]:
            torch.manual_seed(0)
            model = _model("llama")
            runs[name] = _trainer(tokenizer, tmp_path / f"{name}{index}", model=model, dataset=dataset, trainer_cls=cls, peft_config=adapter, **overrides, **extra)
        for trainer in runs.values():  # adapters start as a no-op (B = 0); move them so that every factor gets a gradient
            generator = torch.Generator().manual_seed(4)
            with torch.no_grad():
                for param in (p for p in trainer.model.parameters() if p.requires_grad):
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        grouped_inputs = _generated_inputs(runs["grouped"], dataset)
        stock_inputs = _generated_inputs(runs["stock"], dataset)
        torch.testing.assert_close(grouped_inputs["ref_per_token_logps"], stock_inputs["ref_per_token_logps"], rtol=0, atol=1e-5)
        inputs = _vary(stock_inputs)
        grouped_loss, grouped_grads = _loss_and_grads(runs["grouped"], inputs)
        stock_loss, stock_grads = _loss_and_grads(runs["stock"], inputs)
        torch.testing.assert_close(grouped_loss, stock_loss, rtol=1e-5, atol=1e-7)
        assert grouped_grads and all(".lora_" in n or "sharelora_" in n for n in grouped_grads)
        _assert_grads_close(grouped_grads, stock_grads)


# --- "auto", True, and bad input ---------------------------------------------------------------------------------


def test_auto_falls_back_and_logs_each_reason_once(tokenizer, tmp_path, caplog):
    trainer = _trainer(tokenizer, tmp_path, prefix_grouping="auto")
    input_ids, attention_mask, width = _handmade_batch()
    distinct = torch.tensor([0, 3, 4])  # one row per prompt
    caplog.set_level(logging.WARNING, logger=TRAINER_LOGGER)
    with torch.no_grad():
        for _ in range(2):
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids[distinct], attention_mask[distinct], width)
            stock, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids[distinct], attention_mask[distinct], width)
            assert torch.equal(logps, stock)
            # two-token prompts shared by four six-token completions, no padding: too little to gain
            prompt = torch.randint(2, VOCAB, (2,)).expand(4, -1)
            short = torch.cat([prompt, torch.randint(2, VOCAB, (4, 6))], dim=1)
            trainer._get_per_token_logps_and_entropies(trainer.model, short, torch.ones_like(short), 6)
    messages = [record.getMessage() for record in caplog.records if record.name == TRAINER_LOGGER]
    assert len(messages) == 2, messages
    assert "share a prompt" in messages[0] and "saving is too small" in messages[1]
    assert trainer._metrics["train"]["prefix_grouping/grouped_fraction"] == [0.0] * 4


def test_auto_groups_long_shared_prompts(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, prefix_grouping="auto")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, VOCAB, (40,), generator=generator)
    input_ids = torch.cat([prompt.expand(4, -1), torch.randint(2, VOCAB, (4, 4), generator=generator)], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, torch.ones_like(input_ids), 4)
        stock, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, torch.ones_like(input_ids), 4)
    torch.testing.assert_close(logps, stock, rtol=0, atol=1e-5)
    assert trainer._metrics["train"]["prefix_grouping/grouped_fraction"] == [1.0]


def test_unsupported_model_auto_falls_back_and_true_raises(tokenizer, tmp_path, caplog):
    assert "soft-caps" in unsupported_model_reason(_gemma2())
    assert unsupported_model_reason(TINY_MODELS["bert"].build()) is not None
    assert all(unsupported_model_reason(build()) is None for build in FAMILIES.values())
    with pytest.raises(ValueError, match="prefix_grouping=True.*soft-caps"):
        _trainer(tokenizer, tmp_path / "t", model=_gemma2(), prefix_grouping=True)
    caplog.set_level(logging.WARNING, logger=TRAINER_LOGGER)
    trainer = _trainer(tokenizer, tmp_path / "a", model=_gemma2(), prefix_grouping="auto")
    input_ids, attention_mask, width = _handmade_batch()
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
    messages = [record.getMessage() for record in caplog.records if record.name == TRAINER_LOGGER]
    assert len(messages) == 1 and "soft-caps" in messages[0]


def test_true_raises_on_a_batch_it_cannot_group(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, prefix_grouping=True)
    input_ids, attention_mask, width = _handmade_batch()
    distinct = torch.tensor([0, 3, 4])
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be grouped.*share a prompt"):
        trainer._get_per_token_logps_and_entropies(trainer.model, input_ids[distinct], attention_mask[distinct], width)
    right_padded_prompt = attention_mask.clone()
    right_padded_prompt[3, :-width] = torch.tensor([1, 1, 1, 1, 1, 1, 0])
    with torch.no_grad(), pytest.raises(ValueError, match="left-padded"):
        trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, right_padded_prompt, width)


def test_sliding_window_longer_than_a_sequence_falls_back(tokenizer, tmp_path):
    model = _mistral()
    model.config.sliding_window = 6  # the hand-made sequences reach 12 tokens
    trainer = _trainer(tokenizer, tmp_path, model=model, prefix_grouping=True)
    input_ids, attention_mask, width = _handmade_batch()
    with torch.no_grad(), pytest.raises(ValueError, match="sliding window"):
        trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (True, True), (False, False), ("False", False), ("TRUE", True)])
def test_config_accepts_auto_true_false(tmp_path, value, expected):
    assert _config(tmp_path, prefix_grouping=value).prefix_grouping == expected


@pytest.mark.parametrize("value", ["yes", 1, None, "always"])
def test_config_rejects_other_values(tmp_path, value):
    with pytest.raises(ValueError, match="`prefix_grouping` must be"):
        _config(tmp_path, prefix_grouping=value)


def test_false_is_the_stock_trainer_and_generation_is_untouched(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, prefix_grouping=False)
    input_ids, attention_mask, width = _handmade_batch()
    with torch.no_grad():
        ours = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
        stock = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention_mask, width)
    assert torch.equal(ours[0], stock[0])
    assert "prefix_grouping/grouped_fraction" not in trainer._metrics["train"]


@pytest.mark.parametrize("mode", [True, False])
def test_each_pass_is_profiled_once_under_trl_names(tokenizer, tmp_path, mode):
    from trl.extras.profiling import ProfilingContext

    trainer = _trainer(tokenizer, tmp_path, prefix_grouping=mode)
    input_ids, attention_mask, width = _handmade_batch()
    names = []
    record = ProfilingContext._log_metrics

    def recording(context, duration):
        names.append(context.name)
        return record(context, duration)

    ProfilingContext._log_metrics = recording  # observes TRL's real profiling; nothing is replaced
    try:
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, width)
    finally:
        ProfilingContext._log_metrics = record
    assert names == ["GRPOTrainer._get_per_token_logps_and_entropies"]


# --- data parallel -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_training_equals_stock(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("grpo_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)]
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    result = torch.load(tmp_path / "result.pt")
    assert (result["num_processes"], result["wrapper"]) == (2, "DistributedDataParallel")
    assert result["grouped_fraction"] == [1.0, 1.0]  # each rank packed its half of every group
    initial = TINY_MODELS["llama"].model(seed=0).state_dict()
    for name, param in result["stock"].items():
        torch.testing.assert_close(result["grouped"][name], param, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(param, initial[name]), f"{name} did not train"
