"""Deterministic truncated SVD and base-weight fingerprints for LoRA-XS."""

from __future__ import annotations

import torch

FINGERPRINT_PROBES = 8
# Relative tolerance of a fingerprint match: passes a base re-loaded in bf16/fp16 (rounding ≈ 4e-3 per entry, far
# less after the probes average it), fails a different model or a fine-tune that moved the weight by ≳ 1 %.
FINGERPRINT_RTOL = 1e-2


def truncated_svd(
    weight: torch.Tensor, rank: int, method: str = "full", niter: int = 4, oversample: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` U (m×r), S (r), Vh (r×n) of a 2-D weight in float32, with signs fixed so reruns agree.

    The sign of each singular pair is ambiguous; it is fixed by making the largest-magnitude entry of every left
    singular vector positive, so recomputing the factors from the same weight gives the same factors.
    """
    weight = weight.float()
    if method == "full":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        devices = [weight.device.index or 0] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(weight, q=min(rank + oversample, *weight.shape), niter=niter)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    pivots = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivots, torch.arange(rank, device=u.device)])
    signs[signs == 0] = 1
    # Contiguous like a reloaded checkpoint, so matmuls take the same kernels and outputs match bit for bit.
    return (u * signs).contiguous(), s, (vh * signs[:, None]).contiguous()


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Frobenius norm and a few seeded bilinear probes gᵀWh / ‖W‖ of a 2-D weight: 1 + 8 float64 numbers on CPU."""
    weight = weight.detach().float()
    generator = torch.Generator(device="cpu").manual_seed(0)
    left = torch.randn(FINGERPRINT_PROBES, weight.shape[0], generator=generator).to(weight.device)
    right = torch.randn(FINGERPRINT_PROBES, weight.shape[1], generator=generator).to(weight.device)
    norm = torch.linalg.matrix_norm(weight)
    probes = ((left @ weight) * right).sum(dim=1) / norm.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.cat([norm[None], probes]).double().cpu()


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """True when two fingerprints describe the same weight up to storage precision."""
    norm_ok = abs(float(saved[0]) - float(current[0])) <= FINGERPRINT_RTOL * max(float(saved[0]), 1e-12)
    return norm_ok and bool(((saved[1:] - current[1:]).abs() <= FINGERPRINT_RTOL).all())
