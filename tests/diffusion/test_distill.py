"""Step distillation (hf_eff.diffusion.distill): LCM consistency distillation and rectified-flow reflow."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from peft import LoraConfig, get_peft_model

from hf_eff.diffusion.distill import (
    ConsistencyDistiller,
    ReflowDistiller,
    SchedulerSampler,
    guidance_scale_embedding,
    sample_with_scheduler,
)
from hf_eff.diffusion.distill.functional import (
    boundary_condition_scalings,
    classifier_free_guidance,
    ddim_solver_schedule,
    ddim_solver_step,
    distillation_loss,
    ema_update_,
    flow_interpolation,
    flow_velocity_target,
    pseudo_huber_loss,
    split_prediction,
)

SHAPE = (4, 1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def tiny_conditional_unet(seed: int = 0, time_cond_proj_dim: int | None = 8) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train(distiller, parameters, batch, steps: int, lr: float) -> tuple[float, float]:
    """Loss on one fixed draw before and after `steps` Adam steps on that draw (EMA target updated each step)."""
    optimizer = torch.optim.Adam([p for p in parameters if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = distiller.training_step(batch, generator=seeded()).item()
    for _ in range(steps):
        distiller.training_step(batch, generator=seeded()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if hasattr(distiller, "update_target"):
            distiller.update_target()
    with torch.no_grad():
        after = distiller.training_step(batch, generator=seeded()).item()
    return before, after


# ---------------------------------------------------------------- pure math against hand values and diffusers


def test_boundary_condition_scalings_hand_values_and_lcm_scheduler():
    c_skip, c_out = boundary_condition_scalings(torch.tensor([0, 1, 20]), timestep_scaling=10.0)
    # s = 10·t; c_skip = 0.25 / (s² + 0.25), c_out = s / √(s² + 0.25)
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.25 / 100.25, 0.25 / 40000.25]), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        c_out, torch.tensor([0.0, 10 / math.sqrt(100.25), 200 / math.sqrt(40000.25)]), rtol=1e-6, atol=0
    )
    lcm = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 19, 999):
        ours = boundary_condition_scalings(torch.tensor([t]), timestep_scaling=10.0)
        theirs = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert ours[0].item() == pytest.approx(theirs[0], rel=1e-6)
        assert ours[1].item() == pytest.approx(theirs[1], rel=1e-6)


def test_split_prediction_hand_values():
    # ᾱ = 0.64: √ᾱ = 0.8, √(1 − ᾱ) = 0.6; x_t = 1, model output 0.5
    alpha_prod, sample, output = torch.tensor(0.64), torch.tensor(1.0), torch.tensor(0.5)
    expected = {"epsilon": (0.875, 0.5), "v_prediction": (0.5, 1.0), "sample": (0.5, 1.0)}
    for prediction_type, (x0, eps) in expected.items():
        pred_x0, pred_eps = split_prediction(output, sample, alpha_prod, prediction_type)
        assert pred_x0.item() == pytest.approx(x0, abs=1e-6)
        assert pred_eps.item() == pytest.approx(eps, abs=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        split_prediction(output, sample, alpha_prod, "flow")


def test_guidance_and_flow_and_losses_hand_values():
    # LCM: cond + w·(cond − uncond); a pipeline's guidance_scale s = w + 1 gives the same: 1 + 4·(2 − 1) = 5
    assert classifier_free_guidance(torch.tensor(2.0), torch.tensor(1.0), 3.0).item() == 5.0
    # x = 2, z = 6, σ = 0.25: x_σ = 0.75·2 + 0.25·6 = 3, v = z − x = 4, and z − 1·v = x
    sample, noise = torch.tensor([[2.0]]), torch.tensor([[6.0]])
    assert flow_interpolation(sample, noise, torch.tensor([0.25])).item() == 3.0
    assert flow_velocity_target(sample, noise).item() == 4.0
    assert (noise - flow_velocity_target(sample, noise)).item() == 2.0
    # pseudo-Huber, c = 3: differences 0 and 4 give 0 and √(16 + 9) − 3 = 2, mean 1; l2: (1 + 9) / 2 = 5
    assert pseudo_huber_loss(torch.tensor([0.0, 4.0]), torch.zeros(2), 3.0).item() == pytest.approx(1.0)
    assert distillation_loss(torch.tensor([0.0, 4.0]), torch.zeros(2), "huber", 3.0).item() == pytest.approx(1.0)
    assert distillation_loss(torch.tensor([1.0, 3.0]), torch.zeros(2), "l2", 3.0).item() == pytest.approx(5.0)
    # c = 0.001 (LCM): ≈ |d| for |d| ≫ c
    assert pseudo_huber_loss(torch.tensor([1.0]), torch.zeros(1), 0.001).item() == pytest.approx(
        math.sqrt(1 + 1e-6) - 0.001, rel=1e-6
    )
    with pytest.raises(ValueError, match="loss_type"):
        distillation_loss(torch.zeros(1), torch.zeros(1), "l1", 0.001)


def test_ema_update_hand_values():
    target, source = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update_(target, source, 0.75)  # 0.75·θ⁻ + 0.25·θ
    assert target[0].tolist() == [1.5, 3.0]


def test_solver_grid_is_lcm_and_trailing_ddim_grid():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps, alphas_prev = ddim_solver_schedule(scheduler.alphas_cumprod, 50)
    assert timesteps[:3].tolist() == [19, 39, 59] and timesteps[-1].item() == 999
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(50)
    assert ddim.timesteps.flip(0).tolist() == timesteps.tolist()
    lcm = LCMScheduler.from_config(scheduler.config, original_inference_steps=50)
    lcm.set_timesteps(50)
    assert lcm.timesteps.flip(0).tolist() == timesteps.tolist()
    assert alphas_prev[0] == scheduler.alphas_cumprod[0] and alphas_prev[1] == scheduler.alphas_cumprod[19]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_solver_step_equals_ddim_scheduler_step(prediction_type):
    alphas_cumprod = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    ddim = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        prediction_type=prediction_type,
    )
    ddim.set_timesteps(50)
    timesteps, alphas_prev = ddim_solver_schedule(alphas_cumprod, 50)
    generator = seeded(3)
    for index in (0, 1, 25, 49):  # t = 19 steps to timestep 0 (ᾱ₀, set_alpha_to_one=False)
        t = timesteps[index].item()
        sample, output = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
        expected = ddim.step(output, t, sample, eta=0.0).prev_sample
        pred_x0, pred_eps = split_prediction(output, sample, alphas_cumprod[t], prediction_type)
        torch.testing.assert_close(
            ddim_solver_step(pred_x0, pred_eps, alphas_prev[index]), expected, rtol=1e-5, atol=1e-5
        )


def test_guidance_embedding_equals_lcm_pipeline():
    w = torch.tensor([0.0, 1.5, 7.5])
    for dim in (8, 9):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_scale_embedding(w, dim), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- consistency distillation


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_loss_equals_diffusers_reference(prediction_type):
    """Guided teacher, w embedding, EMA target ≠ student: the loss equals one built from diffusers' own pieces
    (DDIMScheduler.step for the solver, LCMScheduler.step's `denoised` for f), sample by sample."""
    noise_scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    teacher = tiny_conditional_unet(seed=0, time_cond_proj_dim=None).eval()
    student = tiny_conditional_unet(seed=1).eval()
    distiller = ConsistencyDistiller(teacher, student, noise_scheduler, w_min=1.0, w_max=4.0, ema_decay=0.5)
    assert distiller.guidance_embedding_dim == 8  # read from the student's time_cond_proj_dim
    latents, condition = torch.randn(SHAPE, generator=seeded(1)), torch.randn(4, 3, 8, generator=seeded(2))
    uncond = torch.randn(1, 3, 8, generator=seeded(3))
    batch = {"latents": latents, "condition": condition, "uncond_condition": uncond}
    train(distiller, student.parameters(), batch, steps=1, lr=1e-2)  # moves the student away from its EMA target

    generator = seeded(7)
    index = torch.randint(0, 50, (4,), generator=generator)  # the distiller's draws, in its documented order
    noise = torch.randn(SHAPE, generator=generator)
    w = 1.0 + 3.0 * torch.rand(4, generator=generator)
    start = index * 20 + 19
    end = (start - 20).clamp_min(0)
    noisy = noise_scheduler.add_noise(latents, noise, start)
    embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=8)
    target_network = copy.deepcopy(student)
    target_network.load_state_dict(distiller.state_dict()["target_parameters"], strict=False)

    def consistency_function(model_output, t, sample):
        lcm = LCMScheduler.from_config(noise_scheduler.config, prediction_type=prediction_type)
        lcm.set_timesteps(timesteps=[int(t)])
        return lcm.step(model_output, int(t), sample).denoised

    expected = []
    with torch.no_grad():
        for i in range(4):
            x, s, e = noisy[i : i + 1], start[i : i + 1], end[i : i + 1]
            kwargs = {"encoder_hidden_states": condition[i : i + 1], "timestep_cond": embedding[i : i + 1]}
            prediction = consistency_function(student(x, s, **kwargs).sample, s, x)
            cond_out = teacher(x, s, encoder_hidden_states=condition[i : i + 1]).sample
            uncond_out = teacher(x, s, encoder_hidden_states=uncond).sample
            guided = uncond_out + (1 + w[i]) * (cond_out - uncond_out)  # pipeline convention, scale 1 + w
            ddim = DDIMScheduler.from_config(
                noise_scheduler.config, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
            )
            ddim.set_timesteps(50)
            solver_sample = ddim.step(guided, int(s), x).prev_sample
            target = consistency_function(target_network(solver_sample, e, **kwargs).sample, e, solver_sample)
            expected.append(torch.sqrt((prediction - target) ** 2 + 0.001**2) - 0.001)
        loss = distiller.training_step(batch, generator=seeded(7))
    torch.testing.assert_close(loss, torch.cat(expected).mean(), rtol=1e-4, atol=1e-6)


