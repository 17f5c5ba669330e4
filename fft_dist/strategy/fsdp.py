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
from fft_dist.device_defaults import DeviceDefaults
from fft_dist.dist import DistContext
from fft_dist.model import decoder_layers
from fft_dist.models.family import rebuild_buffers
from fft_dist.strategy.frozen import freeze
from fft_dist.strategy.initial import fill_from_rank0
from fft_dist.strategy.torch_common import TorchOptimizerStrategy


class FSDPStrategy(TorchOptimizerStrategy):
    name = "fsdp"

    def __init__(self, cfg: FFTConfig, plan: BatchPlan, ctx: DistContext, defaults: DeviceDefaults):
        self._check(cfg, plan)
        super().__init__(cfg, ctx, defaults)
        self.reshard_after_forward = cfg.parallelism.reshard_after_forward
        # Weights that come from model.path afterwards need not be initialised: build on meta.
        self.meta_init = cfg.model.path is not None
        self.mesh = self._make_mesh(cfg, ctx)

    def _check(self, cfg: FFTConfig, plan: BatchPlan) -> None:
        """The backend's own check, again on the rank (fsdp has none beyond the options it does not read,
        which make_strategy refuses; HSDP overrides this)."""

    def _make_mesh(self, cfg: FFTConfig, ctx: DistContext):
        """Every rank in one shard group (HSDP overrides this with a 2-D mesh)."""
        del cfg
        return init_device_mesh(ctx.device.type, (ctx.world_size,))

    def setup(self, *, build_model, make_optimizer, lr_at) -> None:
        """Shard per decoder layer (parallelism.reshard_after_forward), then the root.

        The root (embeddings, final norm, lm_head) keeps FSDP2's default for a root (not resharded
        after forward): backward starts with the lm_head forward has just used, and resharding the
        root costs one more all-gather per step.

        With meta_init (weights come from model.path afterwards), the model is built on the meta
        device and only this rank's shards are ever allocated. Otherwise rank 0 alone builds the
        seeded full model on CPU (HF's own init, bit for bit) and sends it tensor by tensor; the
        other ranks build on meta and allocate only their shards (:func:`fill_from_rank0`). Every
        rank building the full fp32 model cost N full copies of host memory per node.
        """
        self.model = self._build_sharded(build_model, reshard_after_forward=self.reshard_after_forward)
        self._finish_setup(make_optimizer, lr_at)

    def _build_sharded(self, build_model, *, reshard_after_forward: bool, prepare=None):
        """The model built (see :meth:`setup`), `prepare`d (the frozen model: :func:`freeze`), then sharded."""
        rank0_init = not self.meta_init and self.world_size > 1
        full = None
        if self.meta_init or rank0_init:
            with torch.device("meta"):
                model = build_model()
            if rank0_init and dist.get_rank() == 0:  # last, so the generator state is the one after it
                full = build_model()  # on CPU: only one tensor at a time goes to the device
        else:
            model = build_model().to(self.device)
        if prepare is not None:
            model = prepare(model)
            full = None if full is None else prepare(full)
        # Gradients are reduce-scattered in fp32 under every precision (stated, not left to FSDP2's default of
        # the parameters' dtype): bf16 reductions would round the sum of N ranks' gradients.
        mp = MixedPrecisionPolicy(param_dtype=None if self.precision == Precision.fp32 else self.compute_dtype,
                                  reduce_dtype=torch.float32)
        kwargs = {"mesh": self.mesh, "mp_policy": mp}
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)
        if self.meta_init or rank0_init:
            model.to_empty(device=self.device)
        if self.meta_init:
            rebuild_buffers(model)  # rotary frequencies, Gemma's embed_scale: transformers' own init
        if rank0_init:
            fill_from_rank0(model, full, local_range=self._local_range, device=self.device)
        return model

    def _build_frozen(self, build_model, dtype):
        """FSDP2 on the same mesh, every layer resharded after forward (no backward will)."""
        return self._build_sharded(build_model, reshard_after_forward=True, prepare=lambda m: freeze(m, dtype))

    def _frozen_after_forward(self, module) -> None:
        _reshard(module)  # the root stays gathered after forward otherwise (FSDP2's root default)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head=None):
        out = super().forward(input_ids, attention_mask, position_ids, head)
        if not torch.is_grad_enabled():  # evaluation: no backward will reshard the root
            self._reshard()
        return out

    def _reshard(self) -> None:
        """Free gathered parameters and register the shards again.

        FSDP2 keeps the root (and layers with reshard_after_forward=false) gathered from forward
        until backward; after a no-grad forward nothing else would reshard them, and the fragments
        must be the shards.
        """
        _reshard(self.model)

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


def _reshard(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
