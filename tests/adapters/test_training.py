"""Adapters in real training set-ups: half-precision bases, gradient checkpointing, bitsandbytes bases, Trainer."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from .cases import CONFIG_CASES, lora_with_the_same_update

METHOD_CASES = ["sharelora_A", "loraxs", "blocklora"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", METHOD_CASES)
def test_half_precision_base(tiny_llama, case, dtype):
    base = tiny_llama.model().to(dtype)
    model = get_peft_model(base, CONFIG_CASES[case](tiny_llama.targets, init_weights=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable), "adapters train in fp32 over a half-precision base"
    inputs = tiny_llama.inputs()
    output = tiny_llama.output(model, inputs)
    assert output.dtype == dtype
    output.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    with torch.no_grad():
        unmerged = tiny_llama.output(model, inputs).float()
        model.merge_adapter()
        merged = tiny_llama.output(model, inputs).float()
    # merging rounds the weight to the base dtype once
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05 * unmerged.abs().max().item())


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("case", METHOD_CASES)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama, case, use_reentrant):
    def adapter_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        base = tiny_llama.model().train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            base.enable_input_require_grads()
        torch.manual_seed(7)
        model = get_peft_model(base, CONFIG_CASES[case](tiny_llama.targets, init_weights=False))
        tiny_llama.output(model, tiny_llama.inputs()).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from tests.conftest import TINY_MODELS

    path = tmp_path_factory.mktemp("tiny_llama")
    TINY_MODELS["llama"].model().save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", METHOD_CASES)
def test_bitsandbytes_base_trains_saves_and_merges(tiny_llama, saved_llama, case, bits, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_compute_dtype=torch.float32
    )

    def load_base():
        return transformers.AutoModelForCausalLM.from_pretrained(
            saved_llama, quantization_config=quantization, device_map="cpu"
        ).eval()

    model = get_peft_model(load_base(), CONFIG_CASES[case](tiny_llama.targets, init_weights=False))
    quantized_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), quantized_type)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = tiny_llama.inputs()
    labels = inputs["input_ids"]
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)

    expected = tiny_llama.output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_base(), tmp_path)
    assert torch.equal(tiny_llama.output(loaded, inputs), expected)

    # Merging re-quantizes the weight, so the reference is PEFT's LoRA merged into the same quantized base.
    lora = lora_with_the_same_update(loaded, load_base(), tiny_llama.targets)
    torch.testing.assert_close(tiny_llama.output(lora, inputs), expected, rtol=1e-4, atol=1e-5)
    merged_lora = tiny_llama.output(lora.merge_and_unload(), inputs)
    torch.testing.assert_close(tiny_llama.output(loaded.merge_and_unload(), inputs), merged_lora, rtol=1e-3, atol=1e-4)


def _trainer(model, output_dir, max_steps, tiny_llama):
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (16, 8), generator=generator)]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=2, save_strategy="steps", logging_steps=1, report_to="none", use_cpu=True, seed=0,
        lr_scheduler_type="linear", warmup_steps=1,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=rows)


@pytest.mark.parametrize("case", METHOD_CASES)
def test_trainer_resume_from_checkpoint_is_exact(tiny_llama, case, tmp_path):
    def fresh_model():
        torch.manual_seed(3)
        return get_peft_model(tiny_llama.model(), CONFIG_CASES[case](tiny_llama.targets, init_weights=False))

    continuous = fresh_model()
    _trainer(continuous, tmp_path, 4, tiny_llama).train()
    # a new process would build the model afresh and resume from the checkpoint written halfway
    resumed = fresh_model()
    _trainer(resumed, tmp_path / "resumed", 4, tiny_llama).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    expected = {n: p for n, p in continuous.named_parameters() if p.requires_grad}
    actual = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert expected.keys() == actual.keys()
    for name, param in expected.items():
        torch.testing.assert_close(actual[name], param, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(p, fresh_model().get_parameter(n)) for n, p in expected.items()), "training moved"