def test_consistency_training_lowers_loss_unconditional_unet():
    teacher = tiny_unet(seed=0).eval()
    student = copy.deepcopy(teacher)
    distiller = ConsistencyDistiller(teacher, student, DDPMScheduler(), loss_type="l2")
    latents = torch.randn(8, 1, 8, 8, generator=seeded(1))
    before, after = train(distiller, student.parameters(), latents, steps=10, lr=3e-4)
    assert after < 0.7 * before, (before, after)
    assert distiller.num_target_updates == 10


def test_consistency_training_lowers_loss_conditional_unet_with_guidance():
    teacher = tiny_conditional_unet(seed=0, time_cond_proj_dim=None).eval()
    student = tiny_conditional_unet(seed=0)  # the teacher's weights plus the w-embedding projection
    student.load_state_dict(teacher.state_dict(), strict=False)
    distiller = ConsistencyDistiller(teacher, student, DDPMScheduler(), w_min=2.0, w_max=6.0)
    batch = {
        "latents": torch.randn(SHAPE, generator=seeded(1)),
        "condition": torch.randn(4, 3, 8, generator=seeded(2)),
        "uncond_condition": torch.zeros(1, 3, 8),
    }
    before, after = train(distiller, student.parameters(), batch, steps=10, lr=3e-4)
    assert after < 0.7 * before, (before, after)


