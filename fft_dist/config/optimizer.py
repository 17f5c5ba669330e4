"""The optimizer's part of the schema: one dataclass per `optimizer=` option, so an option the chosen
optimizer does not have is refused instead of silently ignored (the mechanism: :mod:`fft_dist.config.variants`).

Each dataclass is also the one home of what differs between optimizers: how torch builds it
(:meth:`OptimizerConfig.build`), how many state bytes it keeps per trainable parameter (the memory
estimate) and which of torch's kernels it has. Nothing else branches on the optimizer's name, so a new
optimizer is its dataclass here, its name, and its ``conf/optimizer/<name>.yaml``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from fft_dist.config.variants import Variants
from fft_dist.errors import ConfigError


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


class OptimizerImplementation(str, Enum):
    auto = "auto"
    single_tensor = "single_tensor"
    foreach = "foreach"
    fused = "fused"


def _finite(x: float, low: float) -> bool:
    # used as float32 inside torch: 1e39 is finite in Python but inf there
    return isinstance(x, (int, float)) and math.isfinite(x) and abs(x) < 3.4e38 and x >= low


@dataclass
class OptimizerConfig:
    """What every optimizer has."""

    name: OptimizerName = OptimizerName.adamw
    """adamw, adam or sgd: picks the options below (`optimizer=<name>` picks the group file)."""
    weight_decay: float = 0.1
    """Decoupled (adamw) or L2 (adam, sgd) decay; not applied to biases, norms or embeddings listed below."""
    no_decay: list[str] = field(default_factory=lambda: ["*bias", "*norm*.weight", "*ln_*.weight"])
    """fnmatch patterns of parameters without weight decay."""
    implementation: OptimizerImplementation = OptimizerImplementation.auto
    """torch's kernel for the update: single_tensor (a loop over parameters), foreach (batched) or fused (one
    kernel). auto: fused (Adam/AdamW) or foreach (SGD) on CUDA, single_tensor on CPU; decided on the rank."""
    layer_lr_decay: float = 1.0
    """Layer-wise lr decay gamma in (0, 1]: decoder layer l (0-based) of L trains at lr * gamma^(L - l), the
    input embeddings (and a head tied to them) at lr * gamma^(L + 1), the head and final norm at lr.
    1.0: one lr for all."""

    cuda_implementation: ClassVar[OptimizerImplementation] = OptimizerImplementation.fused
    """What implementation=auto picks on CUDA (single_tensor on CPU, where the parity tests were written)."""
    sharded_fused: ClassVar[bool] = True
    """Whether torch's fused kernel runs on DTensor shards (fsdp, hsdp); if not, fused is refused there."""

    def state_bytes_per_param(self) -> int:
        """Optimizer-state bytes per trainable parameter (fp32 states), for the memory estimate."""
        raise NotImplementedError(f"{type(self).__name__} does not say its state size")

    def build(self, groups: list[dict], *, lr: float, foreach: bool, fused: bool) -> Any:
        """The torch optimizer over `groups` (fft_dist.optim.param_groups), with the kernel chosen."""
        raise NotImplementedError(f"no optimizer for {type(self).__name__}")

    def check(self) -> None:
        """Values that cannot run: a ConfigError naming the option."""
        if not _finite(self.weight_decay, 0.0):
            raise ConfigError(f"optimizer.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (_finite(self.layer_lr_decay, 0.0) and 0.0 < self.layer_lr_decay <= 1.0):
            raise ConfigError(f"optimizer.layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")


@dataclass
class AdamWConfig(OptimizerConfig):
    """optimizer=adamw: torch.optim.AdamW."""

    name: OptimizerName = OptimizerName.adamw
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Decay rates of the first and second moment estimates, each in [0, 1)."""
    eps: float = 1e-8
    """Added to the second moment's square root (numerical stability)."""

    def state_bytes_per_param(self) -> int:
        return 8  # exp_avg + exp_avg_sq

    def build(self, groups: list[dict], *, lr: float, foreach: bool, fused: bool) -> Any:
        import torch

        kind = torch.optim.Adam if self.name == OptimizerName.adam else torch.optim.AdamW  # Adam: AdamW's options
        return kind(groups, lr=lr, betas=tuple(self.betas), eps=self.eps, foreach=foreach, fused=fused)

    def check(self) -> None:
        for i, beta in enumerate(self.betas):
            if not (_finite(beta, 0.0) and beta < 1.0):
                raise ConfigError(f"optimizer.betas[{i}]={beta} must be in [0, 1)")
        if len(self.betas) != 2:
            raise ConfigError(f"optimizer.betas needs 2 values, got {list(self.betas)}")
        if not (_finite(self.eps, 0.0) and self.eps > 0):
            raise ConfigError(f"optimizer.eps must be a finite number > 0, got {self.eps}")
        super().check()


@dataclass
class AdamConfig(AdamWConfig):
    """optimizer=adam: torch.optim.Adam (L2 weight decay, added to the gradient)."""

    name: OptimizerName = OptimizerName.adam
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class SGDConfig(OptimizerConfig):
    """optimizer=sgd: torch.optim.SGD."""

    name: OptimizerName = OptimizerName.sgd
    weight_decay: float = 0.0
    momentum: float = 0.9
    """Momentum factor (0: plain SGD, no momentum buffer)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""

    cuda_implementation: ClassVar[OptimizerImplementation] = OptimizerImplementation.foreach
    sharded_fused: ClassVar[bool] = False  # torch has no fused SGD over DTensor shards

    def state_bytes_per_param(self) -> int:
        return 4 if self.momentum else 0  # the momentum buffer

    def build(self, groups: list[dict], *, lr: float, foreach: bool, fused: bool) -> Any:
        import torch

        return torch.optim.SGD(groups, lr=lr, momentum=self.momentum, nesterov=self.nesterov, foreach=foreach,
                               fused=fused)

    def check(self) -> None:
        if not _finite(self.momentum, 0.0):
            raise ConfigError(f"optimizer.momentum must be a finite number >= 0, got {self.momentum}")
        if self.nesterov and not self.momentum:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")
        super().check()


OPTIMIZERS = Variants("optimizer", OptimizerConfig)
"""The schema of each `optimizer=` option (conf/optimizer/<name>.yaml names it: ``- /optimizer_schema/<name>@_here_``)."""
OPTIMIZERS.add(OptimizerName.adamw, AdamWConfig)
OPTIMIZERS.add(OptimizerName.adam, AdamConfig)
OPTIMIZERS.add(OptimizerName.sgd, SGDConfig)
