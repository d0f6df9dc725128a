"""The `hf-eff` command: list hf_eff's components, or run the demo that compares them on a real model."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hf_eff.adapters import ADAPTER_METHODS
from hf_eff.assets import AssetUnavailableError
from hf_eff.demo import DEMO_METHODS, SUITES, TASKS, DemoSettings, run_demo, suite_methods
from hf_eff.demo.train import quiet_libraries


@dataclass(frozen=True)
class Component:
    """One thing hf_eff provides, as `hf-eff list` shows it."""

    kind: str
    name: str
    paper: str


# What `hf-eff list` shows: one line per kind of component (optimizers, trainers, kernels, ...).
COMPONENTS: list[Component] = [
    *(Component("PEFT adapter", f"{m.config_cls.__name__} ({m.name.upper()})", m.paper) for m in ADAPTER_METHODS),
    Component(
        "optimizer",
        "GaLoreAdamW (galore_adamw)",
        "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    ),
    Component(
        "optimizer",
        "GaLoreAdamW8bit (galore_adamw_8bit)",
        "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (8-bit Adam state)",
    ),
    Component(
        "optimizer",
        "NaturalGaLoreAdamW (natural_galore_adamw)",
        "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning",
    ),
    Component("optimizer", "SPAM (spam)", "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training"),
    Component(
        "optimizer",
        "FRUGAL (frugal)",
        "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
    ),
    Component("Trainer callback", "GradientSpikeCallback", "SPAM: Spike-Aware Adam with Momentum Reset (spike rule)"),
    Component("Trainer callback", "OptimizerMemoryCallback", "optimizer-state, parameter, gradient and peak memory"),
    Component(
        "Trainer callback",
        "LayerwiseSamplingCallback",
        "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning; OwLore (outlier-weighted)",
    ),
    Component(
        "diffusion noise",
        "immiscible_noise(method='linear')",
        "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment",
    ),
    Component(
        "diffusion noise",
        "immiscible_noise(method='knn')",
        "Improved Immiscible Diffusion: Accelerate Diffusion Training by Reducing Its Miscibility",
    ),
    Component(
        "diffusers scheduler",
        "FlowMatchVectorizedScheduler",
        "PUSA V1.0 (vectorized timestep adaptation); Rolling Forcing (per-frame noise levels)",
    ),
    Component(
        "diffusion distillation",
        "ConsistencyDistiller",
        "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference; LCM-LoRA",
    ),
    Component(
        "diffusion distillation",
        "ReflowDistiller",
        "Flow Straight and Fast (Rectified Flow); InstaFlow: One Step is Enough for Diffusion-Based Text-to-Image",
    ),
    Component(
        "diffusion trainer",
        "DiffusionDPO",
        "Diffusion Model Alignment Using Direct Preference Optimization",
    ),
    Component(
        "diffusion trainer",
        "InversionDPO",
        "Inversion-DPO: Precise and Efficient Post-Training for Diffusion Models",
    ),
    Component(
        "diffusion trainer",
        "SelfNPO (+ npo_sample)",
        "Self-NPO: Negative Preference Optimization of Diffusion Models by Simply Learning from Itself",
    ),
    Component(
        "TRL trainer",
        "GRPOTrainer / GRPOConfig(prefix_grouping='auto')",
        "Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward",
    ),
    Component(
        "DPO loss (TRL)",
        "DPOConfig(loss_type='dpop')",
        "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
    ),
    Component("DPO loss (TRL)", "DPOConfig(loss_type='beta_dpo')", "β-DPO: Direct Preference Optimization with Dynamic β"),
    Component(
        "DPO loss (TRL)",
        "DPOConfig(loss_type='ddpo')",
        "Modifying Large Language Model Post-Training for Diverse Creative Writing",
    ),
    Component(
        "DPO loss (TRL)",
        "DPOConfig(loss_type='logo')",
        "LOGO: Long cOntext aliGnment via efficient preference Optimization",
    ),
    Component(
        "DPO loss (TRL)",
        "DPOConfig(loss_type='adv_ipo')",
        "Efficient Adversarial Training in LLMs with Continuous Attacks",
    ),
    Component(
        "attention kernel",
        "flash_attention / attn_implementation='hf_eff_triton'",
        "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
    ),
    Component(
        "attention kernel",
        "prefix_grouped_attention",
        "Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward",
    ),
    Component(
        "model patch",
        "apply_patches(model, attention='triton', quantization='l4q'|'lowbit')",
        "reversible attention swap (Llama, Qwen2/3, Mistral, Gemma, GPT-2) and Linear quantization",
    ),
    Component("quantization kernel", "lsq_fake_quantize (Triton, fwd+bwd)", "Learned Step Size Quantization"),
    Component(
        "quantization",
        "L4QLinear / apply_l4q / export_l4q",
        "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models",
    ),
    Component(
        "quantization kernel",
        "LowBitLinear (packed int4/int8, Triton dequantize-matmul)",
        "weight-only low-bit linear; the export target of L4Q",
    ),
    Component(
        "transformers quantizer",
        "HfEffLowBitConfig (quant_method='hf_eff_lowbit')",
        "L4Q export / round-to-nearest low-bit loading through from_pretrained",
    ),
]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def list_components(args: argparse.Namespace) -> int:
    print(format_table(["kind", "name", "paper"], [[c.kind, c.name, c.paper] for c in COMPONENTS]))
    return 0


def demo_plan(suite: str, methods: tuple[str, ...] | None) -> list[tuple[str, tuple[str, ...]]]:
    """(suite, methods) pairs to run: the named methods grouped by suite, or every method of the chosen suites."""
    suites = tuple(SUITES) if suite == "all" else (suite,)
    if methods is None:
        return [(name, suite_methods(name)) for name in suites]
    outside = [name for name in methods if DEMO_METHODS[name].suite not in suites]
    if outside:
        raise ValueError(f"--methods {','.join(outside)} are not in --suite {suite}")
    plan = [(name, tuple(m for m in methods if DEMO_METHODS[m].suite == name)) for name in suites]
    return [(name, chosen) for name, chosen in plan if chosen]


def run_demo_command(args: argparse.Namespace) -> int:
    quiet_libraries()
    for suite, methods in demo_plan(args.suite, args.methods):
        settings = DemoSettings(
            task=args.model,
            suite=suite,
            methods=methods,
            steps=args.steps,
            batch_size=args.batch_size,
            eval_size=args.eval_size,
            rank=args.rank,
            rank_overrides={} if args.loraxs_rank is None else {"loraxs": args.loraxs_rank},
            output_dir=args.output_dir / suite,
        )
        start = time.perf_counter()
        results = run_demo(settings)
        wall_seconds = time.perf_counter() - start

        header, rows = results.table()
        print(f"\n{suite}: {SUITES[suite]}\n")
        print(format_table(header, rows))
        print()
        print("\n".join(results.notes()))
        print(f"Wrote results.json and comparison.png to {settings.output_dir} in {wall_seconds:.0f} s.")
    return 0


def _int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}{why}, got {text!r}")
        return value

    return parse


def _method_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in DEMO_METHODS]
    if unknown or not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(DEMO_METHODS)}; got {text!r} "
            f"(unknown: {', '.join(repr(name) for name in unknown)})"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected each method at most once, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-eff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    list_parser = commands.add_parser("list", help="List every registered component with its paper.")
    list_parser.set_defaults(handler=list_components)

    minilm, smollm2 = TASKS["minilm"], TASKS["smollm2"]
    demo = commands.add_parser(
        "demo",
        help="Fine-tune a real model on IMDB with each hf_eff adapter and optimizer, and compare them.",
        description=(
            "Fine-tunes a pretrained model on IMDB, offline, each method in its own process. Suite 'adapters': PEFT's "
            "LoRA and each hf_eff adapter at the same rank; suite 'optimizers': full fine-tuning with torch AdamW "
            "and each hf_eff optimizer. One table per suite: trainable parameters and checkpoint bytes (adapters), "
            "optimizer-state bytes, peak memory, step time relative to the suite's first method, and the eval metric. "
            "Also writes results.json, comparison.png and the adapters to --output-dir/<suite>. --model minilm ({minilm.summary}) takes a few minutes on 2 CPU cores; "
            f"--model smollm2 ({smollm2.summary}, 30 layers) is about 10x slower per step, so its defaults are smaller."
        ),
    )
    demo.add_argument(
        "--suite",
        choices=[*SUITES, "all"],
        default="all",
        help="which comparison to run (default: %(default)s)",
    )
    demo.add_argument(
        "--methods",
        type=_method_list,
        help=f"comma-separated methods to compare (default: every method of --suite; any of {','.join(DEMO_METHODS)})",
    )
    demo.add_argument(
        "--model", choices=sorted(TASKS), default="minilm", help="the model and its IMDB task (default: %(default)s)"
    )
    demo.add_argument(
        "--steps",
        type=_int_at_least(3, " (2 warm-up steps plus at least one timed step)"),
        help=f"training steps per method (default: {minilm.default_steps} for minilm, "
        f"{smollm2.default_steps} for smollm2)",
    )
    demo.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        help=f"training batch size (default: {minilm.default_batch_size} for minilm, "
        f"{smollm2.default_batch_size} for smollm2)",
    )
    demo.add_argument(
        "--rank",
        type=_int_at_least(1),
        default=8,
        help="rank r of every adapter and of GaLore's projections (default: %(default)s)",
    )
    demo.add_argument("--loraxs-rank", type=_int_at_least(1), help="rank of LoRA-XS only (default: --rank)")
    demo.add_argument(
        "--eval-size",
        type=_int_at_least(1),
        help=f"held-out test reviews to evaluate on (default: {minilm.default_eval_size} for minilm, "
        f"{smollm2.default_eval_size} for smollm2)",
    )
    demo.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/demo"),
        help="where the results are written (default: %(default)s)",
    )
    demo.set_defaults(handler=run_demo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            demo_plan(args.suite, args.methods)
        except ValueError as error:
            parser.error(str(error))
    try:
        return args.handler(args)
    except AssetUnavailableError as error:
        print(f"hf-eff: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
