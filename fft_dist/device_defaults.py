"""The `auto` settings that depend on the device, decided once on each rank (issue 17).

A SLURM login node or a container host often has no GPU, so the launcher decides none of these: a
rank describes its own device (:func:`describe`), :func:`decide` turns the typed config into a
:class:`DeviceDefaults` record in which nothing is `auto`, :func:`apply` sets torch's global switches
from it, and every consumer (seeding, the optimizer, the strategies, the DeepSpeed config, the memory
estimate) reads the record. On CPU every decision is what fft-dist did before `auto` existed (fp32,
deterministic kernels, no TF32, overlap off, the single-tensor optimizer), so CPU parity and resume
tests keep their meaning. On a GPU the defaults are the fast ones.

No torch import at module level: :func:`check` runs in the launcher's validation.
"""
from __future__ import annotations

from dataclasses import dataclass

from fft_dist.config import (
    ConfigError,
    FFTConfig,
    OptimizerImplementation,
    OptimizerName,
    Parallelism,
    Precision,
)

AUTO = "auto"
TOGGLES = ("train.deterministic", "parallelism.overlap_comm", "parallelism.bf16_weights")
"""Options that take true, false or auto (Hydra gives a bool for true/false, a string for auto)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the decisions need to know about a rank's device; tests pass made-up GPUs."""

    type: str = "cpu"
    name: str = ""
    capability: tuple[int, int] | None = None
    bf16: bool = False
    """Native bf16 support (Ampere, sm_80, and later)."""

    def text(self) -> str:
        if self.type != "cuda":
            return self.type
        sm = f", sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""
        return f"cuda ({self.name or 'GPU'}{sm}, {'bf16' if self.bf16 else 'no bf16'})"


CPU = DeviceInfo()
PLANNING_GPU = DeviceInfo("cuda", "a GPU with bf16", None, True)
"""What `estimate` and `plan` assume: they run on login nodes, for GPUs they cannot see."""


def describe(device) -> DeviceInfo:
    """This rank's device (a torch.device), read from CUDA where it is one."""
    if getattr(device, "type", str(device)) != "cuda":
        return CPU
    import torch

    return DeviceInfo("cuda", torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)),
                      torch.cuda.is_bf16_supported(including_emulation=False))


def toggle(value, option: str) -> bool | None:
    """true / false / auto (None) from a bool or its spelling; anything else is a ConfigError naming `option`."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text == AUTO:
        return None
    raise ConfigError(f"{option}={value!r}: use true, false or auto")


def _get(cfg: FFTConfig, option: str):
    section, name = option.split(".")
    return getattr(getattr(cfg, section), name)


def check(cfg: FFTConfig) -> None:
    """Pre-launch: every toggle is true/false/auto, and explicit choices do not contradict each other."""
    values = {option: toggle(_get(cfg, option), option) for option in TOGGLES}
    precision = Precision(cfg.train.precision)
    if values["parallelism.bf16_weights"] and precision not in (Precision.bf16, Precision.auto):
        raise ConfigError(f"parallelism.bf16_weights=true keeps bf16 weights, but train.precision={precision.value}; "
                          "use train.precision=bf16 (or auto), or parallelism.bf16_weights=false")
    if (OptimizerImplementation(cfg.optimizer.implementation) == OptimizerImplementation.fused
            and not cfg.optimizer.sharded_fused
            and Parallelism(cfg.parallelism.name) == Parallelism.fsdp):
        name = OptimizerName(cfg.optimizer.name).value
        raise ConfigError(f"optimizer.implementation=fused with optimizer={name} does not run under parallelism=fsdp "
                          f"(torch has no sharded fused {name}); use optimizer.implementation=foreach or auto")


@dataclass(frozen=True)
class DeviceDefaults:
    """Every device-dependent setting of a run, none of them `auto`; printed in the banner, logged once."""

    device: str
    cuda: bool
    precision: Precision
    deterministic: bool
    tf32: bool
    """TF32 for fp32 matmuls (CUDA only; set by :func:`apply`)."""
    optimizer_implementation: OptimizerImplementation
    overlap_comm: bool
    """DeepSpeed's zero_optimization.overlap_comm (False for the other backends)."""
    bf16_weights: bool
    """DeepSpeed's own bf16 mode (False for the other backends)."""
    deepspeed: bool
    auto: tuple[str, ...] = ()
    """The options that were `auto` (dotted names)."""

    def record(self) -> dict:
        """The metrics.jsonl record of what each `auto` became."""
        return {"event": "defaults", "device": self.device, "precision": self.precision.value,
                "deterministic": self.deterministic, "tf32": self.tf32,
                "optimizer_implementation": self.optimizer_implementation.value,
                **({"overlap_comm": self.overlap_comm, "bf16_weights": self.bf16_weights} if self.deepspeed else {}),
                "auto": list(self.auto)}

    def banner(self) -> str:
        on = {True: "on", False: "off"}
        parts = [f"precision {self.precision.value}", f"deterministic {on[self.deterministic]}",
                 f"TF32 {on[self.tf32] if self.cuda else 'n/a'}",
                 f"optimizer {self.optimizer_implementation.value}"]
        if self.deepspeed:
            parts += [f"overlap_comm {on[self.overlap_comm]}", f"bf16_weights {on[self.bf16_weights]}"]
        auto = f" (auto: {', '.join(self.auto)})" if self.auto else ""
        if self.deterministic:
            resume = "resume is bitwise exact"
        else:
            resume = ("resume is exact up to GPU kernel non-determinism; train.deterministic=true makes it bitwise"
                      if self.cuda else "resume is exact up to kernel non-determinism; train.deterministic=true "
                      "makes it bitwise")
        return f"defaults on {self.device}: {', '.join(parts)}{auto}; {resume}"