def test_guidance_weight_zero_is_the_unguided_teacher():
    teacher, student = tiny_conditional_unet(0, None).eval(), tiny_conditional_unet(1, None).eval()
    latents, condition = torch.randn(SHAPE, generator=seeded(1)), torch.randn(4, 3, 8, generator=seeded(2))
    guided = ConsistencyDistiller(teacher, student, DDPMScheduler(), w_min=0.0, w_max=0.0)
    plain = ConsistencyDistiller(teacher, student, DDPMScheduler())
    with torch.no_grad():
        loss_guided = guided.training_step(
            {"latents": latents, "condition": condition, "uncond_condition": torch.randn(1, 3, 8)}, generator=seeded()
        )
        loss_plain = plain.training_step({"latents": latents, "condition": condition}, generator=seeded())
    torch.testing.assert_close(loss_guided, loss_plain, rtol=1e-6, atol=0)


def test_lora_student_trains_with_base_model_as_teacher():
    base = tiny_unet(seed=0).eval()
    student = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=["conv1", "conv2"]))
    frozen = {name: param.clone() for name, param in student.named_parameters() if not param.requires_grad}
    distiller = ConsistencyDistiller(None, student, DDPMScheduler())  # teacher = student with adapters off
    assert distiller.target_parameters and all("lora_" in name for name in distiller.target_parameters)
    latents = torch.randn(8, 1, 8, 8, generator=seeded(1))
    before, after = train(distiller, student.parameters(), latents, steps=10, lr=3e-3)
    assert after < 0.7 * before, (before, after)
    assert all(torch.equal(param, frozen[name]) for name, param in student.named_parameters() if name in frozen)
    # the adapters moved, and the in-place teacher is exactly the frozen base model
    separate = ConsistencyDistiller(base, student, DDPMScheduler())
    separate.load_state_dict(distiller.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            distiller.training_step(latents, generator=seeded(5)),
            separate.training_step(latents, generator=seeded(5)),
            rtol=1e-6,
            atol=0,
        )


