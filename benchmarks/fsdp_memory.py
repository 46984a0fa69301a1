"""Memory per process of one training step under DDP and under FSDP (``--fsdp``), for ViT-B/16 and ViT-L/16.

    python -m benchmarks.fsdp_memory                                  # vit_b16 and vit_l16, 224 px, batch 1, CPU
    python -m benchmarks.fsdp_memory --networks vit_b16 --nproc 2     # one network
    python -m benchmarks.fsdp_memory --device cuda --batch-size 32    # NCCL, one GPU per process
    python -m benchmarks.fsdp_memory --tiny                           # a tiny ViT at 32 px: a smoke run

Each (network, mode) runs as ``--nproc`` fresh processes (gloo on the CPU, NCCL with ``--device cuda``), so every
peak is that run's own. Each process builds the network as ``birder-train`` does (DDP wrapping, or FSDP sharding
with :func:`birder.training.fsdp.shard_model`: one unit per block, then the root), takes one AdamW step over the
trainer's parameter groups on a random batch, and reports:

- the bytes of its parameters, gradients and AdamW state, counted from the tensors themselves after the step
  (under FSDP the local shards): the target is FSDP ~= 1/N of DDP;
- its peak resident set size (``VmHWM``) over its size before the model was built, the resident size after each
  stage, and with CUDA ``torch.cuda.max_memory_allocated``. DDP's peak includes its gradient buckets (a second copy
  of the gradients); FSDP's includes the whole model built once on every process before it is sharded, as the
  trainer does.

On the CPU the processes run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB (unless ``--malloc-default``
or already set): by default glibc raises that threshold as large blocks are freed and then keeps freed blocks in
its heap, so the resident size would go on counting FSDP's short-lived all-gather buffers (one block's full weights
at a time) long after they are freed, and measure the allocator rather than the training.
"""

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from birder.inference.optimize import cpu_model
from birder.io.atomic import atomic_write_text

MODES = ("ddp", "fsdp")
TINY_CONFIG = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128, "patch_size": 8}
NUM_CLASSES = 707  # the card's head


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:"))


