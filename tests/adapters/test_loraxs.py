"""LoRA-XS: SVD factors of the base weight, r² trainable numbers per module, recomputable and checked on load."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from hf_eff import LoraXSConfig
from hf_eff.adapters.loraxs.layer import LoraXSLinear
from hf_eff.adapters.loraxs.svd import truncated_svd


def loraxs_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraXSLinear)]


@pytest.mark.parametrize("r", [1, 4, 16])
def test_trainable_count_is_r_squared_per_module(tiny_model, r):
    model = get_peft_model(tiny_model.model(), LoraXSConfig(r=r, target_modules=tiny_model.targets))
    modules = len(loraxs_layers(model))
    assert modules > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == modules * r * r


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_factors_are_the_truncated_svd_of_the_base_weight(model_name, request):
    tiny = request.getfixturevalue(f"tiny_{model_name}")
    r = 4
    model = get_peft_model(tiny.model(), LoraXSConfig(r=r, target_modules=tiny.targets))
    for layer in loraxs_layers(model):
        weight = layer.get_base_layer().weight.detach()
        weight = weight.T if layer.fan_in_fan_out else weight  # Conv1D stores (in, out)
        up, down = layer.loraxs_B["default"], layer.loraxs_A["default"]
        torch.testing.assert_close(up.T @ up, torch.eye(r), rtol=0, atol=1e-5)  # B = U_r is orthonormal
        s = torch.linalg.svdvals(weight.double())
        best_error = s[r:].pow(2).sum().sqrt().float()
        torch.testing.assert_close(torch.linalg.matrix_norm(weight - up @ down), best_error, rtol=1e-4, atol=1e-5)
        # sign convention: the largest-magnitude entry of each left singular vector is positive
        assert (up[up.abs().argmax(dim=0), torch.arange(r)] > 0).all()


def test_factors_are_deterministic(tiny_llama):
    config = LoraXSConfig(r=4, target_modules=tiny_llama.targets)
    first, second = (loraxs_layers(get_peft_model(tiny_llama.model(), config)) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a.loraxs_A["default"], b.loraxs_A["default"])
        assert torch.equal(a.loraxs_B["default"], b.loraxs_B["default"])


def test_randomized_svd_matches_full_svd_on_a_decaying_spectrum():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(256, 64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=generator))
    weight = u @ torch.diag(0.5 ** torch.arange(64.0)) @ v.T
    full = truncated_svd(weight, 8, "full")
    randomized = truncated_svd(weight, 8, "randomized", niter=4)
    torch.testing.assert_close(randomized[0] * randomized[1], full[0] * full[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(randomized[2], full[2], rtol=0, atol=1e-4)
    assert torch.equal(truncated_svd(weight, 8, "randomized")[0], randomized[0]), "randomized SVD is seeded"


def test_checkpoint_without_factors_holds_only_r_squared_and_fingerprints(tiny_llama, tmp_path):
    r = 4
    model = get_peft_model(tiny_llama.model(), LoraXSConfig(r=r, save_factors=False, target_modules=tiny_llama.targets))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    modules = len(loraxs_layers(model))
    assert not [k for k in saved if ".loraxs_A" in k or ".loraxs_B" in k]
    assert sum(t.numel() for k, t in saved.items() if ".loraxs_R" in k) == modules * r * r
    assert len([k for k in saved if ".loraxs_fingerprint" in k]) == modules


def test_recompute_mode_refuses_a_different_base_and_leaves_it_untouched(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama.model(), LoraXSConfig(r=4, save_factors=False, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    other_base = tiny_llama.model(seed=123)
    inputs = tiny_llama.inputs()
    expected = tiny_llama.output(other_base, inputs)
    with pytest.raises(ValueError, match="differ from the ones it was trained on"):
        PeftModel.from_pretrained(other_base, tmp_path)
    assert not any(isinstance(m, BaseTunerLayer) for m in other_base.modules())
    assert not hasattr(other_base, "peft_config")
    assert torch.equal(tiny_llama.output(other_base, inputs), expected)


def test_recompute_mode_accepts_the_same_base_in_bf16(tiny_llama, tmp_path):
    model = get_peft_model(
        tiny_llama.model(), LoraXSConfig(r=4, save_factors=False, target_modules=["q_proj"], init_weights=False)
    )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama.model().to(torch.bfloat16), tmp_path)
    for trained, reloaded in zip(loraxs_layers(model), loraxs_layers(loaded)):
        torch.testing.assert_close(
            reloaded.delta_matrix("default"), trained.delta_matrix("default"), rtol=0.05, atol=0.02
        )


def test_saved_factors_on_a_different_base_warn_and_apply_unchanged(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama.model(), LoraXSConfig(r=4, target_modules=["q_proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="differ from the training base"):
        loaded = PeftModel.from_pretrained(tiny_llama.model(seed=123), tmp_path)
    for trained, reloaded in zip(loraxs_layers(model), loraxs_layers(loaded)):
        assert torch.equal(reloaded.delta_matrix("default"), trained.delta_matrix("default"))


def test_shape_only_model_on_meta_device(tiny_llama):
    with torch.device("meta"):
        base = tiny_llama.build()
    model = get_peft_model(base, LoraXSConfig(r=4, target_modules=tiny_llama.targets), low_cpu_mem_usage=True)
    modules = len(loraxs_layers(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == modules * 16
