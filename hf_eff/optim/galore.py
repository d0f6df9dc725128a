"""GaLore AdamW (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .checks import (
    KeepsIntegerStateOnLoad,
    check_adamw_hyperparameters,
    check_gradients,
    is_finite_number,
    is_int,
    require,
)
from .functional import adam_direction_, decoupled_weight_decay_
from .projection import (
    PROJECTION_TYPES,
    SVD_METHODS,
    Projectors,
    check_rank,
    compute_projectors,
    low_rank_shape,
    project,
    project_back,
    projection_side,
)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """Plain AdamW in place, the rule for non-target groups and for weights a projection cannot handle."""
    decoupled_weight_decay_(param, lr, weight_decay)
    param.add_(adam_direction_(exp_avg, exp_avg_sq, grad, step, betas[0], betas[1], eps), alpha=-lr)


def low_rank_adamw_update_(
    param: torch.Tensor,
    low_rank_grad: torch.Tensor,
    projectors: Projectors,
    side: str,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """Adam on the projected gradient R, the direction projected back and scaled: θ ← θ(1 − lr·λ) − lr·scale·P·d."""
    direction = adam_direction_(exp_avg, exp_avg_sq, low_rank_grad, step, betas[0], betas[1], eps)
    decoupled_weight_decay_(param, lr, weight_decay)
    param.add_(project_back(direction, projectors, side), alpha=-lr * scale)


def galore_defaults(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    svd_method: str,
    svd_niter: int,
    svd_oversample: int,
    seed: int,
) -> dict[str, Any]:
    return {
        "lr": lr,
        "betas": betas,
        "eps": eps,
        "weight_decay": weight_decay,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        "svd_method": svd_method,
        "svd_niter": svd_niter,
        "svd_oversample": svd_oversample,
        "seed": seed,
        "target": True,
    }


def validate_galore_group(group: dict[str, Any], optimizer_name: str = "GaLoreAdamW") -> None:
    """ValueError naming the first bad hyper-parameter of a (defaults-merged) param group."""
    check_adamw_hyperparameters(group, optimizer_name)
    for name in ("rank", "update_proj_gap"):
        require(is_int(group[name]) and group[name] > 0, optimizer_name, name, "an integer > 0", group[name])
    scale = group["scale"]
    require(is_finite_number(scale) and scale > 0, optimizer_name, "scale", "a finite number > 0", scale)
    for name, choices in (("proj_type", PROJECTION_TYPES), ("svd_method", SVD_METHODS)):
        require(group[name] in choices, optimizer_name, name, f"one of {choices}", group[name])
    for name in ("svd_niter", "svd_oversample", "seed"):
        require(is_int(group[name]) and group[name] >= 0, optimizer_name, name, "an integer >= 0", group[name])


class GaLoreAdamW(KeepsIntegerStateOnLoad, torch.optim.Optimizer):
    """AdamW whose moments live in a low-rank subspace of each target weight's gradient (GaLore).

    For a target 2-D weight with gradient G (m×n), every `update_proj_gap` steps (at steps 0, T, 2T, … counted before
    the increment) the projector is recomputed in fp32 from the top-`rank` singular vectors of the current G. With
    `proj_type="std"` the smaller dimension is compressed: m ≥ n → R = G·Qᵀ (Q = Vh[:r]), else R = Pᵀ·G (P = U[:, :r]);
    `reverse_std` compresses the larger one, `left`/`right` are fixed, `full` is two-sided (R = Pᵀ·G·Qᵀ). Adam runs
    on R; its direction d is projected back and applied as θ ← θ(1 − lr·λ) − lr·scale·P·d. Moments are kept when the
    projector changes, as in the official code. Caveat for `full`: at a refresh R = Pᵀ·G·Qᵀ is diagonal, so Adam's
    first step after it turns rounding-level off-diagonal entries into ±1 unless `eps` dominates them.

    Differences from the official code, on purpose: decoupled weight decay is applied before the update (AdamW's order;
    the official code applies it after), and Adam uses torch.optim.AdamW's arithmetic (eps added after bias
    correction; the official code adds it before), so non-target groups match `torch.optim.AdamW`.

    Groups with `"target": False`, and parameters that are not 2-D, get plain AdamW. State per target weight: the
    projector(s) (r·min(m, n) floats for one side), two moments of R's shape (2·r·max(m, n)), and `step`, all tensors in
    the parameter's dtype (step: a float32 CPU scalar like torch's), so `torch.load(weights_only=True)` and
    `load_state_dict` resume bit-identically; the randomized SVD's sketch is drawn from a generator keyed by
    (`seed`, parameter index, refresh count), so it is reproduced after a resume too.

    A rank larger than min(m, n) raises a ValueError at the first step that sees the weight, before any state changes.
    A non-finite gradient anywhere raises a FloatingPointError naming the parameter before any parameter or state is
    touched (the step is not taken; one host sync per device); with AMP, `GradScaler.step` already skips such steps.
    A sparse gradient raises a RuntimeError. If the full SVD fails to converge, the randomized SVD is used for that
    refresh (with a warning) rather than a zero or NaN projector.

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128, update_proj_gap=200, scale=0.25,
    proj_type="std", svd_method="full" ("randomized": svd_niter=2 power iterations, svd_oversample=8 extra sketch
    columns), seed=0. Every hyper-parameter can be overridden per param group.

    Example::

        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and ("attn" in n or "mlp" in n)]
        others = [p for p in model.parameters() if all(p is not m for m in matrices)]
        optimizer = GaLoreAdamW(
            [{"params": matrices}, {"params": others, "target": False}], lr=1e-2, rank=128, update_proj_gap=200
        )
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd_method: str = "full",
        svd_niter: int = 2,
        svd_oversample: int = 8,
        seed: int = 0,
    ) -> None:
        defaults = galore_defaults(
            lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type, svd_method, svd_niter,
            svd_oversample, seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_galore_group(group, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be, defaults filled in, before torch stores it.
        self._validate_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    @staticmethod
    def _is_projected(group: dict[str, Any], param: torch.Tensor) -> bool:
        return group["target"] and param.ndim == 2

    def _check_before_step(self) -> None:
        """Every check that can fail, done before any parameter or state changes."""
        for group in self.param_groups:
            for param in group["params"]:
                # .get: state is a defaultdict
                if param.grad is not None and self._is_projected(group, param) and not self.state.get(param):
                    check_rank(group["rank"], param.shape)
        check_gradients(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        index = -1
        for group in self.param_groups:
            for param in group["params"]:
                index += 1  # position among all parameters: a stable key for the randomized SVD's sketch
                if param.grad is None:
                    continue
                if self._is_projected(group, param):
                    self._projected_step(param, group, index)
                else:
                    self._adamw_step(param, group)
        return loss

    def _adamw_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        adamw_update_(
            param, param.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), group["lr"], group["betas"],
            group["eps"], group["weight_decay"],
        )  # fmt: skip

    def _projected_step(self, param: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[param]
        side = projection_side(group["proj_type"], param.shape)
        if not state:
            moment_shape = low_rank_shape(side, param.shape, group["rank"])
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(moment_shape, dtype=param.dtype, device=param.device)
            state["exp_avg_sq"] = torch.zeros(moment_shape, dtype=param.dtype, device=param.device)
            self._init_method_state(state, moment_shape, param, group)
        steps_done = int(state["step"])
        if steps_done % group["update_proj_gap"] == 0:
            refresh_count = steps_done // group["update_proj_gap"]
            left, right = compute_projectors(
                param.grad, group["rank"], side, group["svd_method"], group["svd_niter"], group["svd_oversample"],
                group["seed"], keys=(index, refresh_count),
            )  # fmt: skip
            for key, projector in (("left_projector", left), ("right_projector", right)):
                if projector is not None:
                    state[key] = projector
            self._on_projector_refresh(state)
        projectors = (state.get("left_projector"), state.get("right_projector"))
        low_rank_grad = self._precondition(project(param.grad, projectors, side), state, group)
        state["step"] += 1
        low_rank_adamw_update_(
            param, low_rank_grad, projectors, side, state["exp_avg"], state["exp_avg_sq"], steps_done + 1,
            group["lr"], group["betas"], group["eps"], group["weight_decay"], group["scale"],
        )  # fmt: skip

    # Hooks for variants that transform the low-rank gradient (Natural GaLore); GaLore itself uses R unchanged.
    def _init_method_state(
        self, state: dict[str, Any], low_rank_shape: tuple[int, int], param: torch.Tensor, group: dict[str, Any]
    ) -> None:
        pass

    def _on_projector_refresh(self, state: dict[str, Any]) -> None:
        pass

    def _precondition(self, low_rank_grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        return low_rank_grad
