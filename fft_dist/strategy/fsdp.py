"""parallelism=fsdp: PyTorch FSDP2 (fully_shard per decoder layer, then the root).

Every parameter and optimizer state is a DTensor sharded along dim 0, so what a rank owns
is a contiguous range of the flattened tensor: exactly a checkpoint Fragment.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from fft_dist.config import ParallelismConfig, Precision, TrainConfig
from fft_dist.model import decoder_layers
from fft_dist.strategy.torch_common import TorchOptimizerStrategy


class FSDPStrategy(TorchOptimizerStrategy):
    name = "fsdp"

    def __init__(self, *, parallelism: ParallelismConfig, train: TrainConfig, device: torch.device, world_size: int):
        super().__init__(train=train, device=device, world_size=world_size)
        self.parallelism = parallelism
        self.mesh = init_device_mesh(device.type, (world_size,))

    def setup(self, *, build_model, make_optimizer, lr_at) -> None:
        model = build_model().to(self.device)
        if self.train_cfg.precision == Precision.fp32:
            mp = MixedPrecisionPolicy()
        else:
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        kwargs = {"mesh": self.mesh, "mp_policy": mp}
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.parallelism.reshard_after_forward, **kwargs)
        fully_shard(model, reshard_after_forward=self.parallelism.reshard_after_forward, **kwargs)
        self.model = model
        self._finish_setup(make_optimizer, lr_at)

    def _make_scaler(self):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type)

    def _grad_divide_factor(self) -> float:
        # FSDP2 averages gradients over ranks in reduce-scatter; our loss is already a global mean.
        return float(self.world_size)

    def _full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _owns_replicated(self) -> bool:
        return dist.get_rank() == 0

    def _local_range(self, tensor: torch.Tensor):
        if not isinstance(tensor, DTensor):
            return tensor.view(-1), tuple(tensor.shape), 0
        shape = tuple(tensor.shape)
        local = tensor.to_local()
        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        row = offset[0] if local.numel() else 0
        row_numel = 1
        for d in shape[1:]:
            row_numel *= d
        return local.view(-1), shape, row * row_numel
