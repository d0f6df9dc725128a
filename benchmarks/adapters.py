"""Compares hf_eff's adapters with PEFT LoRA: trainable parameters, forward+backward time and checkpoint size."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from tables import render
from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification

import hf_eff  # importing it registers the adapters with PEFT
from hf_eff import BlockLoraConfig, LoraXSConfig, ShareLoraConfig

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROBERTA_QV = ["query", "value"]
# PEFT matches list entries as name suffixes at a "." boundary: these hit the attention output and the FFN output
# projections of every layer but not `classifier.dense` (checked against the matched module names below).
ROBERTA_GLUE = ["query", "value", "attention.output.dense", "output.dense"]
BLOCKS = 4
LORA = "LoRA (PEFT)"
XS_NO_FACTORS = "LoRA-XS (save_factors=False)"

METHODS = {
    LORA: lambda r, alpha, targets: LoraConfig(r=r, lora_alpha=alpha, target_modules=targets),
    "ShareLoRA A": lambda r, alpha, targets: ShareLoraConfig(r=r, lora_alpha=alpha, target_modules=targets, share="A"),
    "ShareLoRA B": lambda r, alpha, targets: ShareLoraConfig(r=r, lora_alpha=alpha, target_modules=targets, share="B"),
    "ShareLoRA AB": lambda r, alpha, targets: ShareLoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, share="AB"
    ),
    "LoRA-XS": lambda r, alpha, targets: LoraXSConfig(r=r, lora_alpha=alpha, target_modules=targets),
    XS_NO_FACTORS: lambda r, alpha, targets: LoraXSConfig(
        r=r, lora_alpha=alpha, target_modules=targets, save_factors=False
    ),
    f"Block-LoRA n={BLOCKS}": lambda r, alpha, targets: BlockLoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, num_blocks=BLOCKS
    ),
}
# save_factors changes only the checkpoint, so the parameter and timing tables list LoRA-XS once.
COMPUTE_METHODS = [label for label in METHODS if label != XS_NO_FACTORS]
TIME_GOALS = {"ShareLoRA": 1.1, "LoRA-XS": 1.1, "Block-LoRA": 1.0}


# --- models ---------------------------------------------------------------------------------------------------------


def llama_7b_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )


def roberta_large_config() -> RobertaConfig:
    return RobertaConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        num_labels=2,
    )


def small_llama_config(quick: bool) -> LlamaConfig:
    """The model of the timing and small-checkpoint tables (tiny with --quick)."""
    if quick:
        hidden, intermediate, layers, heads, vocab = 64, 176, 2, 4, 512
    else:
        hidden, intermediate, layers, heads, vocab = 512, 1376, 4, 8, 8000
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
    )


def describe(config: LlamaConfig) -> str:
    return (
        f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, vocab {config.vocab_size}"
    )


def build_small(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def meta_peft_model(model_cls: type, config, peft_config) -> peft.PeftModel:
    """A PEFT model on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        model = model_cls(config)
    return get_peft_model(model, peft_config, low_cpu_mem_usage=True)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_dict_bytes(model: peft.PeftModel) -> int:
    return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(model).values())


# --- table 1 (and the 7B column of table 3): counts on the meta device -----------------------------------------------


def count_on_meta(model_cls: type, config, label: str, r: int, targets: list[str]) -> dict:
    """Trainable parameters, adapter state-dict bytes and adapted module names, or the error the method raised."""
    try:
        model = meta_peft_model(model_cls, config, METHODS[label](r, 2 * r, targets))
    except Exception as exc:  # reported in the output, not hidden
        return {"error": f"{type(exc).__name__}: {exc}"}
    shared = getattr(model.base_model, "sharelora_shared", {})
    return {
        "params": trainable_params(model),
        "bytes": state_dict_bytes(model),
        "modules": sorted(model.base_model.targeted_module_names),
        "shared": sorted(shared["default"].keys()) if "default" in shared else [],
    }