def test_ema_target_update_is_exact_and_state_round_trips(tmp_path):
    student = tiny_unet(seed=1)
    distiller = ConsistencyDistiller(tiny_unet(seed=0), student, DDPMScheduler(), ema_decay=0.95)
    old = {name: tensor.clone() for name, tensor in distiller.target_parameters.items()}
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn(param.shape, generator=seeded(4)))
    distiller.update_target()
    new = dict(student.named_parameters())
    for name, tensor in distiller.target_parameters.items():
        torch.testing.assert_close(tensor, 0.95 * old[name] + 0.05 * new[name].detach(), rtol=1e-6, atol=1e-7)

    torch.save(distiller.state_dict(), tmp_path / "target.pt")
    restored = ConsistencyDistiller(tiny_unet(seed=0), tiny_unet(seed=1), DDPMScheduler())
    restored.load_state_dict(torch.load(tmp_path / "target.pt", weights_only=True))
    assert restored.num_target_updates == 1
    assert all(torch.equal(restored.target_parameters[n], t) for n, t in distiller.target_parameters.items())
    distiller.copy_target_to_student()
    assert all(torch.equal(param, distiller.target_parameters[name]) for name, param in student.named_parameters())

    other = ConsistencyDistiller(
        None, get_peft_model(tiny_unet(), LoraConfig(target_modules=["conv1"])), DDPMScheduler()
    )
    before = {name: tensor.clone() for name, tensor in other.target_parameters.items()}
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(distiller.state_dict())
    assert all(torch.equal(before[n], t) for n, t in other.target_parameters.items())


