"""The parallelism section: the backend name and its options (each backend's checks live in
:mod:`fft_dist.strategy`; a backend registered at run time adds its name here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Parallelism(str, Enum):
    """The backend names Hydra accepts: the built-in ones, plus any that :func:`add_parallelism_name` adds
    (fft_dist.strategy.backend.register does, so a backend defined outside the package is typed the same)."""

    none = "none"
    fsdp = "fsdp"
    hsdp = "hsdp"
    zero2 = "zero2"
    zero3 = "zero3"


def add_parallelism_name(name: str) -> Parallelism:
    """Make `name` a member of :class:`Parallelism` (idempotent).

    Why: Hydra types ``parallelism.name`` as this enum, so a stray name is refused while composing, and the
    code reads ``.value`` from it; a backend registered at run time must pass the same gate. Enums cannot
    grow by design, so the member is added to the enum's own tables (what ``aenum.extend_enum`` does).
    """
    if name in Parallelism._value2member_map_:
        return Parallelism(name)
    if not name.isidentifier():
        raise ValueError(f"a backend name must be an identifier, not {name!r}")
    member = str.__new__(Parallelism, name)
    member._name_, member._value_ = name, name
    Parallelism._member_map_[name] = member
    Parallelism._value2member_map_[name] = member
    Parallelism._member_names_.append(name)
    type.__setattr__(Parallelism, name, member)
    return member


@dataclass
class ParallelismConfig:
    name: Parallelism = Parallelism.fsdp
    reshard_after_forward: bool = True
    """FSDP2 / HSDP: free gathered parameters after forward (ZeRO-3 style) instead of keeping them for backward."""
    shard_size: int = -1
    """HSDP: ranks per shard group (parameters sharded within a group, replicated across groups); it must divide
    the world size. -1 (auto): the ranks of one node (LOCAL_WORLD_SIZE on the rank, launcher.nproc_per_node)."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states (and the step) on CPU."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters on CPU."""
    overlap_comm: bool | str = "auto"
    """DeepSpeed: overlap gradient reduction with backward. auto: DeepSpeed's default for the stage on a GPU
    (ZeRO-3 on, ZeRO-2 off), off on CPU; decided on the rank."""
    bf16_weights: bool | str = "auto"
    """DeepSpeed with bf16: bf16 working weights and gradients, all-gathers and reduce-scatters in bf16, an
    fp32 master partition and fp32 Adam states (DeepSpeed's own bf16 mode). false: fp32 weights with bf16
    autocast and fp32 reductions, as every backend. auto: true on a GPU under bf16, false on CPU."""
    contiguous_gradients: bool = True
    reduce_bucket_size: int = -1
    """Elements per gradient-reduction bucket. -1 (auto): hidden_size^2 on GPU, 2e6 on CPU."""
    allgather_bucket_size: int = -1
    """ZeRO-2 parameter all-gather bucket (elements). -1 (auto): DeepSpeed's 5e8 on GPU, 2e6 on CPU."""
    prefetch_bucket_size: int = -1
    """ZeRO-3 stage3_prefetch_bucket_size (elements). -1 (auto): 0.9 x hidden_size^2 on GPU, 2e6 on CPU."""
    param_persistence_threshold: int = -1
    """ZeRO-3: parameters with at most this many elements stay unpartitioned. -1 (auto): 10 x hidden_size on GPU, 0 on CPU."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged in; keys we set ourselves must not conflict."""
