"""Prefix-grouped GRPO ("Prefix Grouper") vs TRL's standard forward: policy forward+backward time and peak memory.

One group per batch: a prompt of P tokens shared by G completions of C tokens (no padding, so the standard forward
gets SDPA's causal fast path: the conservative baseline). A small Llama (hidden 256, 4 layers, GQA 4/2 heads, vocab
8192, fp32) on CPU. Each step is hf_eff's `GRPOTrainer._get_per_token_logps_and_entropies` (the policy pass TRL's
loss makes, entropies included) followed by backward of a GRPO-style loss; `prefix_grouping` is switched between
False (TRL's own code path), True and "auto" on the same trainer and model.

Time: process CPU time of one step with one intra-op thread (on a shared machine CPU time counts the work done, not
the time spent waiting for a core). Each round runs the three paths back to back (in rotating order); a speedup is
the median over rounds of that round's standard time over the path's time, so that rounds under different machine
load are compared only with themselves. Seconds are medians too.
Memory: peak resident-set growth during one step (Linux VmHWM, reset through /proc/self/clear_refs before the step),
measured in a child process run with MALLOC_MMAP_THRESHOLD_=65536, so that every tensor above 64 KiB gets its own
mapping returned on free (glibc would otherwise keep freed heap memory and hide part of the growth). The setting
slows allocation, which is why time is measured in this process and memory in the child.

With `--device cuda` (and e.g. `--dtype bfloat16`), time is wall-clock time between CUDA synchronizations and memory
is the growth of `torch.cuda.max_memory_allocated` during the step, both in this process; the grouped path then uses
the highest-priority prefix-grouped backend that accepts CUDA inputs (hf_eff's Triton kernel when the `triton`
extra is installed), named in the table's notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import transformers
from tables import cpu_name, render

from hf_eff.trainers import GRPOConfig, GRPOTrainer
from hf_eff.trainers.grpo import pack_groups
from hf_eff.trainers.grpo.attention import select_backend
from hf_eff.trainers.grpo.trainer import AUTO_MIN_ESTIMATED_SPEEDUP

MMAP_THRESHOLD = "65536"

VOCAB = 8192
PATHS = ("standard", "grouped", "auto")
MODES = {"standard": False, "grouped": True, "auto": "auto"}
MAX_ROUNDS = 20


def small_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, VOCAB)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="w2"
    )


def build_trainer(output_dir: str, device: str, dtype: torch.dtype) -> GRPOTrainer:
    from datasets import Dataset

    args = GRPOConfig(
        output_dir=output_dir, use_cpu=device == "cpu", bf16=False, report_to="none", gradient_checkpointing=False,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(
            model=small_llama().to(dtype), reward_funcs=lambda completions, **kwargs: [0.0] * len(completions), args=args,
            train_dataset=Dataset.from_dict({"prompt": ["w2 w3"] * 4}), processing_class=word_tokenizer(),
        )  # fmt: skip


def group_batch(
    group_size: int, prompt_length: int, completion_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(prompt_length * 100 + group_size)
    prompt = torch.randint(2, VOCAB, (prompt_length,), generator=generator).expand(group_size, -1)
    completions = torch.randint(2, VOCAB, (group_size, completion_length), generator=generator)
    input_ids = torch.cat([prompt, completions], dim=1).to(device)
    return input_ids, torch.ones_like(input_ids)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def policy_step(trainer: GRPOTrainer, input_ids, attention_mask, completion_length) -> tuple[float, float]:
    """One policy forward+backward; returns (seconds, peak memory growth in MiB: resident set on CPU, allocated
    device memory on CUDA)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    advantages = torch.linspace(-1, 1, input_ids.shape[0], device=input_ids.device).unsqueeze(1)
    on_cuda = input_ids.is_cuda
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**20
        start = time.perf_counter()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current resident set
        resident = _status_mib("VmRSS")
        start = time.process_time()
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_length, compute_entropy=True
    )
    loss = -(logps.float() * advantages).sum() / logps.numel() + 0.0 * entropies.sum()
    loss.backward()
    if on_cuda:
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20 - resident
    return time.process_time() - start, _status_mib("VmHWM") - resident


def time_paths(trainer, group_size, prompt_length, completion_length, repeats, min_seconds):
    """Per-round CPU seconds of each path, whether "auto" grouped, and its FLOP estimate.

    At least `repeats` rounds, more (up to MAX_ROUNDS) until every path has run `min_seconds` in all: short steps are
    the noisiest, and they are cheap to repeat.
    """
    input_ids, attention_mask = group_batch(group_size, prompt_length, completion_length, trainer.model.device)
    times = {path: [] for path in PATHS}
    auto_grouped = None
    round_index = 0
    while round_index < repeats or (
        round_index < MAX_ROUNDS and min(sum(values) for values in times.values()) < min_seconds
    ):
        # Rotated each round, so that no path always runs right after the same other one.
        for path in PATHS[round_index % 3 :] + PATHS[: round_index % 3]:
            trainer.prefix_grouping = MODES[path]
            times[path].append(policy_step(trainer, input_ids, attention_mask, completion_length)[0])
            if path == "auto":
                auto_grouped = trainer._metrics["train"]["prefix_grouping/grouped_fraction"][-1] == 1.0
        round_index += 1
    packed = pack_groups(input_ids, attention_mask, completion_length)
    estimate = trainer._estimated_speedup(input_ids, attention_mask, packed)
    return times, auto_grouped, estimate