def _local_bytes(tensors) -> int:
    """Bytes this process holds of ``tensors``: the local shard of a DTensor, else the whole tensor."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def _worker(rank: int, world_size: int, port: int, settings: dict, output: str) -> None:
    """One process of one (network, mode) run: writes its figures to ``output/<rank>.json``."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from birder.distributed import DistInfo
    from birder.model_registry import registry
    from birder.training.amp import amp_dtype, autocast
    from birder.training.fsdp import shard_model
    from birder.training.optim import build_optimizer, param_groups

    torch.set_num_threads(settings["threads"])
    device = torch.device("cuda", rank) if settings["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    info = DistInfo(rank, world_size, rank, device)
    dtype = amp_dtype(settings["amp"])
    baseline_rss = _status_bytes("VmRSS")

    torch.manual_seed(0)
    size = (settings["size"], settings["size"])
    net = registry.net_factory(settings["network"], NUM_CLASSES, config=settings["config"], size=size).to(device)
    stages = {"built": _status_bytes("VmRSS")}
    if settings["mode"] == "fsdp":
        shard_model(net, info, amp_dtype=dtype)
        model = net
    else:
        model = DistributedDataParallel(net, device_ids=[rank] if device.type == "cuda" else None)
    optimizer = build_optimizer("adamw", param_groups(net, 1e-4, 0.05))
    stages["wrapped"] = _status_bytes("VmRSS")

    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(settings["batch_size"], 3, *size, generator=generator).to(device)
    targets = torch.randint(NUM_CLASSES, (settings["batch_size"],), generator=generator).to(device)
    started = time.perf_counter()
    with autocast(device, dtype):
        loss = F.cross_entropy(model(images), targets)
    stages["forward"] = _status_bytes("VmRSS")
    loss.backward()
    stages["backward"] = _status_bytes("VmRSS")
    gradient_bytes = _local_bytes(p.grad for p in net.parameters() if p.grad is not None)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - started
    stages["step"] = _status_bytes("VmRSS")

    states = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    figures = {
        "rank": rank,
        "parameter_bytes": _local_bytes(net.parameters()),
        "gradient_bytes": gradient_bytes,
        "optimizer_bytes": _local_bytes(states),
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "step_s": step_s,
        # Resident size after each stage, over the baseline: where the peak comes from.
        "rss_after_bytes": {stage: value - baseline_rss for stage, value in stages.items()},
    }
    figures["peak_over_baseline_bytes"] = figures["peak_rss_bytes"] - baseline_rss
    if device.type == "cuda":
        figures["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    Path(output, f"{rank}.json").write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(settings: dict, nproc: int, env: dict[str, str]) -> list[dict]:
    """One (network, mode) run on ``nproc`` fresh processes with ``env`` added to their environment (read by the C
    library as they start); each process's figures, in rank order."""
    import torch.multiprocessing as mp

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_worker, args=(nproc, _free_port(), settings, folder), nprocs=nproc, join=True)
            return [json.loads(Path(folder, f"{rank}.json").read_text()) for rank in range(nproc)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# The table's columns (MiB, the largest over the processes) and the figures they show.
COLUMNS = (
    ("params MiB", "parameter_bytes"),
    ("grads MiB", "gradient_bytes"),
    ("AdamW MiB", "optimizer_bytes"),
    ("sum MiB", "state_bytes"),
    ("peak RSS MiB", "peak_rss_bytes"),
    ("peak - base MiB", "peak_over_baseline_bytes"),
)
CUDA_COLUMN = (("CUDA max MiB", "cuda_max_allocated_bytes"),)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["vit_b16", "vit_l16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1, help="per process (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=("bf16",), help="bf16: autocast, and FSDP gathers the blocks in bf16")
    parser.add_argument("--threads", type=int, help="per process (default: the CPU count / --nproc)")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT at 32 px, for a smoke run")
    parser.add_argument(
        "--malloc-default", action="store_true", help="CPU: measure with glibc's default heap settings (see above)"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/fsdp_memory.json"))
    args = parser.parse_args(argv)
    if args.nproc < 2:
        parser.error("--nproc must be 2 or more: sharding over one process shows nothing")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--device cuda needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}")
    if args.tiny:
        args.size = 32
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    env = {}
    if args.device == "cpu" and not args.malloc_default and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)

    machine = {"cpu_model": cpu_model(), "threads_per_process": threads, "torch": torch.__version__}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    report: dict = {"machine": machine, "nproc": args.nproc, "device": args.device, "size": args.size,
                    "batch_size": args.batch_size, "amp": args.amp or "float32", "environment": env,
                    "runs": []}  # fmt: skip
    where = machine.get("gpu", f"{machine['cpu_model']}, {threads} threads each")
    print(f"{args.nproc} processes on {where}, {args.size} px, batch {args.batch_size}, {report['amp']}")
    columns = COLUMNS + (CUDA_COLUMN if args.device == "cuda" else ())
    print(f"{'network':<9} {'mode':<5} " + " ".join(f"{title:>{len(title)}}" for (title, _) in columns))
    for network in args.networks:
        by_mode = {}
        for mode in MODES:
            settings = {"network": network, "mode": mode, "config": TINY_CONFIG if args.tiny else None,
                        "size": args.size, "batch_size": args.batch_size, "device": args.device, "amp": args.amp,
                        "threads": threads}  # fmt: skip
            ranks = run(settings, args.nproc, env)
            worst = {
                key: max(r[key] for r in ranks) for key, value in ranks[0].items() if isinstance(value, float | int)
            }
            worst["state_bytes"] = worst["parameter_bytes"] + worst["gradient_bytes"] + worst["optimizer_bytes"]
            by_mode[mode] = worst
            report["runs"].append({"network": network, "mode": mode, "per_rank": ranks, "max_over_ranks": worst})
            figures = " ".join(f"{worst[key] / 2**20:>{len(title)},.0f}" for (title, key) in columns)
            print(f"{network:<9} {mode:<5} {figures}")
        ratio = by_mode["fsdp"]["state_bytes"] / by_mode["ddp"]["state_bytes"]
        report.setdefault("fsdp_over_ddp_state", {})[network] = ratio
        print(f"{network:<9} FSDP / DDP parameters + gradients + AdamW state per process: {ratio:.3f} "
              f"(1/{args.nproc} = {1 / args.nproc:.3f})")  # fmt: skip

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