def decide(cfg: FFTConfig, device: DeviceInfo, *, deepspeed_stage: int | None) -> DeviceDefaults:
    """Every `auto` for `device` (pure). `deepspeed_stage`: the backend's (its descriptor's
    ``Backend.deepspeed_stage``, given by the caller: this layer sits below the backend registry), None when
    torch runs it; estimate rows pass another backend's.

    An explicit value always wins. Assumes :func:`check` passed.
    """
    stage = deepspeed_stage
    cuda = device.type == "cuda"
    auto: list[str] = []

    def pick(option: str, value, decided):
        if value is None or value == AUTO:  # the enums are str enums: Precision.auto == "auto"
            auto.append(option)
            return decided
        return value

    bf16_wanted = toggle(cfg.parallelism.bf16_weights, "parallelism.bf16_weights")
    precision = pick("train.precision", Precision(cfg.train.precision),
                     Precision.bf16 if (cuda and device.bf16) or (stage and bf16_wanted) else Precision.fp32)
    deterministic = pick("train.deterministic", toggle(cfg.train.deterministic, "train.deterministic"), not cuda)
    implementation = pick("optimizer.implementation", OptimizerImplementation(cfg.optimizer.implementation),
                          cfg.optimizer.cuda_implementation if cuda else OptimizerImplementation.single_tensor)
    overlap = bf16_weights = False
    if stage:  # DeepSpeed reads these; for the other backends they stay at their (refused-if-set) defaults
        overlap = pick("parallelism.overlap_comm", toggle(cfg.parallelism.overlap_comm, "parallelism.overlap_comm"),
                       cuda and stage == 3)  # DeepSpeed 0.19: overlap_comm defaults to (stage == 3)
        bf16_weights = pick("parallelism.bf16_weights", bf16_wanted, cuda and precision == Precision.bf16)
    return DeviceDefaults(device=device.text(), cuda=cuda, precision=precision, deterministic=deterministic,
                          tf32=cuda and not deterministic, optimizer_implementation=implementation,
                          overlap_comm=overlap, bf16_weights=bf16_weights, deepspeed=bool(stage), auto=tuple(auto))


def apply(defaults: DeviceDefaults) -> None:
    """torch's global switches that follow the decisions: TF32 on CUDA (CPU: nothing is touched).

    The fp32_precision API of torch >= 2.9; mixing it with the legacy allow_tf32 flags is an error there.
    """
    if not defaults.cuda:
        return
    import torch

    mode = "tf32" if defaults.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def resolve(cfg: FFTConfig, device, *, deepspeed_stage: int | None) -> DeviceDefaults:
    """On a rank: describe its device, decide and apply (``fft_dist.strategy.device_defaults`` passes the
    backend's stage)."""
    defaults = decide(cfg, describe(device), deepspeed_stage=deepspeed_stage)
    apply(defaults)
    return defaults
