"""Immiscible Diffusion and step distillation on real data: a tiny diffusers UNet trained from scratch on MNIST on CPU,
scored by the Fréchet distance in the feature space of a small MNIST classifier.

(a) DDPM training with plain noise vs immiscible noise (linear assignment and KNN, "Immiscible Diffusion", Li et al.
2024; "Improved Immiscible Diffusion", Li et al. 2025): steps to reach the plain run's final quality, and the share of
the training step spent assigning noise. (b) The plain run as teacher, distilled into few-step students (latent
consistency distillation, Luo et al. 2023; rectified-flow one-step distillation, Liu et al. 2022), against the
teacher at 50 DDIM steps.

    .venv/bin/python benchmarks/diffusion.py [--part a|b|all] [--steps 1200] [--threads 1] [--seed 0] [--markdown]
    .venv/bin/python benchmarks/diffusion.py --quick        # smoke run, under 2 minutes
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from scipy.linalg import eigh
from tables import cpu_name, render
from torch import nn

import hf_eff
from hf_eff import assets
from hf_eff.diffusion import immiscible_noise
from hf_eff.diffusion.distill import ConsistencyDistiller, ReflowDistiller, SchedulerSampler, sample_with_scheduler

BENCHMARKS_DIR = Path(__file__).resolve().parent
NOISE_METHODS = ("plain", "linear", "knn")
SPEED_GOAL = 0.6  # steps to the plain run's final FD, as a fraction of the plain run's
OVERHEAD_GOAL = 0.05  # noise assignment time / training step time


@dataclasses.dataclass(frozen=True)
class Settings:
    size: int  # image side: MNIST 28×28 average-pooled to 14×14 and padded to 16 (or padded to 32)
    channels: tuple[int, ...]  # UNet2DModel block_out_channels
    batch: int
    steps: int
    eval_every: int
    eval_samples: int
    eval_ddim_steps: int
    teacher_ddim_steps: int  # the teacher's reference sampler in (b), also used to make the flow student's pairs
    lr: float
    warmup: int
    ema_decay: float  # the evaluated (and distilled) weights are an EMA of the trained ones
    knn_k: int
    classifier_steps: int
    train_limit: int | None  # MNIST training digits used (None: all 60k)
    lcm_steps: int
    lcm_lr: float
    reflow_pairs: int
    reflow_steps: int
    reflow_lr: float


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            size=16, channels=(16, 32, 32), batch=64, steps=args.steps or 16, eval_every=8, eval_samples=64,
            eval_ddim_steps=10, teacher_ddim_steps=10, lr=1e-3, warmup=5, ema_decay=0.9, knn_k=8, classifier_steps=60,
            train_limit=4096, lcm_steps=4, lcm_lr=1e-4, reflow_pairs=64, reflow_steps=4, reflow_lr=1e-4,
        )  # fmt: skip
    steps = args.steps or 1200
    return Settings(
        size=args.size, channels=(16, 32, 64), batch=128, steps=steps, eval_every=max(1, steps // 6),
        eval_samples=512, eval_ddim_steps=50, teacher_ddim_steps=50, lr=1e-3, warmup=100, ema_decay=0.99, knn_k=8,
        classifier_steps=800, train_limit=None, lcm_steps=500, lcm_lr=1e-4, reflow_pairs=1024, reflow_steps=400,
        reflow_lr=2e-4,
    )  # fmt: skip


# --- data -----------------------------------------------------------------------------------------------------------


def mnist_images(split: str, size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as ``[N, 1, size, size]`` in [-1, 1] (background -1) and labels."""
    images, labels = assets.mnist(split, limit)
    images = F.pad(images, (2, 2, 2, 2))  # 28 → 32, background 0
    if size == 16:
        images = F.avg_pool2d(images, 2)
    return images * 2 - 1, labels


def batches(images: torch.Tensor, batch: int, generator: torch.Generator):
    """Endless shuffled mini-batches, reshuffled each epoch; the same generator seed gives every run the same order."""
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            yield images[order[start : start + batch]]


# --- quality proxy: Fréchet distance in a small classifier's feature space ---------------------------------------