def peak_memory(trainer, configurations, completion_length) -> dict[str, dict[str, float]]:
    """{"G,P": {"standard": MiB, "grouped": MiB}} for each (group size, prompt length)."""
    peaks = {}
    for group_size, prompt_length in configurations:
        input_ids, attention_mask = group_batch(group_size, prompt_length, completion_length, trainer.model.device)
        peaks[f"{group_size},{prompt_length}"] = {}
        for path in ("standard", "grouped"):
            trainer.prefix_grouping = MODES[path]
            peaks[f"{group_size},{prompt_length}"][path] = policy_step(
                trainer, input_ids, attention_mask, completion_length
            )[1]
    return peaks


def grouped_backend(model: torch.nn.Module) -> str:
    """The prefix-grouped attention backend the grouped path runs on for this model's device and dtype."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    query = torch.zeros(1, config.num_attention_heads, 8, head_dim, device=model.device, dtype=model.dtype)
    key = torch.zeros(1, config.num_key_value_heads, 8, head_dim, device=model.device, dtype=model.dtype)
    return select_backend(query, key, key).name


def warm_up(trainer, completion_length) -> None:
    """First calls pay for lazy initialization; keep that out of every measured configuration."""
    input_ids, attention_mask = group_batch(2, 16, completion_length, trainer.model.device)
    for path in ("standard", "grouped"):
        trainer.prefix_grouping = MODES[path]
        policy_step(trainer, input_ids, attention_mask, completion_length)


def memory_in_child(args) -> dict[str, dict[str, float]]:
    command = [
        sys.executable, os.path.abspath(__file__), "--memory-only", "--groups", args.groups, "--prompts", args.prompts,
        "--completion", str(args.completion), "--threads", str(args.threads), "--dtype", args.dtype,
    ]  # fmt: skip
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", default="4,8,16", help="group sizes G (default 4,8,16)")
    parser.add_argument(
        "--prompts", default="32,64,128,256,512,1024,2048", help="prompt lengths (default 32,64,128,…,2048)"
    )
    parser.add_argument("--completion", type=int, default=128, help="completion length (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="least timed rounds per configuration (default 3)")
    parser.add_argument(
        "--min-seconds", type=float, default=8.0, help="more rounds until each path ran this long (default 8)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype (default float32)"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the memory child's mode
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    configurations = [(int(g), int(p)) for g in args.groups.split(",") for p in args.prompts.split(",")]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(output_dir, args.device, dtype)
        trainer.model.train()
        warm_up(trainer, args.completion)
        if args.memory_only:
            print(json.dumps(peak_memory(trainer, configurations, args.completion)))
            return
        timings = {
            (g, p): time_paths(trainer, g, p, args.completion, args.repeats, args.min_seconds) for g, p in configurations
        }
        backend = grouped_backend(trainer.model)
        # CUDA's allocator reports its own peak, exactly; on CPU the resident set needs a child with its own malloc.
        on_cpu = args.device == "cpu"
        peaks = memory_in_child(args) if on_cpu else peak_memory(trainer, configurations, args.completion)
    rows = []
    for (group_size, prompt_length), (times, auto_grouped, estimate) in timings.items():
        peak = peaks[f"{group_size},{prompt_length}"]
        speedup = {
            path: statistics.median(s / t for s, t in zip(times["standard"], times[path])) for path in ("grouped", "auto")
        }
        seconds = {path: statistics.median(values) for path, values in times.items()}
        tokens = group_size * (prompt_length + args.completion)
        packed_tokens = prompt_length - 1 + group_size * (args.completion + 1)
        rows.append([
            f"G={group_size} P={prompt_length}",
            f"{tokens / packed_tokens:.2f}x",
            f"{estimate:.2f}x",
            f"{seconds['standard']:.2f}",
            f"{seconds['grouped']:.2f}",
            f"{speedup['grouped']:.2f}x",
            "grouped" if auto_grouped else "standard",
            f"{speedup['auto']:.2f}x",
            str(len(times["standard"])),
            f"{peak['standard']:.0f}",
            f"{peak['grouped']:.0f}",
            f"{peak['standard'] / max(peak['grouped'], 1e-9):.2f}x",
        ])  # fmt: skip
    headers = [
        "batch", "token bound", "est. FLOP ratio", "standard s", "grouped s", "grouped speedup", "auto uses",
        "auto speedup", "rounds", "standard MiB", "grouped MiB", "memory ratio",
    ]  # fmt: skip
    machine = (
        f"CPU ({cpu_name()}, {os.cpu_count()} cores), {args.threads} intra-op thread(s)"
        if on_cpu
        else f"{torch.cuda.get_device_name()}"
    )
    notes = [
        f"small Llama (hidden 256, 4 layers, 4/2 heads, vocab {VOCAB}), {args.dtype}, {machine}; completions of "
        f"{args.completion} tokens; policy forward+backward (log-probs and entropies through TRL's fused LM head); "
        f"grouped attention backend: {backend}",
        ("s = process CPU seconds" if on_cpu else "s = wall-clock seconds between CUDA synchronizations")
        + " of one step (median over rounds); speedup = median over rounds of the round's "
        f"standard time / the path's time; rounds: at least {args.repeats}, more until each path ran "
        f"{args.min_seconds:g} s, at most {MAX_ROUNDS}",
        "token bound = G·(P+C) / (P−1 + G·(C+1)): tokens of the standard batch over tokens of the packed row",
        f"auto groups when the estimated FLOP ratio is at least {AUTO_MIN_ESTIMATED_SPEEDUP}x",
        "MiB = peak resident-set growth during one step (VmHWM after a clear_refs reset, MALLOC_MMAP_THRESHOLD_="
        f"{MMAP_THRESHOLD}, separate process)"
        if on_cpu
        else "MiB = growth of torch.cuda.max_memory_allocated during one step (after reset_peak_memory_stats)",
    ]
    title = f"Prefix-grouped GRPO policy step vs standard ({'CPU' if on_cpu else 'CUDA'})"
    print(render(title, headers, rows, notes, args.markdown))


if __name__ == "__main__":
    main()
