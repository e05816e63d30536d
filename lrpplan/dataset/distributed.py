"""The little of ``torch.distributed`` that :func:`~lrpplan.dataset.explain_dataset` needs.

Under ``torchrun`` the environment names the process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``); :meth:`Comm.setup` joins the process group (gloo for CPU work,
nccl for CUDA devices) unless the caller already did, and :meth:`Comm.close` destroys it only
if it was created here. Every synchronisation is a sum all-reduce of a small int64 or float64
tensor, which is a barrier that also carries data (which shards are done, whether a rank
failed, timings), so no device-specific barrier is needed; only rank 0's plan keys travel as a
broadcast object (a few strings).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

__all__ = ["Comm", "RankFailed"]


class RankFailed(RuntimeError):
    """Another rank failed; its own error is in its log."""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class Comm:
    """This process's rank and world size, and a sum all-reduce over the process group.

    A single process (no process group, no ``torchrun`` environment) is rank 0 of 1 and every
    collective is the identity.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0,
                 device: Optional[torch.device] = None, created: bool = False) -> None:
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")  # where collective tensors live
        self.created = created

    @classmethod
    def setup(cls, device: Optional[torch.device]) -> "Comm":
        """Join (or reuse) the process group named by the environment.

        ``device``: the compute device; a CUDA device selects the nccl backend (and becomes the
        current CUDA device), anything else gloo.
        """
        import torch.distributed as dist

        local_rank = _env_int("LOCAL_RANK") or 0
        if dist.is_available() and dist.is_initialized():
            backend = str(dist.get_backend())
            coll = (torch.device("cuda", torch.cuda.current_device())
                    if "nccl" in backend else torch.device("cpu"))
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, coll, created=False)
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if rank is None or world is None or world <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
            return cls(rank, world, local_rank, device, created=True)
        dist.init_process_group("gloo")
        return cls(rank, world, local_rank, torch.device("cpu"), created=True)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``t`` over all ranks (a barrier); returns a CPU tensor."""
        if self.world == 1:
            return t.clone()
        import torch.distributed as dist

        buf = t.to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable; small) on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sync_failure(self, failed: bool, stage: str) -> None:
        """Barrier that also tells every rank whether any rank failed before it.

        The failing rank re-raises its own error afterwards; the others raise
        :class:`RankFailed`.
        """
        if self.world == 1:
            return
        flags = torch.zeros(self.world, dtype=torch.int64)
        flags[self.rank] = int(failed)
        flags = self.all_sum(flags)
        if not failed and bool(flags.any()):
            bad = [r for r in range(self.world) if flags[r]]
            raise RankFailed(f"rank(s) {bad} failed {stage}; see their error messages")

    def close(self) -> None:
        """Destroy the process group if :meth:`setup` created it."""
        if self.created:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.created = False
