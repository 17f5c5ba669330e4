"""Pieces shared by the strategies that drive a plain torch optimizer (none, fsdp)."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from fft_dist.config import FFTConfig, Precision
from fft_dist.device_defaults import DeviceDefaults
from fft_dist.dist import DistContext
from fft_dist.model import compile_layers
from fft_dist.models.head import Head, deferred_head
from fft_dist.optim import set_lr
from fft_dist.strategy.base import Capabilities, Fragment, FragmentSource, LrSchedule, Strategy, model_inputs
from fft_dist.strategy.frozen import TorchFrozenModel

OPTIMIZER_STATE_KINDS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer")
COMPUTE_DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


class TorchOptimizerStrategy(Strategy):
    """Common step / clip / loss-scaling / optimizer-state logic; subclasses shard (or not) the model."""

    name = "torch"
    capabilities = Capabilities(norm_in_update=False)

    def __init__(self, cfg: FFTConfig, ctx: DistContext, defaults: DeviceDefaults):
        self.train_cfg = cfg.train
        self.device = ctx.device
        self.world_size = ctx.world_size
        self.precision = defaults.precision  # decided on this rank: never auto
        self.compute_dtype = COMPUTE_DTYPES[self.precision]
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.lr_at: LrSchedule
        self.scaler = None

    # -- hooks for subclasses -------------------------------------------------------------
    def _grad_divide_factor(self) -> float:
        """How much the backend divides gradients by when it reduces them over ranks."""
        return 1.0

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _local_range(self, tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int]:
        """(1-D local view, full shape, flat offset) of a parameter or state tensor."""
        return tensor.view(-1), tuple(tensor.shape), 0

    def _owns_replicated(self) -> bool:
        return True

    def _build_frozen(self, build_model, dtype: torch.dtype | None) -> nn.Module:
        """The frozen model, built and sharded (or not) like the trainable one (see :meth:`host_frozen`)."""
        raise NotImplementedError

    def _frozen_after_forward(self, module: nn.Module) -> None:
        """What a no-grad forward of the frozen model leaves to undo (FSDP2: gathered parameters)."""

    # -- Strategy protocol ---------------------------------------------------------------
    def _finish_setup(self, make_optimizer, lr_at: LrSchedule) -> None:
        self.lr_at = lr_at
        if self.train_cfg.compile:  # after sharding: FSDP2's hooks wrap the compiled forward
            compile_layers(self.model)
        self.optimizer = make_optimizer(self.model)
        if self.precision == Precision.fp16:
            self.scaler = self._make_scaler()

    def _make_scaler(self):
        return torch.amp.GradScaler(self.device.type)

    def host_frozen(self, build_model, dtype: torch.dtype | None = None) -> TorchFrozenModel:
        module = self._build_frozen(build_model, dtype)
        return TorchFrozenModel(module, device=self.device, local_range=self._local_range, autocast=self._autocast,
                                after_forward=lambda: self._frozen_after_forward(module))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head: Head | None = None):
        with self._autocast(), deferred_head(self.model, head):  # FSDP2: inside the root's call, weights gathered
            return self.model(**model_inputs(input_ids, attention_mask, position_ids, self.device))

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss * self._grad_divide_factor()
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def grad_norm(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._trainable() if p.grad is not None]
        return self._full_norm(torch.nn.utils.get_total_norm(grads, norm_type=2.0))

    def apply_update(self, step: int, norm: float | None) -> float:
        set_lr(self.optimizer, self.lr_at(step))
        params = [p for p in self._trainable() if p.grad is not None]
        finite = norm is not None and math.isfinite(norm)  # the global norm: every rank takes the same branch
        if finite and self.train_cfg.max_grad_norm > 0:  # the norm was float32 on the device: exact round trip
            total = torch.tensor(norm, dtype=torch.float32, device=self.device)
            torch.nn.utils.clip_grads_with_norm_(params, self.train_cfg.max_grad_norm, total)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when the unscaled grads overflow
            self.scaler.update()
        elif finite:  # a NaN/inf gradient never reaches the weights or the optimizer state
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float("nan") if norm is None else norm

    def _full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # -- checkpoint fragments --------------------------------------------------------------
    def ensure_optimizer_state(self) -> None:
        """Create optimizer states with a zero-gradient, zero-lr step so they can be loaded into."""
        if all(p in self.optimizer.state and self.optimizer.state[p] for p in self._trainable()):
            return
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for p in self._trainable():
            p.grad = torch.zeros_like(p)
        set_lr(self.optimizer, 0.0)
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def fragments(self) -> Iterator[Fragment]:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                local, shape, start = self._local_range(p)
                yield Fragment(name, "param", shape, start, local)
                state = self.optimizer.state.get(p, {})
                for kind, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if kind == "step":
                        if self._owns_replicated():
                            yield Fragment(name, "step", (1,), 0, value.detach().reshape(1))
                        continue
                    if tuple(value.shape) != tuple(p.shape):
                        raise NotImplementedError(
                            f"optimizer state {kind!r} of {name} is not shaped like the parameter "
                            f"({tuple(value.shape)} vs {tuple(p.shape)}); checkpointing factored states "
                            "(Adafactor) is not supported yet"
                        )
                    s_local, s_shape, s_start = self._local_range(value)
                    yield Fragment(name, kind, s_shape, s_start, s_local)

    def load_fragments(self, source: FragmentSource) -> None:
        # A pretrained HF folder has parameters only: then the optimizer must stay fresh (step 0).
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if trainable and any(source.has(trainable[0], k) for k in OPTIMIZER_STATE_KINDS):
            self.ensure_optimizer_state()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                local, _, start = self._local_range(p)
                local.copy_(source.read(name, "param", start, start + local.numel()).to(local.dtype))
                if not p.requires_grad:
                    continue
                for kind, value in self.optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor) or not source.has(name, kind):
                        continue
                    if kind == "step":
                        value.copy_(source.read(name, "step", 0, 1).reshape(value.shape).to(value.dtype))
                        continue
                    s_local, _, s_start = self._local_range(value)
                    s_local.copy_(source.read(name, kind, s_start, s_start + s_local.numel()).to(s_local.dtype))
