"""``peftc train`` under ``torchrun``: joining the process group, DDP over the trainable parameters only,
and the collective operations the loop and the checkpoints need. Every function is a no-op (or the
single-process answer) without a launcher."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False               #: this call created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group a launcher (torchrun) describes in the environment; a no-op without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return Dist(rank, world, local, backend, True)


def teardown_distributed(dist_info: Dist) -> None:
    """Destroy the process group :func:`setup_distributed` created (not one it joined)."""
    if dist_info.owned:
        import torch.distributed as dist
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, dist_info: Dist, device: torch.device) -> nn.Module:
    """DDP over ``model`` that ignores every frozen parameter and every buffer: only trainable parameters
    are broadcast at construction and all-reduced in the backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def synchronised_parameters(ddp: nn.Module, model: nn.Module) -> list[str]:
    """Names in ``model`` of the parameters a DDP wrapper (of ``model`` or of its head split) keeps in
    sync (for tests and the log)."""
    keep = {id(p) for p in ddp._module_parameters}
    return [n for n, p in model.named_parameters() if id(p) in keep]


def all_reduce_sum(tensor: torch.Tensor, dist_info: Dist, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) summed over every rank, on the CPU."""
    if dist_info.world == 1:
        return tensor
    import torch.distributed as dist
    reduced = tensor.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def rng_states(dist_info: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state, rank 0 first (every rank must call it)."""
    state = torch.get_rng_state()
    if dist_info.world == 1:
        return [state]
    import torch.distributed as dist
    gathered: list = [None] * dist_info.world
    dist.all_gather_object(gathered, state)
    return gathered


def say(dist_info: Dist, message: str) -> None:
    """A line on stderr from rank 0."""
    if dist_info.main:
        print(message, file=sys.stderr, flush=True)