def test_lcm_scheduler_samples_the_student_in_one_to_four_steps():
    student = tiny_unet(seed=1).eval()
    distiller = ConsistencyDistiller(tiny_unet(seed=0), student, DDPMScheduler(), num_ddim_timesteps=50)
    scheduler = distiller.make_scheduler()
    assert scheduler.config.original_inference_steps == 50 and scheduler.config.timestep_scaling == 10.0
    torch.testing.assert_close(scheduler.alphas_cumprod, DDPMScheduler().alphas_cumprod, rtol=0, atol=0)
    grid = set(ddim_solver_schedule(DDPMScheduler().alphas_cumprod, 50)[0].tolist())
    noise = torch.randn(SHAPE, generator=seeded(2))
    for steps in (1, 2, 3, 4):
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= grid
        samples = distiller.sample(noise, steps, generator=seeded(3))
        assert samples.shape == SHAPE and torch.isfinite(samples).all()
    # one step: f(z, 999) = c_skip·z + c_out·x̂₀(z)
    with torch.no_grad():
        t = torch.full((4,), 999)
        pred_x0, _ = split_prediction(student(noise, t).sample, noise, DDPMScheduler().alphas_cumprod[999], "epsilon")
        c_skip, c_out = boundary_condition_scalings(t)
        expected = c_skip[0] * noise + c_out[0] * pred_x0
    torch.testing.assert_close(distiller.sample(noise, 1), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- reflow


def test_scheduler_sampler_equals_ddim_pipeline():
    teacher = tiny_unet(seed=0).eval()
    scheduler = DDIMScheduler()
    noise = torch.randn(SHAPE, generator=seeded(4))
    ours = SchedulerSampler(teacher, scheduler, 10)(noise)
    images = DDIMPipeline(unet=teacher, scheduler=DDIMScheduler())(
        batch_size=4, generator=seeded(4), num_inference_steps=10, eta=0.0, output_type="np"
    ).images
    torch.testing.assert_close(
        (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(images), rtol=1e-5, atol=1e-5
    )


def test_reflow_pairs_loss_and_one_step_sampling():
    teacher = tiny_unet(seed=0).eval()
    student = tiny_unet(seed=1)
    distiller = ReflowDistiller(
        student, teacher_sampler=SchedulerSampler(teacher, DDIMScheduler(), 5), sigma_sampling="one_step"
    )
    noise = torch.randn(SHAPE, generator=seeded(1))
    pairs = distiller.make_pairs(noise)
    torch.testing.assert_close(
        pairs["sample"], sample_with_scheduler(teacher, DDIMScheduler(), noise, 5), rtol=0, atol=0
    )  # deterministic coupling
    with torch.no_grad():
        velocity = student(noise, torch.full((4,), 1000.0)).sample
        # σ = 1: the student sees the noise at timestep 1000 and regresses z − x
        torch.testing.assert_close(
            distiller.training_step(pairs), F.mse_loss(velocity, noise - pairs["sample"]), rtol=1e-6, atol=0
        )
        # on-the-fly pairs give the same loss
        torch.testing.assert_close(
            distiller.training_step({"noise": noise}), distiller.training_step(pairs), rtol=1e-6, atol=0
        )
    # FlowMatchEulerDiscreteScheduler, one step: z + (0 − 1)·v(z, 1000)
    torch.testing.assert_close(distiller.sample(noise, 1), noise - velocity, rtol=1e-6, atol=1e-6)
    assert isinstance(distiller.make_scheduler(), FlowMatchEulerDiscreteScheduler)
    for steps in (2, 4):
        assert distiller.sample(noise, steps).shape == SHAPE


def test_reflow_training_lowers_loss():
    teacher = tiny_unet(seed=0).eval()
    student = copy.deepcopy(teacher)
    distiller = ReflowDistiller(student, teacher_sampler=SchedulerSampler(teacher, DDIMScheduler(), 5))
    pairs = distiller.make_pairs(torch.randn(8, 1, 8, 8, generator=seeded(1)))
    before, after = train(distiller, student.parameters(), pairs, steps=10, lr=3e-3)
    assert after < 0.7 * before, (before, after)


def frames_as_images(model, sample, timestep, model_kwargs):
    """A forward_fn for video latents (B, C, F, H, W) with an image UNet: frames folded into the batch."""
    batch, channels, frames, height, width = sample.shape
    images = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    output = model(images, timestep=timestep.repeat_interleave(frames), **model_kwargs).sample
    return output.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


def test_video_latents_through_a_custom_forward_fn():
    video = torch.randn(2, 1, 3, 8, 8, generator=seeded(1))
    teacher, student = tiny_unet(0).eval(), tiny_unet(1)
    consistency = ConsistencyDistiller(teacher, student, DDPMScheduler(), forward_fn=frames_as_images)
    loss = consistency.training_step(video, generator=seeded())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters())
    assert consistency.sample(torch.randn(video.shape), 2).shape == video.shape
    reflow = ReflowDistiller(student, forward_fn=frames_as_images)
    noise = torch.randn(video.shape, generator=seeded(2))
    assert torch.isfinite(reflow.training_step({"noise": noise, "sample": video}, generator=seeded()))
    assert reflow.sample(noise, 2).shape == video.shape


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "l1"}, "loss_type"),
        ({"w_min": 3.0, "w_max": 1.0}, "w_min"),
        ({"w_min": -1.0, "w_max": 1.0}, "w_min"),
        ({"w_min": 1.0}, "w_min"),
        ({"num_ddim_timesteps": 0}, "num_ddim_timesteps"),
        ({"num_ddim_timesteps": 1001}, "num_ddim_timesteps"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"huber_c": 0.0}, "huber_c"),
        ({"student_prediction_type": "flow"}, "student_prediction_type"),
        ({"guidance_embedding_dim": 8}, "guidance_embedding_dim"),
        ({"forward_fn": "unet"}, "forward_fn"),
    ],
)
def test_consistency_distiller_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyDistiller(tiny_unet(0), tiny_unet(1), DDPMScheduler(), **kwargs)


