"""Tests for hf_eff.diffusion.preference (Diffusion-DPO, Inversion-DPO, Self-NPO, DDIM inversion) on tiny diffusers models built from configs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from hf_eff.diffusion.preference import (
    DiffusionDPO,
    InversionDPO,
    SelfNPO,
    call_denoiser,
    classifier_free_guidance,
    ddim_invert,
    diffusion_dpo_loss,
    inversion_dpo_loss,
    inversion_trajectory_error,
    npo_guided_prediction,
    npo_sample,
    self_npo_loss,
)
from hf_eff.diffusion.preference.schedules import ddim_step_to, renoise, split_prediction

LOG2 = math.log(2.0)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    )  # fmt: skip


def pair_batch(seed: int = 0, batch_size: int = 2, conditioned: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "winner": torch.randn(batch_size, 2, 8, 8, generator=generator),
        "loser": torch.randn(batch_size, 2, 8, 8, generator=generator),
    }
    if conditioned:
        batch["conditioning"] = {"encoder_hidden_states": torch.randn(batch_size, 3, 8, generator=generator)}
        batch["negative_conditioning"] = {"encoder_hidden_states": torch.zeros(batch_size, 3, 8)}
    return batch


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussianDenoiser(torch.nn.Module):
    """The exact ε-prediction for data ~ N(mean, std² I): ε*(x, t) = √(1−ᾱ)(x − √ᾱ·mean) / (ᾱ·std² + 1 − ᾱ).

    Its probability-flow ODE is smooth, so DDIM inversion followed by DDIM sampling must return the input up to the
    first-order discretisation error."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.mean, self.std = mean, std

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        alpha = self.alphas_cumprod[timestep.long()].reshape(-1, 1, 1, 1)
        return (1 - alpha).sqrt() * (sample - alpha.sqrt() * self.mean) / (alpha * self.std**2 + 1 - alpha)


