"""Several processes on one image, under ``torchrun``: ranks share the tiles.

Every rank loads the same inputs, builds the same network and starts from the same image (the
noise is seeded).  Each rank runs the tiles ``share`` gives it; ``reduce`` sums Grams, the content
targets, the content loss and the image gradient over ranks (all_reduce), so every rank holds the
same gradient and takes the same optimiser step: the image stays identical everywhere without
ever being broadcast.  One GPU per rank (NCCL), or CPU processes (gloo).  Rank 0 alone prints
and writes files.

    torchrun --nproc-per-node=2 -m fastnst stylize content.jpg style.jpg -o out.png --tile 512
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import DeviceError


@dataclass
class Shard:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, tiles: list) -> list:
        """This rank's tiles: every world-th one, starting at its rank."""
        return tiles[self.rank :: self.world]

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), on every rank, in rank order."""
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (so all ranks stop together on Ctrl-C)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device: str = "auto") -> Shard | None:
    """Join the process group torchrun describes; None when not under torchrun."""
    if not launched():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA device is available; use --device cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DeviceError(f"rank {rank} needs GPU {local}, this node has {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Shard(rank=rank, world=world, device=target)


def close(shard: Shard | None) -> None:
    if shard is not None and dist.is_initialized():
        dist.destroy_process_group()
