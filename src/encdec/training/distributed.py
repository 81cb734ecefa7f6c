"""Process-group set-up for `torchrun` / `accelerate launch`, kept apart from the model.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain
`encdec pretrain` runs as a single process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from encdec.errors import EncdecError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def accelerate_settings_ignored(fsdp: bool, precision: str, grad_accum: int) -> list[str]:
    """What `accelerate launch` (its flags, or the `accelerate config` file it reads unasked) set for the run that
    encdec does not take from it, where encdec's own options differ: said, since its own options decide (FSDP
    asked of accelerate ran DDP, one whole model per GPU, without a word). `precision`: the one the run uses."""
    env = os.environ
    said = []
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not fsdp:
        said.append("FSDP (encdec's --fsdp shards the model; without it each process holds the whole model, DDP)")
    asked = env.get("ACCELERATE_MIXED_PRECISION", "no")  # "no", accelerate's default, asks nothing (the shipped
    # config's: encdec's --precision decides)
    if asked != "no" and not (asked == "bf16" and precision == "bf16"):
        said.append(f"mixed precision {asked} (encdec's --precision decides: {precision} here; it offers "
                    "fp32 and bf16)")
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps is not None and steps != str(grad_accum):
        said.append(f"gradient accumulation {steps} steps (encdec's --grad-accum decides: {grad_accum} here)")
    return said


def init(timeout: float = 1800.0) -> Dist:
    """This process's place in the run; `timeout`: seconds a collective waits for the other processes."""
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_RANK", "0")
    if _digits(world) and _digits(local):  # ASCII digits: int() took '٢' and '2_0' too
        world, local = int(world), int(local)
    else:
        raise EncdecError(f"WORLD_SIZE ({os.environ.get('WORLD_SIZE')!r}) and LOCAL_RANK "
                          f"({os.environ.get('LOCAL_RANK')!r}) must be integers, as torchrun sets them")
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ and "ACCELERATE_USE_CPU" in os.environ:
        # accelerate's simple launcher (--num_processes N with --cpu, or no multi-GPU configuration) starts one
        # process and names an address for N: it trained alone, on a global batch N times smaller, without a word
        raise EncdecError("accelerate launch started this one process for several (its simple launcher sets "
                          "MASTER_ADDR but no WORLD_SIZE or RANK; encdec reads no MPI variables): launch with "
                          "--multi_gpu or the shipped configs/accelerate-multi-gpu.yaml (CPU processes too), or "
                          "torchrun --nproc-per-node N; meant to run one process, unset MASTER_ADDR")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if world > 1 and missing and not dist.is_initialized():  # WORLD_SIZE left in a shell, say
        raise EncdecError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: start the processes with "
                          "torchrun or accelerate launch, which set them, or unset WORLD_SIZE to run one process")
    _check_launch(world)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()  # 1: a launcher that shows each process its own GPU (Slurm's)
        if world > 1 and count > 1 and "LOCAL_RANK" not in os.environ:
            raise EncdecError("LOCAL_RANK is not set, so every process would take GPU 0: start the processes with "
                              "torchrun or accelerate launch, or show each process one GPU (CUDA_VISIBLE_DEVICES)")
        if count > 1 and local >= count:
            raise EncdecError(f"LOCAL_RANK {local}, but this process sees {count} GPUs: at most one process per GPU "
                              f"(torchrun --nproc-per-node {count})")
        on_node = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun's (and accelerate's); Slurm's srun sets none
        one_each = count == 1 and _digits(on_node) and int(on_node) > 1  # several processes here, each shown one
        if one_each and not os.environ.get("CUDA_VISIBLE_DEVICES"):  # NCCL's "invalid usage" blamed another process
            raise EncdecError(f"{on_node} processes on this node but it shows them 1 GPU, which every process would "
                              "take: at most one process per GPU (torchrun --nproc-per-node 1), or show each process "
                              "its own GPU (CUDA_VISIBLE_DEVICES)")
        device = torch.device(f"cuda:{local if count > 1 else 0}")
    if world == 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    if device.type == "cuda":  # the same GPU shown to several processes? Every process takes part, whatever its
        try:  # machine shows it (a process that decided alone to compare left the others waiting)
            _check_gpus_apart(world, device, timeout)
        except EncdecError:
            dist.destroy_process_group()  # refused: the group goes, as `close` tears it down
            raise
    return Dist(dist.get_rank(), world, device)


