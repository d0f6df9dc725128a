"""Cost of Immiscible Diffusion's noise assignment (linear assignment and KNN) against drawing the noise itself, per
batch size and latent shape, on this machine's CPU.

    .venv/bin/python benchmarks/immiscible_assignment.py [--threads 1] [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment
from tables import cpu_name, render

from hf_eff.diffusion import immiscible_noise

BATCHES = (64, 256, 1024)
SHAPES = {"3×32×32": (3, 32, 32), "4×64×64": (4, 64, 64)}
KNN_K = 8


def median_ms(function, repeats: int) -> float:
    function()  # warm-up: allocator, BLAS threads, scipy import
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def mean_squared_distance(x0: torch.Tensor, noise: torch.Tensor) -> float:
    return (x0 - noise).square().flatten(1).sum(1).mean().item()


def measure(shape: tuple[int, ...], batch: int, repeats: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((batch, *shape), generator=generator) * 2 - 1  # data scaled to [-1, 1], as diffusers trains
    noise = torch.randn_like(x0)
    rows, columns = x0.flatten(1), noise.flatten(1)
    dots = rows @ columns.T

    draw = median_ms(lambda: torch.randn((batch, *shape), generator=generator), repeats)
    linear = median_ms(lambda: immiscible_noise(x0, generator=generator), repeats)
    matmul = median_ms(lambda: rows @ columns.T, repeats)
    solve = median_ms(lambda: linear_sum_assignment(dots.numpy(), maximize=True), repeats)
    knn = median_ms(lambda: immiscible_noise(x0, method="knn", k=KNN_K, generator=generator), repeats)

    plain = mean_squared_distance(x0, noise)
    linear_distance = mean_squared_distance(x0, immiscible_noise(x0, generator=generator)) / plain
    knn_distance = mean_squared_distance(x0, immiscible_noise(x0, method="knn", k=KNN_K, generator=generator)) / plain
    return [
        f"{batch}",
        f"{draw:.1f}",
        f"{linear:.1f}",
        f"{matmul:.1f}",
        f"{solve:.1f}",
        f"{linear / draw:.2f}",
        f"{knn:.1f}",
        f"{knn / draw:.2f}",
        f"{linear_distance:.4f}",
        f"{knn_distance:.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell; the median is reported")
    parser.add_argument("--markdown", action="store_true", help="print Markdown for benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    headers = [
        "batch", "draw ms", "linear ms", "matmul ms", "scipy ms", "linear/draw", f"knn k={KNN_K} ms", "knn/draw",
        "dist² linear", "dist² knn",
    ]  # fmt: skip
    notes = [
        f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch threads: {args.threads}, median of {args.repeats}",
        "draw: torch.randn of the batch (the plain-noise baseline); linear: immiscible_noise(method='linear') in "
        "all (draw + B×B float32 matmul + scipy linear_sum_assignment + permutation); matmul and scipy: those "
        f"two parts alone; knn: immiscible_noise(method='knn', k={KNN_K}) in all (draws k× the noise)",
        "dist²: mean ‖x0 − ε‖² of the assigned noise over that of plain noise, for x0 uniform in [-1, 1]",
    ]
    for name, shape in SHAPES.items():
        rows = [measure(shape, batch, args.repeats) for batch in BATCHES]
        print(render(f"Immiscible noise assignment, latents {name}", headers, rows, notes, args.markdown))


if __name__ == "__main__":
    main()