def test_consistency_distiller_rejects_bad_models_and_schedulers():
    with pytest.raises(ValueError, match="noise_scheduler"):
        ConsistencyDistiller(tiny_unet(0), tiny_unet(1), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        ConsistencyDistiller(tiny_unet(0), tiny_unet(1), DDPMScheduler(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyDistiller(None, tiny_unet(1), DDPMScheduler())
    with pytest.raises(ValueError, match="trainable"):
        ConsistencyDistiller(tiny_unet(0), tiny_unet(1).requires_grad_(False), DDPMScheduler())


def test_consistency_training_step_rejects_bad_batches():
    unguided = ConsistencyDistiller(tiny_unet(0), tiny_unet(1), DDPMScheduler())
    latents = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="'latents'"):
        unguided.training_step({"latent": latents})
    with pytest.raises(ValueError, match="floating-point"):
        unguided.training_step(torch.zeros(SHAPE, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        unguided.training_step(torch.randn(4))
    with pytest.raises(TypeError, match="batch"):
        unguided.training_step([latents])
    with pytest.raises(ValueError, match="guidance is off"):
        unguided.training_step({"latents": latents, "uncond_condition": torch.zeros(1, 3, 8)})
    two_channels = ConsistencyDistiller(
        tiny_unet(0),
        tiny_unet(1),
        DDPMScheduler(),
        forward_fn=lambda model, x, t, kwargs: model(x, t).sample.repeat(1, 2, 1, 1),
    )
    with pytest.raises(ValueError, match="latents' shape"):
        two_channels.training_step(latents)
    guided = ConsistencyDistiller(
        tiny_conditional_unet(0, None), tiny_conditional_unet(1, None), DDPMScheduler(), w_min=1.0, w_max=2.0
    )
    with pytest.raises(ValueError, match="uncond_condition"):
        guided.training_step({"latents": latents, "condition": torch.randn(4, 3, 8)})
    with pytest.raises(ValueError, match="batch size 4"):
        guided.training_step(
            {"latents": latents, "condition": torch.randn(3, 3, 8), "uncond_condition": torch.zeros(1, 3, 8)}
        )


def test_reflow_distiller_rejects_bad_input():
    with pytest.raises(ValueError, match="sigma_sampling"):
        ReflowDistiller(tiny_unet(1), sigma_sampling="logit_normal")
    with pytest.raises(ValueError, match="loss_type"):
        ReflowDistiller(tiny_unet(1), loss_type="lpips")
    with pytest.raises(ValueError, match="teacher_sampler"):
        ReflowDistiller(tiny_unet(1), teacher_sampler="ddim")
    distiller = ReflowDistiller(tiny_unet(1))
    noise = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="'noise'"):
        distiller.training_step({"sample": noise})
    with pytest.raises(ValueError, match="noise's shape"):
        distiller.training_step({"noise": noise, "sample": torch.randn(4, 1, 4, 4)})
    with pytest.raises(ValueError, match="no `teacher_sampler`"):
        distiller.training_step({"noise": noise})
    shrinking = ReflowDistiller(tiny_unet(1), teacher_sampler=lambda z: z[:2])
    with pytest.raises(ValueError, match="noise's shape"):
        shrinking.make_pairs(noise)