def count_settings(settings: list[tuple], labels: list[str]) -> dict:
    """{setting name: {method: count}} for settings (name, model class, config, r, targets)."""
    return {
        name: {label: count_on_meta(model_cls, config, label, r, targets) for label in labels}
        for name, model_cls, config, r, targets in settings
    }


def param_rows(counts: dict, labels: list[str]) -> list[list[str]]:
    rows = []
    for label in labels:
        row = [label]
        for per_method in counts.values():
            row += [fmt_count(per_method[label], "params"), fmt_ratio(per_method[LORA], per_method[label], "params")]
        rows.append(row)
    return rows


def loraxs_checks(counts: dict, settings: list[tuple], references: dict) -> list[str]:
    """Compares LoRA-XS's count with (adapted modules) × r² and a reference figure, and LoRA's count with it."""
    lines = []
    for name, _, _, r, _ in settings:
        xs, lora = counts[name]["LoRA-XS"], counts[name][LORA]
        if "error" in xs:
            lines.append(f"{name}: LoRA-XS failed: {xs['error']}")
            continue
        expected = len(xs["modules"]) * r * r
        line = (
            f"{name}: LoRA-XS {xs['params']:,} trainable, expected {len(xs['modules'])} modules × {r}² = "
            f"{expected:,} ({'ok' if xs['params'] == expected else 'MISMATCH'})"
        )
        if name in references:
            line += f"; reference: {references[name]}"
        if "params" in lora:
            ratio = lora["params"] / xs["params"]
            line += f"; LoRA/LoRA-XS = {ratio:,.1f}× (goal ≥ 100×: {'met' if ratio >= 100 else 'not met'})"
        lines.append(line)
    return lines


def shared_factors_note(counts: dict, name: str) -> str:
    """The tensors ShareLoRA shares in a setting (keys of its store: projection name, factor, shared dimension)."""
    shares = [f"{label}: {', '.join(count['shared'])}" for label, count in counts[name].items() if count.get("shared")]
    return f"{name}: ShareLoRA's shared tensors: " + "; ".join(shares)


def matched_modules_note(counts: dict, name: str) -> str:
    """Which module-name suffixes a setting adapted, to show e.g. that `classifier.dense` is not among them."""
    modules = counts[name][LORA].get("modules", [])
    suffixes = sorted({m.split(".layer.")[-1].split(".", 1)[-1] for m in modules})
    outside_layers = [m for m in modules if ".layer." not in m]
    return (
        f"{name}: {len(modules)} modules adapted, suffixes {suffixes}; outside the encoder layers: "
        f"{outside_layers or 'none'}"
    )


# --- table 2: forward+backward time ---------------------------------------------------------------------------------


def timing_models(config: LlamaConfig, r: int, alpha: float) -> dict[str, torch.nn.Module]:
    """The frozen base (reference) and one PEFT model per method, each built from the same seed."""
    base = build_small(config)
    base.requires_grad_(False)
    # Makes the embedding output require grad, so backward runs through every layer computing activation gradients
    # only: the work any adapter needs at least, without an adapter's own matmuls.
    base.enable_input_require_grads()
    models = {"base, frozen (reference)": base}
    for label in COMPUTE_METHODS:
        models[label] = get_peft_model(build_small(config), METHODS[label](r, alpha, LLAMA_TARGETS)).train()
    return models


