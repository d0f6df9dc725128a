"""Low-rank gradient projection of GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection"), as pure functions over tensors."""

from __future__ import annotations

import warnings

import torch

from .functional import seeded_generator

PROJECTION_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("full", "randomized")

# A projector pair: (P, Q) with P = U[:, :r] (m×r) for a left projection, Q = Vh[:r] (r×n) for a right projection;
# the unused one is None. Only the tensors go into optimizer state; the side is re-derived from proj_type and shape.
Projectors = tuple[torch.Tensor | None, torch.Tensor | None]


def projection_side(proj_type: str, shape: torch.Size | tuple[int, ...]) -> str:
    """ "left" (R = Pᵀ·G), "right" (R = G·Qᵀ) or "full" (R = Pᵀ·G·Qᵀ) for a weight of `shape` (m, n).

    `std` compresses the smaller dimension (m ≥ n → right, else left), `reverse_std` the larger one.
    """
    if proj_type not in PROJECTION_TYPES:
        raise ValueError(f"proj_type must be one of {PROJECTION_TYPES}, got {proj_type!r}")
    rows, cols = shape
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    return proj_type


def check_rank(rank: int, shape: torch.Size | tuple[int, ...]) -> None:
    """A rank-r projector needs r ≤ min(m, n) singular vectors."""
    if rank > min(shape):
        raise ValueError(
            f"rank={rank} is larger than a weight of shape {tuple(shape)} allows (at most min(m, n) = {min(shape)}); "
            "lower the rank or put this weight in a group with a smaller 'rank' or 'target': False"
        )


def low_rank_shape(side: str, shape: torch.Size | tuple[int, ...], rank: int) -> tuple[int, int]:
    """Shape of R, hence of the Adam moments kept for the weight."""
    rows, cols = shape
    return {"left": (rank, cols), "right": (rows, rank), "full": (rank, rank)}[side]


def full_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-`rank` singular vectors (U[:, :r], Vh[:r]) by `torch.linalg.svd`."""
    left_vectors, _, right_vectors_h = torch.linalg.svd(matrix, full_matrices=False)
    return left_vectors[:, :rank], right_vectors_h[:rank]


def randomized_svd(
    matrix: torch.Tensor, rank: int, oversample: int, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-`rank` singular vectors by a randomized range finder with `niter` power iterations
    (Halko, Martinsson & Tropp, 2011), the method of `torch.svd_lowrank`.

    Written out instead of calling `torch.svd_lowrank` because that draws from the global RNG; an explicit generator
    makes the sketch a function of (seed, parameter, refresh) and leaves the user's RNG stream untouched.
    """
    rows, cols = matrix.shape
    sketch_size = min(rank + oversample, rows, cols)
    test_matrix = torch.randn(cols, sketch_size, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ test_matrix).Q
    for _ in range(niter):
        # Re-orthonormalize between products so small singular directions are not lost to rounding.
        co_basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ co_basis).Q
    small_left, _, right_vectors_h = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return (basis @ small_left)[:, :rank], right_vectors_h[:rank]


def compute_projectors(
    grad: torch.Tensor,
    rank: int,
    side: str,
    svd_method: str = "full",
    niter: int = 2,
    oversample: int = 8,
    seed: int = 0,
    keys: tuple[int, ...] = (),
) -> Projectors:
    """Projectors from the top-`rank` singular vectors of `grad`, computed in fp32 and returned in `grad`'s dtype.

    `keys` (e.g. parameter index, refresh count) select the random sketch of the randomized method. If the full SVD
    fails to converge (or returns non-finite vectors), this warns and falls back to the randomized method: a zero or
    NaN projector would silently stop training (a known GaLore failure). If that fails too, it raises.
    """
    matrix = grad.detach().float()
    vectors = None
    if svd_method == "full":
        try:
            vectors = full_svd(matrix, rank)
        except torch.linalg.LinAlgError as error:
            warnings.warn(f"full SVD failed ({error}); using the randomized SVD for this refresh", stacklevel=2)
        else:
            if not all(torch.isfinite(vector).all() for vector in vectors):
                warnings.warn(
                    "full SVD returned non-finite vectors; using the randomized SVD for this refresh", stacklevel=2
                )
                vectors = None
    elif svd_method != "randomized":
        raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {svd_method!r}")
    if vectors is None:
        generator = seeded_generator(seed, *keys, device=matrix.device)
        vectors = randomized_svd(matrix, rank, oversample, niter, generator)
        if not all(torch.isfinite(vector).all() for vector in vectors):
            raise RuntimeError(
                f"could not compute a finite rank-{rank} projector for a gradient of shape {tuple(grad.shape)}"
            )
    left_vectors, right_vectors_h = (vector.to(grad.dtype) for vector in vectors)
    return (
        left_vectors.contiguous() if side in ("left", "full") else None,
        right_vectors_h.contiguous() if side in ("right", "full") else None,
    )


def project(grad: torch.Tensor, projectors: Projectors, side: str) -> torch.Tensor:
    """R = Pᵀ·G (left), G·Qᵀ (right) or Pᵀ·G·Qᵀ (full)."""
    left, right = projectors
    if side in ("left", "full"):
        grad = left.mT @ grad
    if side in ("right", "full"):
        grad = grad @ right.mT
    return grad


def project_back(low_rank: torch.Tensor, projectors: Projectors, side: str) -> torch.Tensor:
    """P·R (left), R·Q (right) or P·R·Q (full): the full-size update for a low-rank direction."""
    left, right = projectors
    if side in ("left", "full"):
        low_rank = left @ low_rank
    if side in ("right", "full"):
        low_rank = low_rank @ right
    return low_rank
