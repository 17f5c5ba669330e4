"""parallelism=fsdp: PyTorch FSDP2 (fully_shard per decoder layer, then the root).

Every parameter and optimizer state is a DTensor sharded along dim 0, so what a rank owns
is a contiguous range of the flattened tensor: exactly a checkpoint Fragment.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from fft_dist.config import BatchPlan, FFTConfig, Precision
from fft_dist.dist import DistContext
from fft_dist.model import decoder_layers
from fft_dist.strategy.options import check_fsdp
from fft_dist.strategy.torch_common import TorchOptimizerStrategy


class FSDPStrategy(TorchOptimizerStrategy):
    name = "fsdp"

    def __init__(self, cfg: FFTConfig, plan: BatchPlan, ctx: DistContext):
        check_fsdp(cfg, plan)
        super().__init__(cfg, ctx)
        self.reshard_after_forward = cfg.parallelism.reshard_after_forward
        # Weights that come from model.path afterwards need not be initialised: build on meta.
        self.meta_init = cfg.model.path is not None
        self.mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))

    def setup(self, *, build_model, make_optimizer, lr_at) -> None:
        """Shard per decoder layer (parallelism.reshard_after_forward), then the root.

        The root (embeddings, final norm, lm_head) keeps FSDP2's default for a root (not resharded
        after forward): backward starts with the lm_head forward has just used, and resharding the
        root costs one more all-gather per step.

        With meta_init (weights come from model.path afterwards), the model is built on the meta
        device and only this rank's shards are ever allocated. Otherwise every rank builds the same
        seeded full model on CPU once and keeps its shards, which matches HF's own init exactly.
        """
        if self.meta_init:
            with torch.device("meta"):
                model = build_model()
        else:
            model = build_model().to(self.device)
        if self.train_cfg.precision == Precision.fp32:
            mp = MixedPrecisionPolicy()
        else:
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        kwargs = {"mesh": self.mesh, "mp_policy": mp}
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)
        if self.meta_init:
            model.to_empty(device=self.device)
            reinit_buffers(model)
        self.model = model
        self._finish_setup(make_optimizer, lr_at)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward(input_ids, attention_mask, position_ids)
        if not torch.is_grad_enabled():  # evaluation: no backward will reshard the root
            self._reshard()
        return logits

    def _reshard(self) -> None:
        """Free gathered parameters and register the shards again.

        FSDP2 keeps the root (and layers with reshard_after_forward=false) gathered from forward
        until backward; after a no-grad forward nothing else would reshard them, and the fragments
        must be the shards.
        """
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def fragments(self):
        self._reshard()
        yield from super().fragments()

    def load_fragments(self, source) -> None:
        self._reshard()
        super().load_fragments(source)

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


def reinit_buffers(model: torch.nn.Module) -> None:
    """Recompute non-persistent buffers (rotary inv_freq) lost by meta-device construction.

    Parameters are loaded from the checkpoint / HF folder afterwards; buffers are not stored there.
    """
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)) and not any(True for _ in module.parameters(recurse=False)):
            if init is None:
                raise RuntimeError(f"cannot re-create buffers of {type(module).__name__} after meta init")
            with torch.no_grad():
                init(module)
