"""Immiscible noise: the linear assignment is an exact, optimal permutation of the drawn noise (also over the global
batch of 2 processes); KNN keeps the nearest of k candidates; the scheduler convenience; errors before any draw.

Run as a script under torchrun, this file is the worker of the distributed test (see `_worker`).
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from hf_eff.diffusion import FlowMatchVectorizedScheduler, add_immiscible_noise, immiscible_noise


def _drawn(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The noise immiscible_noise draws from torch.Generator().manual_seed(seed) before assigning it."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _squared_distances(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Plain float64 ‖x_i − ε_j‖² for every pair, the reference cost."""
    difference = x0.double().reshape(len(x0), 1, -1) - noise.double().reshape(1, len(noise), -1)
    return difference.square().sum(-1)


def _permutation_of(result: torch.Tensor, drawn: torch.Tensor) -> list[int]:
    """For each row of `result`, the row of `drawn` it equals bit for bit; fails unless that is a permutation."""
    equal = (result.reshape(len(result), 1, -1) == drawn.reshape(1, len(drawn), -1)).all(-1)
    assert equal.sum(1).tolist() == [1] * len(result), "a result row is not exactly one drawn row"
    columns = equal.int().argmax(1).tolist()
    assert sorted(columns) == list(range(len(drawn))), "a drawn row is used twice"
    return columns


# --- linear assignment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((6, 5), torch.float32), ((6, 2, 3, 4), torch.float32), ((6,), torch.float64), ((6, 3, 4), torch.bfloat16)],
)
def test_linear_is_the_optimal_permutation_of_the_drawn_noise(shape, dtype):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=generator).to(dtype)
    noise = immiscible_noise(x0, generator=torch.Generator().manual_seed(2))
    drawn = _drawn(shape, 2, dtype)
    assert (noise.shape, noise.dtype, noise.device) == (x0.shape, dtype, x0.device)
    columns = _permutation_of(noise, drawn)
    cost = _squared_distances(x0, drawn)
    # Brute force over all 720 permutations of a batch of 6.
    totals = {perm: sum(cost[i, j].item() for i, j in enumerate(perm)) for perm in itertools.permutations(range(6))}
    best = min(totals.values())
    assert totals[tuple(columns)] == pytest.approx(best, rel=1e-12)
    assert best < totals[tuple(range(6))], "this draw should have a better pairing than the identity"


def test_linear_matches_scipy_on_plain_squared_distances_and_lowers_the_total():
    x0 = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise = immiscible_noise(x0, generator=torch.Generator().manual_seed(4))
    drawn = _drawn(x0.shape, 4)
    cost = _squared_distances(x0, drawn)
    _, expected = linear_sum_assignment(cost.numpy())
    assert _permutation_of(noise, drawn) == expected.tolist()
    assigned, identity = cost[torch.arange(64), torch.as_tensor(expected)].sum(), cost.diagonal().sum()
    assert assigned < identity


def test_linear_at_batch_one_is_the_drawn_noise():
    x0 = torch.randn(1, 3, 4, 4)
    assert torch.equal(immiscible_noise(x0, generator=torch.Generator().manual_seed(5)), _drawn((1, 3, 4, 4), 5))


def test_same_generator_state_gives_the_same_noise_and_another_seed_does_not():
    x0 = torch.randn(8, 2, 3)
    for method in ("linear", "knn"):
        first = immiscible_noise(x0, method=method, generator=torch.Generator().manual_seed(6))
        again = immiscible_noise(x0, method=method, generator=torch.Generator().manual_seed(6))
        other = immiscible_noise(x0, method=method, generator=torch.Generator().manual_seed(7))
        assert torch.equal(first, again) and not torch.equal(first, other)


# --- k nearest candidates --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_knn_keeps_the_nearest_of_k_candidates(batch):
    k, sample_shape = 7, (2, 3, 3)
    x0 = torch.randn((batch, *sample_shape), generator=torch.Generator().manual_seed(8))
    noise = immiscible_noise(x0, method="knn", k=k, generator=torch.Generator().manual_seed(9))
    candidates = _drawn((batch, k, *sample_shape), 9)
    for b in range(batch):
        distances = _squared_distances(x0[b : b + 1], candidates[b])[0]
        assert torch.equal(noise[b], candidates[b, distances.argmin()])
        assert distances.argmin() != distances.argmax()