def step_time(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Seconds of one forward (causal-LM cross-entropy on the random tokens) plus backward."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return time.perf_counter() - start


def time_round_robin(models: dict, input_ids: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """`repeats` rounds, each timing every model once; the start rotates per round to cancel order effects."""
    labels = list(models)
    for label in labels:
        for _ in range(warmup):
            step_time(models[label], input_ids)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(repeats):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            times[label].append(step_time(models[label], input_ids))
    return times


def time_goal(label: str) -> float | None:
    return next((goal for prefix, goal in TIME_GOALS.items() if label.startswith(prefix)), None)


def timing_rows(times: dict[str, list[float]]) -> list[list[str]]:
    rows = []
    for label, samples in times.items():
        # Ratio per round (same moment of the shared machine), then the median over rounds.
        ratio = statistics.median(t / ref for t, ref in zip(samples, times[LORA]))
        goal = time_goal(label)
        verdict = f"≤ {goal:.1f}×: {'met' if ratio <= goal else 'not met'}" if goal else ""
        rows.append(
            [
                label,
                f"{1e3 * statistics.median(samples):.1f}",
                f"{1e3 * min(samples):.1f}",
                f"{1e3 * max(samples):.1f}",
                f"{ratio:.3f}",
                verdict,
            ]
        )
    return rows


# --- table 3: checkpoint size of the small model --------------------------------------------------------------------


def checkpoint_file_bytes(config: LlamaConfig, label: str, r: int, alpha: float, directory: str) -> int:
    model = get_peft_model(build_small(config), METHODS[label](r, alpha, LLAMA_TARGETS))
    path = os.path.join(directory, str(list(METHODS).index(label)))
    model.save_pretrained(path)
    return os.path.getsize(os.path.join(path, "adapter_model.safetensors"))


def checkpoint_rows(small: dict[str, int], big: dict[str, dict]) -> list[list[str]]:
    rows = []
    for label in METHODS:
        rows.append(
            [
                label,
                f"{small[label]:,}",
                f"{small[LORA] / small[label]:.2f}",
                fmt_count(big[label], "bytes"),
                fmt_ratio(big[LORA], big[label], "bytes"),
            ]
        )
    return rows


# --- output ---------------------------------------------------------------------------------------------------------


def fmt_count(count: dict, key: str) -> str:
    return "error" if "error" in count else f"{count[key]:,}"


def fmt_ratio(reference: dict, count: dict, key: str) -> str:
    if "error" in reference or "error" in count:
        return "—"
    return f"{reference[key] / count[key]:,.2f}"


def error_notes(counts: dict) -> list[str]:
    return [
        f"{name} / {label} failed: {count['error']}"
        for name, per_method in counts.items()
        for label, count in per_method.items()
        if "error" in count
    ]


# --- main -----------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny timing model and 3 repetitions (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 3, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2, 1 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="timing batch size (default 4, 2 with --quick)")
    parser.add_argument("--seq-len", type=int, default=None, help="timing sequence length (default 128, 32 --quick)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args()
    defaults = {"threads": (2, 1), "repeats": (20, 3), "warmup": (3, 1), "batch": (4, 2), "seq_len": (128, 32)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def table_params(markdown: bool) -> tuple[str, dict]:
    """Table 1 (a) and (b); also returns the 7B r=64 counts that table 3 reuses."""
    llama, roberta = llama_7b_config(), roberta_large_config()
    llama_settings = [(f"LLaMA-2-7B r={r}", LlamaForCausalLM, llama, r, LLAMA_TARGETS) for r in (16, 64)]
    roberta_settings = [
        ("RoBERTa-large r=16 query,value", RobertaForSequenceClassification, roberta, 16, ROBERTA_QV),
        ("RoBERTa-large r=16 GLUE targets", RobertaForSequenceClassification, roberta, 16, ROBERTA_GLUE),
    ]
    llama_counts = count_settings(llama_settings[:1], COMPUTE_METHODS)
    llama_counts.update(count_settings(llama_settings[1:], list(METHODS)))
    roberta_counts = count_settings(roberta_settings, COMPUTE_METHODS)
    headers_a = ["method", "r=16 trainable", "LoRA/method", "r=64 trainable", "LoRA/method"]
    notes_a = [
        "meta device, targets q,k,v,o,gate,up,down_proj of all 32 layers; lora_alpha = 2r (no effect on counts)",
        *loraxs_checks(llama_counts, llama_settings, {"LLaMA-2-7B r=64": "paper, 32·7·64² = 917,504"}),
        *error_notes(llama_counts),
    ]
    headers_b = ["method", "query,value", "LoRA/method", "q,v,attn.out,out", "LoRA/method"]
    notes_b = [
        "meta device, r=16; q,v,attn.out,out = query, value, attention.output.dense, output.dense (LoRA-XS "
        "paper's GLUE setting); the classifier head (modules_to_save with task_type SEQ_CLS) is not counted",
        *[matched_modules_note(roberta_counts, name) for name, *_ in roberta_settings],
        shared_factors_note(roberta_counts, roberta_settings[1][0]),
        *loraxs_checks(
            roberta_counts,
            roberta_settings,
            {"RoBERTa-large r=16 GLUE targets": "paper ≈ 24.6K", "RoBERTa-large r=16 query,value": "24·2·16² = 12,288"},
        ),
        *error_notes(roberta_counts),
    ]
    text = render(
        "Table 1a: trainable parameters, LLaMA-2-7B config",
        headers_a,
        param_rows(llama_counts, COMPUTE_METHODS),
        notes_a,
        markdown,
    )
    text += "\n" + render(
        "Table 1b: trainable parameters, RoBERTa-large config",
        headers_b,
        param_rows(roberta_counts, COMPUTE_METHODS),
        notes_b,
        markdown,
    )
    return text, llama_counts["LLaMA-2-7B r=64"]


def table_time(args: argparse.Namespace, config: LlamaConfig) -> str:
    r, alpha = 8, 16
    models = timing_models(config, r, alpha)
    input_ids = torch.randint(
        0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    times = time_round_robin(models, input_ids, args.warmup, args.repeats)
    headers = ["method", "median ms", "min ms", "max ms", "×LoRA", "goal"]
    notes = [
        f"small Llama ({describe(config)}), batch {args.batch} × seq {args.seq_len}, fp32, CPU, "
        f"torch threads: {torch.get_num_threads()}; r={r}, lora_alpha={alpha}, q,k,v,o,gate,up,down_proj",
        f"{args.warmup} warm-up steps per model, then {args.repeats} rounds timing every model once (round-robin, "
        "rotating start); ×LoRA is the median over rounds of (method time / LoRA time in the same round)",
        "step = forward with causal-LM cross-entropy on random tokens + backward; grads zeroed outside the timing",
        "reference: the base model with every weight frozen and `enable_input_require_grads()`, so backward "
        "computes activation gradients through all layers but no weight gradient",
    ]
    return render("Table 2: forward+backward time vs PEFT LoRA", headers, timing_rows(times), notes, args.markdown)


def table_checkpoint(args: argparse.Namespace, config: LlamaConfig, big: dict[str, dict]) -> str:
    r, alpha = 8, 16
    with tempfile.TemporaryDirectory() as directory:
        small = {label: checkpoint_file_bytes(config, label, r, alpha, directory) for label in METHODS}
    headers = ["method", "small r=8 file bytes", "LoRA/method", "7B r=64 state-dict bytes", "LoRA/method"]
    notes = [
        f"small: `save_pretrained` of the table 2 model ({describe(config)}), size of adapter_model.safetensors",
        "7B: Σ numel × element_size over `get_peft_model_state_dict` of the meta-device model of table 1a, fp32, "
        "no file written",
        "LoRA-XS without a suffix has save_factors=True (the default); both variants store a 9-number float64 "
        "fingerprint per module",
        *error_notes({"LLaMA-2-7B r=64": big}),
    ]
    return render("Table 3: checkpoint size vs PEFT LoRA", headers, checkpoint_rows(small, big), notes, args.markdown)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"hf_eff {hf_eff.__version__}; torch threads: {torch.get_num_threads()}{'; --quick' if args.quick else ''}\n"
    )
    small = small_llama_config(args.quick)
    params_text, big = table_params(args.markdown)
    print(params_text)
    print(table_time(args, small))
    print(table_checkpoint(args, small, big))
    print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
