"""Layerwise stepping (each parameter in its post-accumulate-grad hook) with gradient accumulation: same parameters
as the ordinary step after accumulation, gradients freed, hooks removable, checkpoints, Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hf_eff.optim import create_optimizer, optimizer_cls_and_kwargs
from hf_eff.optim.galore import GaLoreAdamW
from hf_eff.optim.layerwise import LayerwiseOptimizer, enable_layerwise_step, layerwise_optimizer_cls_and_kwargs
from tests.conftest import VOCAB

HYPERPARAMETERS = {
    "galore_adamw": {"rank": 4, "update_proj_gap": 2},
    "galore_adamw_8bit": {"rank": 4, "update_proj_gap": 2, "min_8bit_size": 0, "block_size": 64},
    "natural_galore_adamw": {"rank": 4, "update_proj_gap": 2, "history_size": 3},
}
WINDOWS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def micro_batches(windows: int, accumulation: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (windows, accumulation, 2, 8), generator=torch.Generator().manual_seed(0))


def train(model, optimizer, batches, *, layerwise_checks=False):
    """The ordinary accumulation loop, with an LR schedule; optionally asserts what layerwise stepping frees."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for window in batches:
        for index, input_ids in enumerate(window):
            (model(input_ids=input_ids, labels=input_ids).loss / len(window)).backward()
            if layerwise_checks:
                last = index == len(window) - 1
                # stepped in the hooks of the last micro-batch, gradients freed; accumulated before that
                assert all((p.grad is None) == last for p in model.parameters())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(HYPERPARAMETERS))
@pytest.mark.parametrize("accumulation", [1, 3])
def test_layerwise_matches_the_ordinary_step(tiny_llama, name, accumulation):
    # Same arithmetic per parameter by construction (`step_parameter`), so the parameters are bit-identical.
    reference_model = tiny_llama.model().train()
    model = copy.deepcopy(reference_model)
    batches = micro_batches(WINDOWS, accumulation)
    hyper = {"lr": 1e-2, "weight_decay": 0.01, **HYPERPARAMETERS[name]}
    train(reference_model, create_optimizer(reference_model, name, **hyper), batches)
    optimizer = enable_layerwise_step(create_optimizer(model, name, **hyper), accumulation)
    train(model, optimizer, batches, layerwise_checks=True)
    for (key, param), expected in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(param, expected), key
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + WINDOWS))


class TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(6, 8)
        self.first, self.second = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)

    def forward(self, x, branch):
        return (self.first if branch == 0 else self.second)(torch.tanh(self.shared(x))).square().mean()


def test_parameters_missing_from_a_micro_batch_are_stepped_by_step():
    torch.manual_seed(0)
    reference_model = TwoBranches()
    model = copy.deepcopy(reference_model)
    inputs = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    # `shared` gets a gradient in every micro-batch, `first` in two of three, `second` in one: the hooks step only
    # `shared`; step() steps the others, with the gradients they accumulated.
    branches = [0, 1, 0]
    hyper = {"lr": 0.1, "rank": 2, "update_proj_gap": 1}
    reference = create_optimizer(reference_model, "galore_adamw", target_modules=["shared"], **hyper)
    optimizer = enable_layerwise_step(
        create_optimizer(model, "galore_adamw", target_modules=["shared"], **hyper), len(branches)
    )
    for window in inputs:
        for x, branch in zip(window, branches):
            reference_model(x, branch).backward()
            model(x, branch).backward()
        assert model.shared.weight.grad is None
        assert model.first.weight.grad is not None and model.second.weight.grad is not None
        reference.step()
        reference.zero_grad()
        optimizer.step()
        assert all(p.grad is None for p in model.parameters())
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, expected)


