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
from hf_eff.demo import DEMO_METHODS, TASKS, DemoSettings, run_demo
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
]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def list_components(args: argparse.Namespace) -> int:
    print(format_table(["kind", "name", "paper"], [[c.kind, c.name, c.paper] for c in COMPONENTS]))
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    quiet_libraries()
    settings = DemoSettings(
        task=args.model,
        methods=args.methods,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_size=args.eval_size,
        rank=args.rank,
        rank_overrides={} if args.loraxs_rank is None else {"loraxs": args.loraxs_rank},
        output_dir=args.output_dir,
    )
    start = time.perf_counter()
    results = run_demo(settings)
    wall_seconds = time.perf_counter() - start

    header, rows = results.table()
    print()
    print(format_table(header, rows))
    print()
    print("\n".join(results.notes()))
    print(f"Wrote results.json, comparison.png and adapters/ to {args.output_dir} in {wall_seconds:.0f} s.")
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
        help="Fine-tune a real model on IMDB with LoRA and each hf_eff adapter, and compare them.",
        description=(
            "Fine-tunes a pretrained model on IMDB, offline, with PEFT's LoRA and each hf_eff adapter at the same "
            "rank, each in its own process, and prints one table: trainable parameters, checkpoint bytes, peak "
            "memory, step time relative to LoRA and the eval metric. Also writes results.json, comparison.png and "
            f"the adapters to --output-dir. --model minilm ({minilm.summary}) takes a few minutes on 2 CPU cores; "
            f"--model smollm2 ({smollm2.summary}, 30 layers) is about 10x slower per step, so its defaults are smaller."
        ),
    )
    demo.add_argument(
        "--methods",
        type=_method_list,
        default=tuple(DEMO_METHODS),
        help=f"comma-separated methods to compare (default: all of {','.join(DEMO_METHODS)})",
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
    demo.add_argument("--rank", type=_int_at_least(1), default=8, help="rank r of every method (default: %(default)s)")
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
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except AssetUnavailableError as error:
        print(f"hf-eff: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