class DigitClassifier(nn.Module):
    """Two conv layers and a 128-wide hidden layer; the hidden layer's activations are the FD features."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def benchmark_cache() -> Path:
    path = assets.cache_dir() / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def trained_classifier(settings: Settings, seed: int, train: torch.Tensor, labels: torch.Tensor) -> DigitClassifier:
    """The feature network, trained once per (size, steps, seed, data) and cached beside hf_eff's assets."""
    name = f"mnist_cnn_{settings.size}px_{settings.classifier_steps}steps_{len(train)}digits_seed{seed}.pt"
    path = benchmark_cache() / name
    classifier = DigitClassifier()
    if path.exists():
        classifier.load_state_dict(torch.load(path, weights_only=True))
        return classifier.eval()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.classifier_steps):
        index = torch.randint(0, len(train), (128,), generator=generator)
        loss = F.cross_entropy(classifier(train[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(classifier.state_dict(), path)
    return classifier.eval()


@torch.no_grad()
def classifier_features(classifier: DigitClassifier, images: torch.Tensor) -> np.ndarray:
    parts = [classifier.features(chunk.clamp(-1, 1)) for chunk in images.split(1024)]
    return torch.cat(parts).double().numpy()


@torch.no_grad()
def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([classifier(chunk).argmax(1) for chunk in images.split(1024)])
    return (predictions == labels).float().mean().item()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½, by symmetric eigendecompositions.

    tr (Σa Σb)^½ equals the sum of the square roots of the eigenvalues of the symmetric PSD matrix Σa^½ Σb Σa^½;
    computing it with `eigh` avoids the complex round-off that `sqrtm` of the non-symmetric product Σa Σb produces.
    """
    (mean_a, cov_a), (mean_b, cov_b) = stats_a, stats_b
    values, vectors = eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = eigh(root_a @ cov_b @ root_a, eigvals_only=True)
    trace_root = np.sqrt(cross.clip(min=0)).sum()
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def bootstrap_std(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray], seed: int, rounds: int = 20) -> float:
    """Spread of the FD over resamples of the generated features: the noise of a single evaluation."""
    rng = np.random.default_rng(seed)
    values = [
        frechet_distance(gaussian_stats(features[rng.integers(0, len(features), len(features))]), reference)
        for _ in range(rounds)
    ]
    return float(np.std(values))


@dataclasses.dataclass
class Judge:
    """Scores generated digits against the real test digits."""

    classifier: DigitClassifier
    reference: tuple[np.ndarray, np.ndarray]
    seed: int

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(gaussian_stats(classifier_features(self.classifier, images)), self.reference)

    def fd_with_noise(self, images: torch.Tensor) -> tuple[float, float]:
        features = classifier_features(self.classifier, images)
        return frechet_distance(gaussian_stats(features), self.reference), bootstrap_std(
            features, self.reference, self.seed
        )


# --- models and sampling ------------------------------------------------------------------------------------------


def tiny_unet(settings: Settings, seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    blocks = len(settings.channels)
    return UNet2DModel(
        sample_size=settings.size,
        in_channels=1,
        out_channels=1,
        block_out_channels=settings.channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * blocks,
        up_block_types=("UpBlock2D",) * blocks,
        norm_num_groups=8,
    )


def ddim_for(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    # Trailing spacing starts the chain at t = 999, so that 1–4-step DDIM baselines begin from pure noise.
    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing")


@torch.no_grad()
def ddim_samples(model: nn.Module, noise_scheduler: DDPMScheduler, noise: torch.Tensor, steps: int) -> torch.Tensor:
    model.eval()
    samples = torch.cat(
        [sample_with_scheduler(model, ddim_for(noise_scheduler), chunk, steps) for chunk in noise.split(512)]
    )
    model.train()
    return samples.clamp(-1, 1)


# --- (a) DDPM training with plain and immiscible noise ------------------------------------------------------------


@dataclasses.dataclass
class Run:
    method: str
    checkpoints: list[tuple[int, float]]  # (step, FD)
    final_std: float  # bootstrap spread of the final FD
    step_seconds: float  # mean over the run
    noise_seconds: float  # mean time of drawing (and assigning) the noise
    loss: float  # mean training loss over the last tenth of the run
    samples: torch.Tensor  # final checkpoint's samples
    model: UNet2DModel  # with the final EMA weights


def draw_noise(method: str, x0: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    if method == "plain":
        return torch.randn(x0.shape, generator=generator)
    return immiscible_noise(x0, method=method, k=k, generator=generator)


def train_ddpm(
    method: str, settings: Settings, seed: int, train: torch.Tensor, judge: Judge, eval_noise: torch.Tensor
) -> Run:
    """One DDPM run (ε-prediction, 1000 steps); everything but the noise is the same across methods: init, data
    order, timesteps, and, for the linear assignment, even the drawn noise (it only permutes it)."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = tiny_unet(settings, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup))
    ema = EMAModel(model.parameters(), decay=settings.ema_decay)
    data = batches(train, settings.batch, torch.Generator().manual_seed(seed))
    timestep_generator = torch.Generator().manual_seed(seed + 1)
    noise_generator = torch.Generator().manual_seed(seed + 2)
    checkpoints, losses = [], []
    step_seconds = noise_seconds = 0.0
    final_std, samples = math.nan, None
    for step in range(1, settings.steps + 1):
        start = time.perf_counter()
        x0 = next(data)
        timesteps = torch.randint(0, 1000, (len(x0),), generator=timestep_generator)
        noise_start = time.perf_counter()
        noise = draw_noise(method, x0, settings.knn_k, noise_generator)
        noise_seconds += time.perf_counter() - noise_start
        prediction = model(noise_scheduler.add_noise(x0, noise, timesteps), timesteps).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(model.parameters())
        step_seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % settings.eval_every == 0 or step == settings.steps:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            samples = ddim_samples(model, noise_scheduler, eval_noise, settings.eval_ddim_steps)
            ema.restore(model.parameters())
            if step == settings.steps:
                fd, final_std = judge.fd_with_noise(samples)
            else:
                fd = judge.fd(samples)
            checkpoints.append((step, fd))
            print(f"  {method:>6} step {step:>5}: FD {fd:7.2f}, loss {np.mean(losses[-50:]):.4f}", flush=True)
    tail = max(1, settings.steps // 10)
    ema.copy_to(model.parameters())
    return Run(
        method=method,
        checkpoints=checkpoints,
        final_std=final_std,
        step_seconds=step_seconds / settings.steps,
        noise_seconds=noise_seconds / settings.steps,
        loss=float(np.mean(losses[-tail:])),
        samples=samples,
        model=model,
    )


def steps_to_reach(checkpoints: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the FD curve reaches `target`, interpolated linearly between checkpoints (None: never)."""
    previous = None
    for step, fd in checkpoints:
        if fd <= target:
            if previous is None:
                return float(step)
            (step_before, fd_before) = previous
            return step_before + (step - step_before) * (fd_before - target) / (fd_before - fd)
        previous = (step, fd)
    return None


def part_a(settings: Settings, args: argparse.Namespace, context: dict) -> tuple[str, dict[str, Run]]:
    runs = {}
    for method in NOISE_METHODS:
        run_start = time.perf_counter()
        runs[method] = train_ddpm(method, settings, args.seed, context["train"], context["judge"], context["noise"])
        print(f"  ({method}: {time.perf_counter() - run_start:.0f} s)", flush=True)
    plain = runs["plain"]
    target = plain.checkpoints[-1][1]
    plain_reach = steps_to_reach(plain.checkpoints, target)
    rows = []
    for method, run in runs.items():
        reach = steps_to_reach(run.checkpoints, target)
        reach_text = f"{reach:.0f}" if reach is not None else f"> {settings.steps}"
        ratio = f"{reach / plain_reach:.2f}×" if reach is not None else f"> {settings.steps / plain_reach:.2f}×"
        extra = (run.noise_seconds - plain.noise_seconds) / run.step_seconds
        rows.append(
            [
                method
                if method == "plain"
                else f"immiscible {method}" + (f" (k={settings.knn_k})" * (method == "knn")),
                " → ".join(f"{fd:.1f}" for _, fd in run.checkpoints),
                f"{run.checkpoints[-1][1]:.2f} ± {run.final_std:.2f}",
                reach_text,
                ratio,
                f"{run.loss:.4f}",
                f"{1e3 * run.step_seconds:.0f}",
                f"{1e3 * run.noise_seconds:.2f}",
                f"{100 * run.noise_seconds / run.step_seconds:.2f} %",
                "—" if method == "plain" else f"{100 * extra:+.2f} %",
            ]
        )
    speed_ok = [
        (reach := steps_to_reach(run.checkpoints, target)) is not None and reach / plain_reach <= SPEED_GOAL
        for method, run in runs.items()
        if method != "plain"
    ]
    overhead_ok = [run.noise_seconds / run.step_seconds <= OVERHEAD_GOAL for run in runs.values()]
    checkpoints = ", ".join(str(step) for step, _ in plain.checkpoints)
    headers = [
        "noise", f"FD at steps {checkpoints}", "final FD ± boot. std", "steps to plain's final FD", "vs plain",
        "final loss", "step ms", "noise ms", "noise / step", "extra vs randn",
    ]  # fmt: skip
    notes = context["notes"] + [
        f"training: DDPMScheduler (1000 steps, linear betas), ε-prediction MSE, batch {settings.batch}, "
        f"{settings.steps} steps, AdamW lr {settings.lr:g} ({settings.warmup}-step warm-up, then constant), "
        f"grad-norm clip 1; sampled with an EMA of the weights (decay {settings.ema_decay:g}, diffusers' EMAModel, "
        "also the teacher of part b); same init, data order and timesteps for every run (separate generators); the "
        "linear assignment permutes exactly the noise the plain run draws",
        f"FD: every {settings.eval_every} steps, {settings.eval_samples} samples by DDIM ({settings.eval_ddim_steps} "
        "steps, trailing spacing, η = 0) from the same fixed noise for all runs and checkpoints; ± = std of 20 "
        "bootstrap resamples of the final samples' features (evaluation noise only, not seed-to-seed variation)",
        "steps to plain's final FD: first crossing of the curve below the plain run's final FD, linear "
        f"interpolation between checkpoints (the plain run's own value can be < {settings.steps} if its curve is "
        f"not monotone); vs plain: that step count over the plain run's (goal ≤ {SPEED_GOAL}×: "
        f"{'met' if all(speed_ok) else 'not met'} — linear {'met' if speed_ok[0] else 'not met'}, knn "
        f"{'met' if speed_ok[1] else 'not met'})",
        "step ms: wall time of a full training step (batch, noise, forward, backward, clip, AdamW, EMA), mean over the "
        "run; noise ms: drawing the noise (plain: torch.randn; linear: randn + B×B cost matmul + scipy "
        "linear_sum_assignment; knn: k× randn + distances); extra vs randn: (noise ms − plain's noise ms) / "
        f"step ms (goal noise / step ≤ {100 * OVERHEAD_GOAL:.0f} %: {'met' if all(overhead_ok) else 'not met'})",
        "one seed and a short run on a tiny model: differences within ~2 bootstrap std are noise",
    ]
    table = render(
        f"Immiscible Diffusion on MNIST {settings.size}×{settings.size} (DDPM, tiny UNet, CPU)",
        headers,
        rows,
        notes,
        args.markdown,
    )
    return table, runs


# --- (b) distillation of the plain run into few-step students ----------------------------------------------------


def teacher_cache_path(settings: Settings, seed: int) -> Path:
    """Where part (a)'s plain run leaves its weights for a later `--part b`, keyed by everything that shapes them."""
    recipe = (settings.size, settings.channels, settings.batch, settings.steps, settings.lr, settings.warmup)
    key = zlib.crc32(repr((*recipe, settings.ema_decay, settings.train_limit, seed)).encode())
    return benchmark_cache() / f"ddpm_plain_{settings.size}px_{settings.steps}steps_seed{seed}_{key:08x}.pt"


def plain_teacher(settings: Settings, args: argparse.Namespace, context: dict, runs: dict[str, Run] | None):
    path = teacher_cache_path(settings, args.seed)
    if runs is not None:
        torch.save(runs["plain"].model.state_dict(), path)
        return runs["plain"].model
    model = tiny_unet(settings, args.seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"  teacher: the plain run's weights from {path}", flush=True)
        return model
    print("  teacher: training the plain run (no cached weights for these settings)", flush=True)
    run = train_ddpm("plain", settings, args.seed, context["train"], context["judge"], context["noise"])
    torch.save(run.model.state_dict(), path)
    return run.model


def distill_lcm(teacher: UNet2DModel, settings: Settings, seed: int, train: torch.Tensor) -> ConsistencyDistiller:
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    student = copy.deepcopy(teacher).train()
    teacher.eval().requires_grad_(False)
    distiller = ConsistencyDistiller(teacher, student, noise_scheduler, num_ddim_timesteps=50)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lcm_lr, weight_decay=0.0)
    data = batches(train, settings.batch, torch.Generator().manual_seed(seed + 3))
    generator = torch.Generator().manual_seed(seed + 4)
    losses = []
    for step in range(1, settings.lcm_steps + 1):
        loss = distiller.training_step(next(data), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        distiller.update_target()
        losses.append(loss.item())
        if step % max(1, settings.lcm_steps // 5) == 0:
            print(f"  lcm step {step:>5}: loss {np.mean(losses[-50:]):.5f}", flush=True)
    distiller.copy_target_to_student()  # LCM ships the EMA target network
    student.eval()
    return distiller


def distill_reflow(teacher: UNet2DModel, settings: Settings, seed: int) -> tuple[ReflowDistiller, float]:
    """One-step distillation on the deterministic coupling (noise, the teacher's DDIM sample of it)."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    teacher.eval().requires_grad_(False)
    sampler = SchedulerSampler(teacher, ddim_for(noise_scheduler), settings.teacher_ddim_steps)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    distiller = ReflowDistiller(student, teacher_sampler=sampler, sigma_sampling="one_step")
    pair_start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed + 5)
    noise = torch.randn((settings.reflow_pairs, 1, settings.size, settings.size), generator=generator)
    pairs = [distiller.make_pairs(chunk) for chunk in noise.split(512)]
    pair_noise = torch.cat([pair["noise"] for pair in pairs])
    pair_samples = torch.cat([pair["sample"] for pair in pairs]).clamp(-1, 1)
    pair_seconds = time.perf_counter() - pair_start
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.reflow_lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed + 6)
    losses = []
    for step in range(1, settings.reflow_steps + 1):
        index = torch.randint(0, len(pair_noise), (settings.batch,), generator=order)
        loss = distiller.training_step({"noise": pair_noise[index], "sample": pair_samples[index]})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, settings.reflow_steps // 5) == 0:
            print(f"  reflow step {step:>5}: loss {np.mean(losses[-50:]):.5f}", flush=True)
    student.eval()
    return distiller, pair_seconds


def part_b(settings: Settings, args: argparse.Namespace, context: dict, runs: dict[str, Run] | None):
    judge, eval_noise = context["judge"], context["noise"]
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    teacher = plain_teacher(settings, args, context, runs)
    grids, rows = {}, []

    def add_row(name: str, steps: int, samples: torch.Tensor, seconds: float, teacher_fd: float | None) -> float:
        fd, std = judge.fd_with_noise(samples)
        versus = "—" if teacher_fd is None else f"{fd / teacher_fd:.2f}×"
        rows.append([name, str(steps), f"{fd:.2f} ± {std:.2f}", versus, f"{1e3 * seconds / len(samples):.2f}"])
        return fd

    def timed(function):
        start = time.perf_counter()
        result = function()
        return result, time.perf_counter() - start

    reference_steps = settings.teacher_ddim_steps
    samples, seconds = timed(lambda: ddim_samples(teacher, noise_scheduler, eval_noise, reference_steps))
    teacher_fd = add_row("teacher, DDIM", reference_steps, samples, seconds, None)
    grids[f"teacher DDIM {reference_steps} steps"] = samples
    for steps in (1, 2, 4):
        samples, seconds = timed(lambda steps=steps: ddim_samples(teacher, noise_scheduler, eval_noise, steps))
        add_row("teacher, DDIM", steps, samples, seconds, teacher_fd)
        if steps == 4:
            grids["teacher DDIM 4 steps"] = samples

    lcm_start = time.perf_counter()
    lcm = distill_lcm(teacher, settings, args.seed, context["train"])
    lcm_seconds = time.perf_counter() - lcm_start
    for steps in (1, 2, 4):
        generator = torch.Generator().manual_seed(args.seed + 7)
        samples, seconds = timed(
            lambda steps=steps, generator=generator: lcm.sample(eval_noise, steps, generator=generator).clamp(-1, 1)
        )
        add_row("LCM student (LCMScheduler)", steps, samples, seconds, teacher_fd)
        grids[f"LCM {steps} step{'s' * (steps > 1)}"] = samples

    reflow_note = "reflow: skipped (--reflow-pairs 0)"
    if settings.reflow_pairs > 0:
        reflow_start = time.perf_counter()
        reflow, pair_seconds = distill_reflow(teacher, settings, args.seed)
        reflow_seconds = time.perf_counter() - reflow_start
        samples, seconds = timed(lambda: reflow.sample(eval_noise, 1).clamp(-1, 1))
        add_row("one-step flow student (Euler)", 1, samples, seconds, teacher_fd)
        grids["flow student 1 step"] = samples
        reflow_note = (
            "flow student: ReflowDistiller(sigma_sampling='one_step') (InstaFlow's distillation stage: at σ = 1 the "
            f"loss is ‖(z − v(z)) − teacher(z)‖²) on {settings.reflow_pairs} pairs (z, the teacher's "
            f"DDIM-{settings.teacher_ddim_steps} sample of z; {pair_seconds:.0f} s to make), {settings.reflow_steps} "
            f"steps, batch {settings.batch}, AdamW lr {settings.reflow_lr:g}, initialized from the teacher; one Euler "
            f"step of FlowMatchEulerDiscreteScheduler (shift 1); {reflow_seconds:.0f} s in all"
        )
    shared = context["notes"] if runs is None else [*context["notes"][:1], "data, model and FD: as in part (a)"]
    notes = shared + [
        f"teacher: the plain-noise run of part (a) ({settings.steps} steps, its EMA weights); its DDIM rows use "
        "trailing spacing (the 1–4-step chains start at t = 999), η = 0, clip_sample as DDPMScheduler's default",
        f"LCM student: ConsistencyDistiller (50-step DDIM solver grid, pseudo-Huber c = 0.001, EMA target 0.95, no "
        f"guidance), initialized from the teacher, {settings.lcm_steps} steps, batch {settings.batch}, AdamW lr "
        f"{settings.lcm_lr:g}, {lcm_seconds:.0f} s; sampled with the distiller's LCMScheduler (multi-step LCM "
        "re-noises between steps with a fixed generator)",
        reflow_note,
        f"FD over the same {settings.eval_samples} starting noises for every row; ± = bootstrap std; vs teacher: "
        f"FD / the teacher's {reference_steps}-step FD (lower is better); ms / sample: sampling wall time per image "
        "in this run",
    ]
    headers = ["sampler", "steps", "FD ± boot. std", f"vs teacher {reference_steps}", "ms / sample"]
    table = render(
        f"Step distillation of the plain MNIST {settings.size}×{settings.size} DDPM teacher",
        headers,
        rows,
        notes,
        args.markdown,
    )
    return table, grids


# --- pictures -----------------------------------------------------------------------------------------------------


def save_grids(panels: dict[str, torch.Tensor], path: Path, size: int, per_row: int = 3) -> None:
    """8×8 sample grids, `per_row` to a row, each under its label."""
    from PIL import Image, ImageDraw

    scale = max(1, 48 // size)
    side = 8 * size * scale
    gap, label_height = 12, 18
    columns = min(per_row, len(panels))
    rows = math.ceil(len(panels) / columns)
    width = columns * (side + gap) - gap
    canvas = Image.new("L", (width, rows * (side + label_height + gap) - gap), color=255)
    draw = ImageDraw.Draw(canvas)
    for index, (label, images) in enumerate(panels.items()):
        left = (index % columns) * (side + gap)
        top = (index // columns) * (side + label_height + gap)
        draw.text((left, top + 2), label, fill=0)
        pixels = ((images[:64].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
        grid = pixels.reshape(8, 8, size, size).permute(0, 2, 1, 3).reshape(8 * size, 8 * size)
        tile = Image.fromarray(grid.numpy()).resize((side, side), Image.NEAREST)
        canvas.paste(tile, (left, top + label_height))
    canvas.save(path, optimize=True)


def save_fd_curves(runs: dict[str, Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for method, run in runs.items():
        steps, fds = zip(*run.checkpoints)
        axis.plot(steps, fds, marker="o", label=method if method == "plain" else f"immiscible {method}")
    axis.axhline(runs["plain"].checkpoints[-1][1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("training step")
    axis.set_ylabel("FD (classifier features)")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- main ---------------------------------------------------------------------------------------------------------


def prepare(settings: Settings, args: argparse.Namespace) -> dict:
    """Data, the feature classifier, the real digits' feature statistics and the fixed evaluation noise."""
    start = time.perf_counter()
    train, train_labels = mnist_images("train", settings.size, settings.train_limit)
    test, test_labels = mnist_images("test", settings.size)
    classifier = trained_classifier(settings, args.seed, train, train_labels)
    judge = Judge(classifier, gaussian_stats(classifier_features(classifier, test)), args.seed)
    generator = torch.Generator().manual_seed(args.seed + 100)
    noise = torch.randn((settings.eval_samples, 1, settings.size, settings.size), generator=generator)
    real = train[torch.randperm(len(train), generator=generator)[: settings.eval_samples]]
    real_fd, real_std = judge.fd_with_noise(real)
    model = tiny_unet(settings, args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    resolution = "28×28 padded to 32×32" + (", average-pooled to 16×16" if settings.size == 16 else "")
    notes = [
        f"`{args.command}`; CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__} threads "
        f"{torch.get_num_threads()}, hf_eff {hf_eff.__version__}; load average at start "
        f"{os.getloadavg()[0]:.1f}",
        f"data: MNIST ({len(train)} training digits, {resolution}, scaled to [-1, 1]); model: diffusers UNet2DModel "
        f"block_out_channels {settings.channels}, layers_per_block 1, no attention ({parameters / 1e6:.2f} M "
        "parameters)",
        f"quality proxy: Fréchet distance between hidden-layer features (128-d) of a small CNN trained on the MNIST "
        f"training digits (test accuracy {100 * accuracy(classifier, test, test_labels):.1f} %) for generated digits "
        f"vs all 10,000 test digits; tr (Σa Σb)^½ by symmetric eigendecompositions (scipy.linalg.eigh), not sqrtm; "
        f"{settings.eval_samples} real training digits score {real_fd:.2f} ± {real_std:.2f} (the floor at this "
        "sample size)",
    ]
    print(f"  (data, classifier and reference statistics: {time.perf_counter() - start:.0f} s)", flush=True)
    return {"train": train, "judge": judge, "noise": noise, "notes": notes}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all", help="(a) immiscible, (b) distillation")
    parser.add_argument("--steps", type=int, default=None, help="DDPM training steps per run (default 1200)")
    parser.add_argument(
        "--size", type=int, choices=(16, 32), default=16, help="image side (default 16; 32 is ~4× slower)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 2 only on an idle 2-core machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables for benchmarks/RESULTS.md")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (< 2 min): tiny model, few steps, PNGs to a temp dir"
    )
    parser.add_argument("--reflow-pairs", type=int, default=None, help="teacher pairs for the flow student (0: skip)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where PNGs go (default benchmarks/)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.reflow_pairs is not None and args.reflow_pairs < 0:
        parser.error(f"--reflow-pairs must be >= 0, got {args.reflow_pairs}")
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="hf_eff_diffusion_")) if args.quick else BENCHMARKS_DIR
    args.command = " ".join(["python benchmarks/diffusion.py", *sys.argv[1:]])
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    settings = make_settings(args)
    if args.reflow_pairs is not None:
        settings = dataclasses.replace(settings, reflow_pairs=args.reflow_pairs)
    start = time.perf_counter()
    context = prepare(settings, args)
    runs = None
    if args.part in ("a", "all"):
        table, runs = part_a(settings, args, context)
        print(table, flush=True)
        name = f"MNIST {settings.size}×{settings.size}, batch {settings.batch}, seed {args.seed}"
        save_grids(
            {method: run.samples for method, run in runs.items()},
            args.out_dir / "diffusion_immiscible.png",
            settings.size,
        )
        save_fd_curves(runs, args.out_dir / "diffusion_fd_curves.png", f"FD during training, {name}")
    if args.part in ("b", "all"):
        table, grids = part_b(settings, args, context, runs)
        print(table, flush=True)
        save_grids(grids, args.out_dir / "diffusion_distill.png", settings.size)
    print(f"PNGs in {args.out_dir}; finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