def test_remove_restores_ordinary_accumulation(tiny_llama):
    reference_model = tiny_llama.model().train()
    model = copy.deepcopy(reference_model)
    batches = micro_batches(2, 2)
    hyper = {"lr": 1e-2, **HYPERPARAMETERS["galore_adamw"]}
    reference = create_optimizer(reference_model, "galore_adamw", **hyper)
    for window in (batches[:1], batches[1:]):  # one LR schedule per call of `train`, as below
        train(reference_model, reference, window)
    optimizer = enable_layerwise_step(create_optimizer(model, "galore_adamw", **hyper), 2)
    train(model, optimizer, batches[:1], layerwise_checks=True)
    optimizer.remove()
    assert not optimizer.active
    input_ids = batches[1, 0]
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook stepped anything
    optimizer.zero_grad()
    # the second window, ordinary: step() is the wrapped optimizer's again
    train(model, optimizer, batches[1:])
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, expected)
    # and the optimizer can be made layerwise again
    enable_layerwise_step(optimizer.optimizer, 2).remove()


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_8bit"])
def test_state_dict_round_trip_and_interchangeable_with_ordinary_checkpoints(tiny_llama, tmp_path, name):
    hyper = {"lr": 1e-2, **HYPERPARAMETERS[name]}
    model = tiny_llama.model().train()
    batches = micro_batches(4, 2)
    optimizer = enable_layerwise_step(create_optimizer(model, name, **hyper), 2)
    train(model, optimizer, batches[:2])
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    saved_model = copy.deepcopy(model)
    train(model, optimizer, batches[2:])
    # resumed layerwise, and resumed with the ordinary optimizer from the same checkpoint
    for layerwise in (True, False):
        resumed_model = copy.deepcopy(saved_model)
        resumed = create_optimizer(resumed_model, name, **hyper)
        if layerwise:
            resumed = enable_layerwise_step(resumed, 2)
        resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        train(resumed_model, resumed, batches[2:])
        for param, expected in zip(resumed_model.parameters(), model.parameters()):
            assert torch.equal(param, expected)


def test_bad_arguments_raise_before_any_hook(tiny_llama):
    model = tiny_llama.model()
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer with a `step_parameter"):
        enable_layerwise_step(torch.optim.AdamW(model.parameters()), 1)
    optimizer = create_optimizer(model, "galore_adamw", rank=4)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="`gradient_accumulation_steps` must be an integer >= 1"):
            enable_layerwise_step(optimizer, bad)
    with pytest.raises(TypeError, match="`optimizer_class` must have a `step_parameter"):
        LayerwiseOptimizer(model.parameters(), torch.optim.AdamW)
    layerwise = enable_layerwise_step(optimizer, 2)
    with pytest.raises(RuntimeError, match="already stepped layerwise"):
        enable_layerwise_step(optimizer, 2)
    layerwise.remove()
    input_ids = micro_batches(1, 1)[0, 0]
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert not optimizer.state  # the failed calls left no hook behind


def test_add_param_group_hooks_the_new_parameters():
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    optimizer = LayerwiseOptimizer(first.parameters(), GaLoreAdamW, rank=2)
    optimizer.add_param_group({"params": list(second.parameters()), "target": False})
    second(first(torch.randn(5, 4))).sum().backward()
    assert all(p.grad is None for p in [*first.parameters(), *second.parameters()])
    assert len(optimizer.state) == 4


def _trainer(model, output_dir, layerwise, max_steps=3):
    rows = [{"input_ids": ids, "labels": ids} for ids in micro_batches(1, 18)[0].view(-1, 8)]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=3,
        learning_rate=5e-3, weight_decay=0.01, max_grad_norm=0.0, save_steps=2, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, lr_scheduler_type="linear", warmup_steps=1,
    )  # fmt: skip
    make = layerwise_optimizer_cls_and_kwargs if layerwise else optimizer_cls_and_kwargs
    optimizer = make(args, model, "galore_adamw", **HYPERPARAMETERS["galore_adamw"])
    return transformers.Trainer(model=model, args=args, train_dataset=rows, optimizer_cls_and_kwargs=optimizer)


def test_trainer_with_gradient_accumulation_matches_and_resumes(tiny_llama, tmp_path):
    ordinary = _trainer(tiny_llama.model(), tmp_path / "ordinary", layerwise=False)
    ordinary.train()
    layerwise = _trainer(tiny_llama.model(), tmp_path / "layerwise", layerwise=True)
    layerwise.train()
    assert isinstance(layerwise.optimizer.optimizer, LayerwiseOptimizer)
    for param, expected in zip(layerwise.model.parameters(), ordinary.model.parameters()):
        assert torch.equal(param, expected)
    resumed = _trainer(tiny_llama.model(), tmp_path / "resumed", layerwise=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "layerwise" / "checkpoint-2"))
    for param, expected in zip(resumed.model.parameters(), layerwise.model.parameters()):
        assert torch.equal(param, expected)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"max_grad_norm": 1.0}, ValueError, "`args.max_grad_norm` must be 0"),
        ({"max_grad_norm": 0.0, "fp16": True}, ValueError, "`args.fp16` must be False"),
    ],
)
def test_trainer_options_layerwise_cannot_honour_are_refused(tiny_llama, tmp_path, arguments, error, match):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for key, value in arguments.items():
        setattr(args, key, value)
    with pytest.raises(error, match=match):
        layerwise_optimizer_cls_and_kwargs(args, tiny_llama.model(), "galore_adamw", rank=4)
