"""parallelism=hsdp: FSDP2 on a 2-D DeviceMesh (replicate across groups, shard within a group).

Everything but the mesh and the checkpoint ownership is FSDP2's (:class:`FSDPStrategy`). Replicas of a
shard hold identical states, so only the ranks of the first replica group yield fragments: each
checkpoint range is written by exactly one rank. Loading reads every rank's own range, so any backend
and world size can resume from an HSDP checkpoint, and HSDP from theirs.
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from fft_dist.config import BatchPlan, FFTConfig
from fft_dist.dist import DistContext
from fft_dist.strategy.backends.hsdp import check_hsdp, local_world_size, shard_size
from fft_dist.strategy.fsdp import FSDPStrategy

MESH_DIMS = ("replicate", "shard")


class HSDPStrategy(FSDPStrategy):
    name = "hsdp"

    def _check(self, cfg: FFTConfig, plan: BatchPlan) -> None:
        check_hsdp(cfg, plan)

    def _make_mesh(self, cfg: FFTConfig, ctx: DistContext):
        self.shard_size = shard_size(cfg.parallelism, world_size=ctx.world_size, local_world_size=local_world_size(cfg))
        replicas = ctx.world_size // self.shard_size
        # rank = replica * shard_size + position: a group is shard_size consecutive ranks (one node by default)
        return init_device_mesh(ctx.device.type, (replicas, self.shard_size), mesh_dim_names=MESH_DIMS)

    def _replica(self) -> int:
        return self.mesh.get_local_rank("replicate")

    def fragments(self):
        """The first replica group's ranks own the checkpoint; the others reshard (FSDP2's state) and yield none."""
        if self._replica() != 0:
            self._reshard()
            return
        yield from super().fragments()

    def _owns_replicated(self) -> bool:
        return dist.get_rank() == 0
