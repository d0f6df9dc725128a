"""Trains the tiny Llama (float64 by default) with hf_eff optimizers under `accelerate`, for `test_distributed.py`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/optim/ddp_worker.py --optimizers galore_adamw spam --output-dir OUT --hyperparameters '{...}'

runs data-parallel (`Accelerator(cpu=True)` wraps the model in DDP over gloo; `accelerate launch --cpu
--num_processes 2` would start a single process unless mpirun is set up); `python tests/optim/ddp_worker.py ...` runs
the single-process reference; `--fsdp2` reports one FSDP2-sharded step per optimizer instead. Every
step uses the same global batch of GLOBAL_BATCH sequences whatever the number of processes: rank k takes rows
[k·B/W, (k+1)·B/W). The LM loss is the mean over a rank's tokens; the halves have the same number of tokens and DDP
averages gradients over ranks, so the all-reduced gradient is the gradient of the mean over the global batch, that is
the single-process gradient. Rank 0 writes OUT/<name>.pt: the unwrapped model's final state dict, the losses of the
global batch, and how the run was distributed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the tiny model config of conftest

from conftest import VOCAB, _llama  # noqa: E402

from hf_eff.optim import create_optimizer  # noqa: E402

STEPS = 6
GLOBAL_BATCH = 4
SEQUENCE_LENGTH = 8
LR = 1e-2


def global_batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQUENCE_LENGTH) token ids, the same on every rank."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQUENCE_LENGTH), generator=generator)


def train(accelerator: Accelerator, name: str, hyperparameters: dict, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = _llama().train().to(dtype)
    optimizer = create_optimizer(model, name, lr=LR, **hyperparameters)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    if GLOBAL_BATCH % world:
        raise ValueError(f"global batch {GLOBAL_BATCH} does not split over {world} processes")
    local = GLOBAL_BATCH // world
    losses = []
    for batch in global_batches():
        input_ids = batch[rank * local : (rank + 1) * local].to(accelerator.device)
        loss = wrapped(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    return {
        "state_dict": {k: v.detach().clone() for k, v in accelerator.unwrap_model(wrapped).state_dict().items()},
        "losses": losses,
        "num_processes": world,
        "distributed_type": str(accelerator.distributed_type),
        "wrapper": type(wrapped).__name__,
    }


def try_fsdp2(accelerator: Accelerator, name: str, hyperparameters: dict) -> dict:
    """Shards the tiny Llama with FSDP2 (`fully_shard`, DTensor parameters sharded on dim 0) and takes one step.

    Reports what happened instead of failing: the exception, if any; whether any parameter changed; and the type and
    placements of the state tensors the optimizer had created by then (a projector computed from a shard would be
    a plain tensor of the local shard's shape).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _llama().train()
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = {k: v.detach().full_tensor().clone() for k, v in model.state_dict().items()}
    optimizer = create_optimizer(model, name, lr=LR, **hyperparameters)
    local = GLOBAL_BATCH // accelerator.num_processes
    input_ids = global_batches()[0][accelerator.process_index * local : (accelerator.process_index + 1) * local]
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    error = None
    try:
        optimizer.step()
    except Exception as exception:  # noqa: BLE001 - reported to the test, which decides
        error = f"{type(exception).__name__}: {exception}"
    after = {k: v.detach().full_tensor() for k, v in model.state_dict().items()}
    state = {
        f"{index}.{key}": [type(value).__name__, list(value.shape), str(getattr(value, "placements", None))]
        for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"])
        for key, value in optimizer.state[param].items()
        if torch.is_tensor(value) and value.dim() == 2
    }
    return {
        "param_type": type(next(model.parameters())).__name__,
        "error": error,
        "changed": sorted(k for k in before if not torch.equal(before[k], after[k])),
        "state": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", required=True, help="registered hf_eff optimizer names")
    parser.add_argument("--output-dir", type=Path, required=True, help="rank 0 writes <name>.pt here")
    parser.add_argument(
        "--hyperparameters", default="{}", help="JSON object: optimizer name -> create_optimizer keywords"
    )
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="model and optimizer dtype")
    parser.add_argument("--fsdp2", action="store_true", help="report one FSDP2 step per optimizer instead (JSON)")
    args = parser.parse_args()
    hyperparameters = json.loads(args.hyperparameters)
    accelerator = Accelerator(cpu=True)
    if args.fsdp2:
        results = {name: try_fsdp2(accelerator, name, hyperparameters.get(name, {})) for name in args.optimizers}
        if accelerator.is_main_process:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            (args.output_dir / "fsdp2.json").write_text(json.dumps(results, indent=1))
        # A rank that tears its process group down while the other still completes the last collective aborts
        # ("terminate called without an active exception"), about 1 run in 20 without this barrier.
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return
    for name in args.optimizers:
        result = train(accelerator, name, hyperparameters.get(name, {}), getattr(torch, args.dtype))
        if accelerator.is_main_process:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            torch.save(result, args.output_dir / f"{name}.pt")
        accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