class TinyVideoDenoiser(torch.nn.Module):
    """A Conv3d denoiser over (B, C, F, H, W) video latents with a scalar timestep embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(2, 2, kernel_size=3, padding=1)
        self.time_scale = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.conv(sample) + self.time_scale * (timestep.float() / 1000).reshape(-1, 1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------- losses


def test_diffusion_dpo_loss_hand_computed():
    # logits = −β/2·((m_w − r_w) − (m_l − r_l)) with β = 2: pair 0 → −((−0.5) − 0.5) = 1; pair 1 → −(0 − 0.25) = 0.25
    result = diffusion_dpo_loss(
        torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5]), torch.tensor([1.5, 0.5]), torch.tensor([1.5, 0.25]), 2.0
    )
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.25))) / 2
    assert result.loss.item() == pytest.approx(expected, abs=1e-6)
    assert result.logits.tolist() == pytest.approx([1.0, 0.25])
    assert result.implicit_accuracy.item() == 1.0


def test_diffusion_dpo_loss_is_log2_when_model_is_reference_and_counts_ties_as_half():
    errors = torch.tensor([0.3, 1.7, 0.9])
    result = diffusion_dpo_loss(errors, errors.flip(0), errors, errors.flip(0), beta=5000.0)
    assert result.loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert result.implicit_accuracy.item() == 0.5


def test_diffusion_dpo_loss_gradient_prefers_the_winner():
    model_err_w = torch.tensor([1.0], requires_grad=True)
    model_err_l = torch.tensor([1.0], requires_grad=True)
    diffusion_dpo_loss(model_err_w, model_err_l, torch.tensor([1.0]), torch.tensor([1.0]), beta=4.0).loss.backward()
    # d/dm_w [log(1 + e^{β/2 (m_w − m_l)})] at equal errors = β/2 · σ(0) = 1, and −1 for the loser
    assert model_err_w.grad.item() == pytest.approx(1.0)
    assert model_err_l.grad.item() == pytest.approx(-1.0)


def test_inversion_trajectory_error_and_loss_hand_computed():
    model_outputs = torch.tensor([[[1.0, 1.0]], [[0.0, 2.0]]])  # (K=2, B=1, 2)
    reference_outputs = torch.zeros_like(model_outputs)
    # step 0: mse 1 · 1/(2·0.5) = 1; step 1: mse 2 · 1/(2·0.25) = 4; mean 2.5
    error = inversion_trajectory_error(model_outputs, reference_outputs, torch.tensor([0.5, 0.25]))
    assert error.tolist() == pytest.approx([2.5])
    result = inversion_dpo_loss(error, torch.tensor([0.5]), beta=1.0)  # logit −0.5·(2.5 − 0.5) = −1
    assert result.loss.item() == pytest.approx(math.log1p(math.e), abs=1e-6)
    assert result.implicit_accuracy.item() == 0.0


def test_self_npo_loss_hand_computed():
    prediction, target = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])
    assert self_npo_loss(prediction, target, "l2").item() == pytest.approx(2.0)
    # pseudo-Huber with c = 1: (√1 − 1 + √5 − 1) / 2
    assert self_npo_loss(prediction, target, "huber", huber_c=1.0).item() == pytest.approx((math.sqrt(5) - 1) / 2)
    with pytest.raises(ValueError, match="loss_type"):
        self_npo_loss(prediction, target, "l1")


def test_classifier_free_guidance_hand_computed():
    assert classifier_free_guidance(torch.tensor([3.0]), torch.tensor([1.0]), 2.0).item() == 5.0


# ------------------------------------------------------------------------------------------------ schedule math


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_recovers_x0_and_noise_of_diffusers_forward_process(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    generator = seeded(3)
    x0, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    timesteps = torch.tensor([10, 500, 990])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    output = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, timesteps)}
    x0_hat, noise_hat = split_prediction(
        output[prediction_type], noisy, scheduler.alphas_cumprod[timesteps], prediction_type
    )
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)  # x0 = (x − √(1−ᾱ)ε)/√ᾱ amplifies at t = 990
    torch.testing.assert_close(noise_hat, noise, atol=2e-4, rtol=1e-4)


def test_batched_ddim_step_matches_diffusers_ddim_scheduler_step():
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    generator = seeded(4)
    sample, output = torch.randn(2, 2, 4, 4, generator=generator), torch.randn(2, 2, 4, 4, generator=generator)
    timestep = int(scheduler.timesteps[3])
    expected = scheduler.step(output, timestep, sample).prev_sample
    levels = scheduler.alphas_cumprod[torch.tensor([timestep, timestep])]
    x0, epsilon = split_prediction(output, sample, levels, "v_prediction")
    previous = scheduler.alphas_cumprod[torch.tensor([timestep - 100] * 2)]
    torch.testing.assert_close(ddim_step_to(x0, epsilon, previous), expected, atol=1e-5, rtol=1e-5)


def test_renoise_draws_the_forward_process_between_two_levels():
    # x_s ~ q(x_s | x0) then renoise to u must be distributed as q(x_u | x0) = N(√ᾱ_u x0, (1 − ᾱ_u) I)
    generator = seeded(5)
    x0 = torch.full((20000, 1), 0.7)
    alpha_s, alpha_u = torch.tensor(0.8), torch.tensor(0.3)
    x_s = alpha_s.sqrt() * x0 + (1 - alpha_s).sqrt() * torch.randn(x0.shape, generator=generator)
    x_u = renoise(x_s, alpha_s.expand(20000), alpha_u.expand(20000), torch.randn(x0.shape, generator=generator))
    assert x_u.mean().item() == pytest.approx(alpha_u.sqrt().item() * 0.7, abs=0.02)  # 4 standard errors
    assert x_u.var().item() == pytest.approx(1 - alpha_u.item(), abs=0.03)


# --------------------------------------------------------------------------------------------------- inversion


def _ddim_sample(model, scheduler, noise, num_steps):
    scheduler.set_timesteps(num_steps)
    sample = noise
    for timestep in scheduler.timesteps:
        sample = scheduler.step(call_denoiser(model, sample, timestep.expand(len(sample)), {}), timestep, sample)
        sample = sample.prev_sample
    return sample


@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing"])
def test_ddim_inversion_then_sampling_reconstructs_the_input(timestep_spacing):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        timestep_spacing=timestep_spacing,
    )  # fmt: skip
    denoiser = GaussianDenoiser(scheduler.alphas_cumprod, mean=0.3, std=0.5)
    x0 = 0.3 + 0.5 * torch.randn(2, 2, 8, 8, generator=seeded(6), dtype=torch.float64)
    errors = {}
    for num_steps in (50, 200):
        inversion = ddim_invert(denoiser, scheduler, x0, num_steps)
        assert inversion.latents.shape == (num_steps + 1, *x0.shape)
        assert torch.equal(inversion.latents[0], x0)
        reconstruction = _ddim_sample(denoiser, scheduler, inversion.noise, num_steps)
        errors[num_steps] = (reconstruction - x0).abs().max().item()
    # Tolerance: max |error| < 0.03 at 200 steps (measured 0.017; data std 0.5), and first-order convergence
    assert errors[200] < 0.03
    assert errors[200] < errors[50] / 3
    # inverting Gaussian data with its exact denoiser lands on unit-variance noise
    assert 0.9 < inversion.noise.std().item() < 1.1


def test_ddim_invert_records_the_guided_outputs_that_made_each_step():
    model = tiny_cond_unet().eval()
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
    batch = pair_batch(7)
    inversion = ddim_invert(
        model, scheduler, batch["winner"], 3, batch["conditioning"],
        negative_conditioning=batch["negative_conditioning"], guidance_scale=2.0,
    )  # fmt: skip
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(3)
    assert inversion.timesteps.tolist() == inverse.timesteps.tolist() == [1, 334, 667]
    torch.testing.assert_close(inversion.alphas_cumprod, scheduler.alphas_cumprod[inverse.timesteps])
    with torch.no_grad():
        for k, timestep in enumerate(inverse.timesteps):
            latents, timesteps = inversion.latents[k], timestep.expand(2)
            positive = model(latents, timesteps, **batch["conditioning"]).sample
            negative = model(latents, timesteps, **batch["negative_conditioning"]).sample
            output = negative + 2.0 * (positive - negative)
            torch.testing.assert_close(inversion.model_outputs[k], output)
            torch.testing.assert_close(inversion.latents[k + 1], inverse.step(output, timestep, latents).prev_sample)


# ------------------------------------------------------------------------------------------------ Diffusion-DPO


def test_dpo_reference_copy_and_disabled_adapters_give_log2_at_init():
    base = tiny_cond_unet()
    batch = pair_batch(8)
    scheduler = DDPMScheduler()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=LORA_TARGETS))
    diffusers_adapter = copy.deepcopy(base)
    diffusers_adapter.add_adapter(LoraConfig(r=2, target_modules=LORA_TARGETS))
    setups = [(copy.deepcopy(base), copy.deepcopy(base)), (peft_model, None), (diffusers_adapter, None)]
    outputs = [DiffusionDPO(m, scheduler, ref_model=r).training_step(batch, seeded(9)) for m, r in setups]
    for output in outputs:
        assert output.loss.item() == pytest.approx(LOG2, abs=1e-6)
        torch.testing.assert_close(output.metrics["model_loss"], outputs[0].metrics["model_loss"])
        torch.testing.assert_close(output.metrics["ref_loss"], outputs[0].metrics["model_loss"])


def test_dpo_disabled_adapter_reference_is_the_base_model():
    base = tiny_cond_unet()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=LORA_TARGETS, init_lora_weights=False))
    batch = pair_batch(10)
    with_adapter = DiffusionDPO(model, DDPMScheduler()).training_step(batch, seeded(11))
    with_copy = DiffusionDPO(model, DDPMScheduler(), ref_model=base).training_step(batch, seeded(11))
    torch.testing.assert_close(with_adapter.loss, with_copy.loss)
    assert with_adapter.loss.item() != pytest.approx(LOG2, abs=1e-4)
    assert not any(layer.disable_adapters for layer in model.modules() if isinstance(layer, BaseTunerLayer))


def test_dpo_step_matches_plain_computation_with_shared_noise_and_timestep():
    model, reference = tiny_cond_unet(seed=1), tiny_cond_unet(seed=2)
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    batch = pair_batch(12)
    generator = seeded(13)
    batch["timesteps"] = torch.randint(0, 1000, (2,), generator=generator)
    batch["noise"] = torch.randn(2, 2, 8, 8, generator=generator)
    beta = 37.0
    output = DiffusionDPO(model, scheduler, ref_model=reference, beta=beta).training_step(batch)

    def error(net, latents):
        noisy = scheduler.add_noise(latents, batch["noise"], batch["timesteps"])
        target = scheduler.get_velocity(latents, batch["noise"], batch["timesteps"])
        prediction = net(noisy, batch["timesteps"], **batch["conditioning"]).sample
        return ((prediction - target) ** 2).mean(dim=(1, 2, 3))

    with torch.no_grad():
        inside = (
            -beta
            / 2
            * (
                (error(model, batch["winner"]) - error(reference, batch["winner"]))
                - (error(model, batch["loser"]) - error(reference, batch["loser"]))
            )
        )
    expected = -torch.nn.functional.logsigmoid(inside).mean()
    torch.testing.assert_close(output.loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_dpo_training_steps_lower_the_loss():
    model = tiny_cond_unet()
    dpo = DiffusionDPO(model, DDPMScheduler(), ref_model=copy.deepcopy(model), beta=5000.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch, losses = pair_batch(14), []
    for _ in range(4):
        output = dpo.training_step(batch, seeded(15))  # same noise and timesteps each step: one fixed objective
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[0] == pytest.approx(LOG2, abs=1e-6)
    assert losses[-1] < 0.5 * losses[0]
    assert output.metrics["implicit_accuracy"].item() == 1.0


def test_dpo_flow_matching_transformer_shares_noise_and_lowers_loss():
    model = tiny_sd3()
    generator = seeded(16)
    batch = pair_batch(16, conditioned=False)
    batch["conditioning"] = {
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
        "pooled_projections": torch.randn(2, 8, generator=generator),
    }
    seen = {}

    def recording_call(net, noisy, timesteps, conditioning):
        seen.setdefault(id(net), (noisy, timesteps))
        return call_denoiser(net, noisy, timesteps, conditioning)

    dpo = DiffusionDPO(
        model, FlowMatchEulerDiscreteScheduler(), ref_model=copy.deepcopy(model), forward_fn=recording_call
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        output = dpo.training_step(batch, seeded(17))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    noisy, timesteps = seen[id(model)]
    sigma = (timesteps / 1000).reshape(-1, 1, 1, 1)
    latents = torch.cat([batch["winner"], batch["loser"]])
    noise = (noisy - (1 - sigma) * latents) / sigma  # x_t = (1 − σ)x0 + σε
    torch.testing.assert_close(noise[:2], noise[2:], atol=1e-4, rtol=1e-4)
    assert torch.equal(timesteps[:2], timesteps[2:])
    assert losses[0] == pytest.approx(LOG2, abs=1e-6)
    assert losses[-1] < losses[0] - 0.1


def test_dpo_and_self_npo_accept_video_latents():
    model = TinyVideoDenoiser()
    generator = seeded(18)
    batch = {"winner": torch.randn(2, 2, 3, 4, 4, generator=generator), "loser": torch.randn(2, 2, 3, 4, 4)}
    output = DiffusionDPO(model, DDPMScheduler(), ref_model=copy.deepcopy(model)).training_step(batch, generator)
    assert output.loss.item() == pytest.approx(LOG2, abs=1e-6)
    npo = SelfNPO(model, DDIMScheduler(), num_ddim_steps=5, num_truncation_steps=2)
    assert torch.isfinite(npo.training_step({"latents": batch["winner"]}, generator).loss)


# ------------------------------------------------------------------------------------------------ Inversion-DPO


def test_inversion_dpo_is_log2_with_zero_gradient_when_model_is_reference():
    model = tiny_cond_unet()
    trainer = InversionDPO(
        model, DDIMScheduler(clip_sample=False), ref_model=copy.deepcopy(model), num_inversion_steps=3
    )
    output = trainer.training_step(pair_batch(19))
    output.loss.backward()
    assert output.loss.item() == pytest.approx(LOG2, abs=1e-6)
    # the deviation from the reference is quadratic, so the loss is flat at model == reference
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-8


def test_inversion_dpo_training_steps_lower_the_loss_with_disabled_adapter_reference():
    # a non-zero LoRA init makes the model differ from its base, the reference
    model = get_peft_model(tiny_cond_unet(), LoraConfig(r=2, target_modules=LORA_TARGETS, init_lora_weights=False))
    trainer = InversionDPO(
        model, DDIMScheduler(clip_sample=False), beta=10.0, num_inversion_steps=4, num_loss_steps=2, guidance_scale=2.0
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = pair_batch(20), []
    for _ in range(3):
        output = trainer.training_step(batch, seeded(21))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


# ------------------------------------------------------------------------------------------------------ Self-NPO


def test_self_npo_target_follows_diffusers_ddim_steps_with_the_unconditional_teacher():
    teacher = tiny_unet().double().eval()
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    trainer = SelfNPO(tiny_unet(seed=1).double(), scheduler, teacher=teacher, ema_decay=None, num_truncation_steps=3)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(25)  # trailing spacing: 999, 959, ..., 39, the trainer's grid
    noisy = torch.randn(2, 2, 8, 8, generator=seeded(22), dtype=torch.float64)
    start_index = torch.tensor([6, 1])  # one chain of 3 full steps, one that runs out at timestep 0
    end_sample, end_timesteps, target = trainer._truncated_target(noisy, start_index, {})
    assert end_timesteps.tolist() == [159, 0]
    with torch.no_grad():
        for b, index in enumerate(start_index.tolist()):
            sample = noisy[b : b + 1]
            grid = trainer.ddim_timesteps.tolist()
            for timestep in grid[max(index - 2, 0) : index + 1][::-1]:
                sample = ddim.step(teacher(sample, timestep).sample, timestep, sample).prev_sample
            torch.testing.assert_close(end_sample[b : b + 1], sample)
            end = end_timesteps[b].item()
            alpha = scheduler.alphas_cumprod[end].double()
            expected = (sample - (1 - alpha).sqrt() * teacher(sample, end).sample) / alpha.sqrt()
            torch.testing.assert_close(target[b : b + 1], expected)


def test_self_npo_training_steps_lower_the_loss():
    model = tiny_cond_unet()
    trainer = SelfNPO(model, DDIMScheduler(clip_sample=False), num_ddim_steps=10, num_truncation_steps=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pairs = pair_batch(23)
    batch = {"latents": pairs["winner"], **{k: pairs[k] for k in ("conditioning", "negative_conditioning")}}
    teacher_weight, model_weight = trainer.teacher.conv_in.weight, model.conv_in.weight
    losses = []
    for _ in range(4):
        output = trainer.training_step(batch, seeded(24))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        expected_teacher = 0.999 * teacher_weight.detach() + 0.001 * model_weight.detach()
        trainer.update_teacher()
        torch.testing.assert_close(teacher_weight, expected_teacher)
        losses.append(output.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.equal(teacher_weight, model_weight)


def test_npo_guided_prediction_combines_the_two_models():
    model, npo_model = tiny_cond_unet(seed=1).eval(), tiny_cond_unet(seed=2).eval()
    batch = pair_batch(25)
    sample, timestep = batch["winner"], 500
    with torch.no_grad():
        guided = npo_guided_prediction(
            model, npo_model, sample, timestep, batch["conditioning"], batch["negative_conditioning"], 6.0
        )
        positive = model(sample, timestep, **batch["conditioning"]).sample
        negative = npo_model(sample, timestep, **batch["negative_conditioning"]).sample
    torch.testing.assert_close(guided, negative + 6.0 * (positive - negative))


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
def test_npo_sample_with_unit_guidance_is_plain_conditional_sampling(scheduler_class):
    model, npo_model = tiny_cond_unet(seed=1).eval(), tiny_cond_unet(seed=2).eval()
    batch = pair_batch(26)
    noise = batch["winner"]
    latents = npo_sample(
        model, npo_model, scheduler_class(), noise, 4, batch["conditioning"], batch["negative_conditioning"], 1.0
    )
    scheduler = scheduler_class()
    scheduler.set_timesteps(4)
    expected = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(expected, timestep)
            prediction = model(model_input, timestep, **batch["conditioning"]).sample
            expected = scheduler.step(prediction, timestep, expected).prev_sample
    torch.testing.assert_close(latents, expected)


# -------------------------------------------------------------------------------------------------------- errors


def test_bad_arguments_raise_before_any_state_changes():
    model, reference = tiny_unet(), tiny_unet()
    with pytest.raises(ValueError, match="beta"):
        DiffusionDPO(model, DDPMScheduler(), ref_model=reference, beta=0.0)
    assert all(p.requires_grad for p in reference.parameters())  # the reference was not frozen
    with pytest.raises(ValueError, match="beta"):
        DiffusionDPO(model, DDPMScheduler(), ref_model=reference, beta=float("nan"))
    with pytest.raises(ValueError, match="PEFT adapter disabled"):
        DiffusionDPO(model, DDPMScheduler())
    with pytest.raises(ValueError, match="is `model` itself"):
        DiffusionDPO(model, DDPMScheduler(), ref_model=model)
    with pytest.raises(ValueError, match="num_truncation_steps"):
        SelfNPO(model, DDIMScheduler(), num_truncation_steps=0)
    with pytest.raises(ValueError, match="num_ddim_steps"):
        SelfNPO(model, DDIMScheduler(), num_ddim_steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        SelfNPO(model, DDIMScheduler(), teacher=reference)
    with pytest.raises(ValueError, match="loss_type"):
        SelfNPO(model, DDIMScheduler(), loss_type="l1")
    with pytest.raises(ValueError, match="num_inversion_steps"):
        InversionDPO(model, DDIMScheduler(), ref_model=reference, num_inversion_steps=0)
    with pytest.raises(ValueError, match="num_loss_steps"):
        InversionDPO(model, DDIMScheduler(), ref_model=reference, num_inversion_steps=4, num_loss_steps=5)
    with pytest.raises(ValueError, match="num_steps"):
        ddim_invert(model, DDIMScheduler(), torch.zeros(1, 2, 8, 8), 0)


def test_mismatched_winner_and_loser_are_refused():
    model = tiny_unet()
    dpo = DiffusionDPO(model, DDPMScheduler(), ref_model=tiny_unet())
    inversion_dpo = InversionDPO(model, DDIMScheduler(), ref_model=tiny_unet(), num_inversion_steps=2)
    batch = {"winner": torch.zeros(2, 2, 8, 8), "loser": torch.zeros(2, 2, 4, 4)}
    for trainer in (dpo, inversion_dpo):
        with pytest.raises(ValueError, match=r"same shape, got \(2, 2, 8, 8\) and \(2, 2, 4, 4\)"):
            trainer.training_step(batch)
    with pytest.raises(KeyError, match="loser"):
        dpo.training_step({"winner": torch.zeros(2, 2, 8, 8)})
    with pytest.raises(ValueError, match="integer timesteps"):
        dpo.training_step({**pair_batch(0, conditioned=False), "timesteps": torch.tensor([0.5, 3.0])})
    guided = InversionDPO(model, DDIMScheduler(), ref_model=tiny_unet(), num_inversion_steps=2, guidance_scale=2.0)
    with pytest.raises(KeyError, match="negative_conditioning"):
        guided.training_step(pair_batch(0, conditioned=False))


def test_schedulers_without_the_needed_fields_are_refused():
    model, reference = tiny_unet(), tiny_unet()
    flow = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="alphas_cumprod"):
        InversionDPO(model, flow, ref_model=reference)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        SelfNPO(model, flow)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ddim_invert(model, flow, torch.zeros(1, 2, 8, 8), 2)
    with pytest.raises(ValueError, match="DDPM family"):
        DiffusionDPO(model, object(), ref_model=reference)
    with pytest.raises(ValueError, match="timestep_spacing"):
        InversionDPO(model, DDIMScheduler(timestep_spacing="linspace"), ref_model=reference)
    edited = DDIMScheduler()
    edited.alphas_cumprod = edited.alphas_cumprod.clone() * 0.5  # an in-place schedule change its config does not know
    with pytest.raises(ValueError, match="edited in place"):
        DiffusionDPO(model, edited, ref_model=reference)
    no_prediction_type = DDPMScheduler()
    no_prediction_type._internal_dict = {k: v for k, v in no_prediction_type.config.items() if k != "prediction_type"}
    with pytest.raises(ValueError, match="prediction_type"):
        SelfNPO(model, no_prediction_type)
