"""Runs the demo: the untrained reference, then every method in a fresh process, then the saved report."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_eff import assets

from .methods import DEMO_METHODS
from .results import DemoResults
from .tasks import TASKS
from .train import WARMUP_STEPS, MethodResult, TrainingJob, evaluate_base_model, train_method


@dataclass(frozen=True)
class DemoSettings:
    """What to train and for how long; `None` takes the task's default."""

    task: str = "minilm"
    methods: tuple[str, ...] = tuple(DEMO_METHODS)
    steps: int | None = None
    batch_size: int | None = None
    eval_size: int | None = None
    rank: int = 8
    rank_overrides: dict[str, int] = field(default_factory=dict)
    output_dir: Path = Path("outputs/demo")
    seed: int = 0


def run_demo(settings: DemoSettings) -> DemoResults:
    """Fine-tunes the task's model with each method and saves `results.json`, `comparison.png` and the adapters."""
    task = TASKS[settings.task]
    steps = settings.steps or task.default_steps
    batch_size = settings.batch_size or task.default_batch_size
    eval_size = settings.eval_size or task.default_eval_size
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # Fetched here, once, so that a missing asset fails before any worker starts.
    model_path = task.model_path()
    train_examples = assets.imdb_reviews("train", limit=steps * batch_size)
    eval_examples = assets.imdb_reviews("test", limit=eval_size)

    results = DemoResults(
        task=task.name,
        summary=task.summary,
        metric=task.metric,
        higher_is_better=task.higher_is_better,
        untrained_metric=evaluate_base_model(task, model_path, eval_examples, batch_size, device, settings.seed),
        device=device,
        settings={
            "steps": steps,
            "batch_size": batch_size,
            "eval_size": len(eval_examples),
            "max_length": task.max_length,
            "target_modules": list(task.target_modules),
            "head_learning_rate": task.learning_rate if task.modules_to_save else None,
            "seed": settings.seed,
            "warmup_steps": WARMUP_STEPS,
        },
    )
    for name in settings.methods:
        method = DEMO_METHODS[name]
        job = TrainingJob(
            task=task.name,
            method=name,
            rank=settings.rank_overrides.get(name, settings.rank),
            learning_rate=task.learning_rate * method.lr_multiplier,
            head_learning_rate=task.learning_rate,
            steps=steps,
            batch_size=batch_size,
            train_examples=train_examples,
            eval_examples=eval_examples,
            model_path=model_path,
            adapter_dir=settings.output_dir / "adapters" / name,
            device=device,
            seed=settings.seed,
        )
        results.methods.append(_train_in_fresh_process(job))
    results.save(settings.output_dir)
    return results


def _train_in_fresh_process(job: TrainingJob) -> MethodResult:
    # One spawned process per method: its peak memory is that method's alone, and no allocator cache or thread pool
    # warmed up by one method speeds up the next.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(train_method, job).result()