def _digits(text: str) -> bool:
    """ASCII digits: str.isdigit() takes "²", which int() refuses (a traceback)."""
    return text.isascii() and text.isdigit()


def _check_launch(world: int) -> None:
    """The launcher's other variables, as torchrun sets them: a ValueError's traceback from the process group
    otherwise."""
    if world < 1:
        raise EncdecError(f"WORLD_SIZE is {world}: the number of processes is at least 1 (unset it to run one)")
    if world == 1:
        return
    rank, port = os.environ.get("RANK", "0"), os.environ.get("MASTER_PORT", "0")
    if not _digits(rank) or int(rank) >= world:
        raise EncdecError(f"RANK is {rank!r}: each of the WORLD_SIZE {world} processes has a rank from 0 to "
                          f"{world - 1}, as torchrun and accelerate launch set it")
    if not _digits(port) or not 0 < int(port) < 65536:
        raise EncdecError(f"MASTER_PORT is {port!r}: a TCP port number (1 to 65535) on MASTER_ADDR")


def _check_gpus_apart(world: int, device: torch.device, timeout: float) -> None:
    """Refuse, on every process alike, a run whose processes on one machine were shown the same GPU (one
    CUDA_VISIBLE_DEVICES exported to all): compared by the GPUs' UUIDs over a CPU group, since NCCL's first
    collective fails on such a run with "invalid usage" blaming another process."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    every: list[Any] = [None] * world
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    dist.all_gather_object(every, mine, group=group)
    dist.destroy_process_group(group)
    shared = shared_gpus(every)
    if shared:
        ranks = shared[0]
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise EncdecError(f"processes {', '.join(map(str, ranks))} on {every[ranks[0]][0]} were shown the same GPU "
                          f"(CUDA_VISIBLE_DEVICES={shown} here): show each process its own GPU, or start one process "
                          "per GPU (torchrun --nproc-per-node)")


def shared_gpus(identities: list[tuple[str, str]]) -> list[list[int]]:
    """The ranks that share a GPU, a list per GPU shown to several, given each rank's (machine, GPU UUID)."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, identity in enumerate(identities):
        ranks.setdefault(tuple(identity), []).append(rank)
    return [shared for shared in ranks.values() if len(shared) > 1]


def wrap(model: nn.Module, blocks: list[nn.Module], d: Dist, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 with each block sharded on its own and the rest at the root."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def share(n: int, d: Dist) -> list[int | None]:
    """This process's share of `n` work items, round-robin, padded with None so that every process makes
    the same number of passes: under FSDP2 every forward pass runs collectives on all processes."""
    passes = -(-n // d.world)
    return [i if (i := p * d.world + d.rank) < n else None for p in range(passes)]


def reduce_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def from_main(value: Any, d: Dist) -> Any:
    """The first process's `value` on every process (a small picklable one, between this run's processes): what
    only the first one can tell, such as a verdict on the state it alone gathered."""
    if d.world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


@contextlib.contextmanager
def stopping_together(d: Dist) -> Iterator[None]:
    """Work that the first process does alone (the run directory's files): when it fails there, every process
    stops, the others with its line, where they would wait in the next collective until --dist-timeout."""
    failed = None
    try:
        yield
    except Exception as e:
        if d.world == 1:
            raise
        failed = e
    said = from_main(None if failed is None else str(failed) or type(failed).__name__, d)  # every process calls it
    if failed is not None:
        raise failed
    if said is not None:
        raise EncdecError(said)


def same_everywhere(value: int, d: Dist) -> bool:
    """Whether every process holds the same `value` (each learns the answer: a collective)."""
    if d.world == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] == -t[1])


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def close(d: Dist) -> None:
    """Tear the group down while the interpreter is fully alive. Once in four runs of tests/test_distributed.py
    (accelerate, DDP) a rank aborted at exit after finishing ("terminate called without an active exception"),
    the sign of gloo's group being destroyed during interpreter finalization; the run's DDP / FSDP wrappers,
    which hold the group, can sit in reference cycles that only a collection frees, so one runs first."""
    if d.world > 1 and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def in_sync(model: nn.Module, d: Dist) -> bool:
    """Whether every process holds the same parameters (replicated training only): per-tensor sums compared."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(d.device)
    gathered = [torch.empty_like(sums) for _ in range(d.world)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)