def test_knn_with_one_candidate_is_plain_noise_and_more_candidates_come_closer():
    x0 = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    plain = immiscible_noise(x0, method="knn", k=1, generator=torch.Generator().manual_seed(11))
    assert torch.equal(plain, _drawn(x0.shape, 11))
    mean_distance = {
        k: _squared_distances(x0, immiscible_noise(x0, method="knn", k=k, generator=torch.Generator().manual_seed(11)))
        .diagonal()
        .mean()
        for k in (1, 4, 32)
    }
    assert mean_distance[1] > mean_distance[4] > mean_distance[32]


def test_knn_follows_half_precision_x0():
    x0 = torch.randn(4, 3, 5).to(torch.bfloat16)
    noise = immiscible_noise(x0, method="knn", k=3, generator=torch.Generator().manual_seed(12))
    candidates = _drawn((4, 3, 3, 5), 12, torch.bfloat16)
    assert noise.dtype == torch.bfloat16
    for b in range(4):
        assert torch.equal(noise[b], candidates[b, _squared_distances(x0[b : b + 1], candidates[b])[0].argmin()])


# --- with schedulers -------------------------------------------------------------------------------------------


def test_add_immiscible_noise_uses_add_noise_or_scale_noise():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    x0 = torch.randn(4, 2, 3, 4, 4)
    for scheduler in (DDPMScheduler(), FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchVectorizedScheduler()):
        timesteps = scheduler.timesteps[torch.tensor([0, 100, 500, 900])]
        noisy, noise = add_immiscible_noise(scheduler, x0, timesteps, generator=torch.Generator().manual_seed(13))
        assert torch.equal(noise, immiscible_noise(x0, generator=torch.Generator().manual_seed(13)))
        if isinstance(scheduler, DDPMScheduler):
            expected = scheduler.add_noise(x0, noise, timesteps)
        else:  # flow matching: (1 - σ) x0 + σ ε, with σ of each timestep written out
            sigma = scheduler.sigmas[torch.tensor([0, 100, 500, 900])].view(4, 1, 1, 1, 1)
            expected = (1 - sigma) * x0 + sigma * noise
        torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)

    per_frame = FlowMatchVectorizedScheduler()
    timesteps = per_frame.timesteps[torch.randint(0, 1000, (4, 3), generator=torch.Generator().manual_seed(14))]
    noisy, noise = add_immiscible_noise(per_frame, x0, timesteps, method="knn", k=4)
    sigma = per_frame.sigmas_for_timesteps(timesteps).view(4, 1, 3, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise, rtol=0, atol=1e-6)


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x0", "kwargs", "error", "match"),
    [
        (torch.randn(4, 3), {"method": "knn", "k": 0}, ValueError, "`k` must be an int >= 1, got 0"),
        (torch.randn(4, 3), {"method": "knn", "k": 2.0}, ValueError, "`k` must be an int >= 1"),
        (torch.randn(4, 3), {"k": True}, ValueError, "`k` must be an int >= 1"),
        (torch.randn(4, 3), {"method": "hungarian"}, ValueError, "`method` must be one of"),
        (torch.tensor(1.0), {}, ValueError, r"batch \[B, ...\] with B >= 1, got shape \(\)"),
        (torch.randn(0, 3), {}, ValueError, r"B >= 1, got shape \(0, 3\)"),
        (torch.zeros(4, 3, dtype=torch.int64), {}, TypeError, "floating-point tensor, got a torch.int64 tensor"),
        ([[0.0]], {}, TypeError, "floating-point tensor, got list"),
        (torch.randn(4, 3), {"generator": 0}, TypeError, "`generator` must be a torch.Generator"),
        (torch.empty(4, 3, device="meta"), {"generator": torch.Generator()}, ValueError, "x0's device meta"),
        (torch.randn(4, 3), {"process_group": object()}, ValueError, "torch.distributed is not initialized"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), {}, ValueError, "inf or nan"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(x0, kwargs, error, match):
    with pytest.raises(error, match=match):
        immiscible_noise(x0, **kwargs)


def test_a_scheduler_without_a_noising_method_is_refused_before_any_draw():
    generator = torch.Generator().manual_seed(15)
    state = generator.get_state()
    with pytest.raises(TypeError, match="add_noise.*scale_noise.*got object"):
        add_immiscible_noise(object(), torch.randn(2, 3), torch.tensor([1.0, 2.0]), generator=generator)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("library", ["diffusers", "scipy"])
def test_missing_extra_is_named_on_import(monkeypatch, library):
    monkeypatch.setitem(sys.modules, library, None)  # what Python does for a package it cannot import
    monkeypatch.delitem(sys.modules, "hf_eff.diffusion")
    with pytest.raises(ImportError, match=rf"hf_eff.diffusion needs {library}.*pip install \"hf-eff\[diffusers\]\""):
        importlib.import_module("hf_eff.diffusion")


# --- two processes ---------------------------------------------------------------------------------------------

WORLD, LOCAL_BATCH, SAMPLE_SHAPE = 2, 4, (3, 5, 5)


def _rank_seed(rank: int) -> int:
    return 100 + rank


def _global_x0() -> torch.Tensor:
    return torch.randn((WORLD * LOCAL_BATCH, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(16))


@pytest.mark.slow
def test_process_group_assigns_over_the_global_batch(tmp_path):
    """Two gloo processes under torchrun, each with a local batch of 4, against the plain computation on the global
    batch of 8 (the two ranks' drawn noise, concatenated)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", __file__,
        str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    outputs = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    drawn = [_drawn((LOCAL_BATCH, *SAMPLE_SHAPE), _rank_seed(rank)) for rank in range(WORLD)]

    # Each rank's samples equal the noise the other rank drew: only a global assignment finds that pairing.
    for rank in range(WORLD):
        assert torch.equal(outputs[rank]["swapped"], drawn[1 - rank])

    x0, global_drawn = _global_x0(), torch.cat(drawn)
    _, expected = linear_sum_assignment(_squared_distances(x0, global_drawn).numpy())
    result_noise = torch.cat([output["random"] for output in outputs])
    assert _permutation_of(result_noise, global_drawn) == expected.tolist()
    assert set(expected[:LOCAL_BATCH]) != set(range(LOCAL_BATCH)), "this draw should pair across ranks"

    for output in outputs:
        assert "every rank must pass x0 of the same shape" in output["uneven_error"]
        assert "batch sizes per rank: [3, 4]" in output["uneven_error"]
        assert "inf or nan" in output["nan_error"]


def _worker(output_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    group, rank = dist.group.WORLD, dist.get_rank()
    results = {}

    other_rank_noise = _drawn((LOCAL_BATCH, *SAMPLE_SHAPE), _rank_seed(1 - rank))
    generator = torch.Generator().manual_seed(_rank_seed(rank))
    results["swapped"] = immiscible_noise(other_rank_noise, generator=generator, process_group=group)

    x0 = _global_x0()[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
    generator = torch.Generator().manual_seed(_rank_seed(rank))
    results["random"] = immiscible_noise(x0, generator=generator, process_group=group)

    # Uneven batches on both ranks; a nan on rank 1 only, which rank 0 must also refuse rather than wait forever.
    nan_on_rank_one = torch.where(x0 > 1, float("nan"), x0) if rank == 1 else x0
    for key, bad_x0 in (("uneven_error", x0[: 3 + rank]), ("nan_error", nan_on_rank_one)):
        try:
            immiscible_noise(bad_x0, process_group=group)
            results[key] = "no error"
        except ValueError as error:
            results[key] = str(error)

    torch.save(results, output_dir / f"rank{rank}.pt")
    # Torn down together: a rank that exits while the other still finishes a collective can abort.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
