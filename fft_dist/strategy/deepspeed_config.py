"""The DeepSpeed config dict and every DeepSpeed rule, checked before any rank starts.

:func:`build_deepspeed_config` turns our typed config into DeepSpeed's JSON, so a user never
writes DeepSpeed JSON; :func:`check_deepspeed` holds all the rules (DeepSpeed installed, fp16, ZeRO-3's
limits, overrides that fight our options) and returns the dict it checked. The launcher runs it through
:func:`fft_dist.strategy.check`, after the refusal of the options zero2/zero3 do not read (one check for
every backend, from the descriptors in :mod:`fft_dist.strategy.backends.zero`), and
:class:`~fft_dist.strategy.deepspeed.DeepSpeedStrategy` runs the same function again on every rank.

Pure: no processes and no ``import deepspeed`` (slow, and the launcher may not have it).
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch

from fft_dist.config import (
    BatchPlan,
    ConfigError,
    FFTConfig,
    ModelConfig,
    OnNonFinite,
    Parallelism,
    ParallelismConfig,
    Precision,
    TrainConfig,
)
from fft_dist.device_defaults import CPU, PLANNING_GPU, DeviceDefaults, decide
from fft_dist.errors import CheckpointError
from fft_dist.strategy.backend import get

INSTALL_HINT = "pip install --no-build-isolation 'fft-dist[deepspeed]'"

# Large enough that DeepSpeed never prints its own progress lines (we log through metrics).
_STEPS_PER_PRINT = 2**62

# Tried on CPU (torch 2.13, deepspeed 0.19.8): ZeRO-3 gathers each Linear's partition in module
# hooks that fire inside the compiled layer forward; their changing state makes dynamo recompile
# every layer past its limit (8) and fall back to eager, so compile would cost time and do nothing.
COMPILE_REFUSED = ("train.compile=true does not work under parallelism=zero3: DeepSpeed's per-module ZeRO-3 "
                   "gather hooks run inside each compiled decoder layer, so torch.compile recompiles past its "
                   "limit and falls back to eager. Use parallelism=fsdp or zero2 with compile, or "
                   "train.compile=false")

# DeepSpeed keys that fft-dist sets from its own options: an override may repeat the value we set,
# but a different value is an error that names the fft-dist option to change instead.
OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation = global / (micro x world size))",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "parallelism.bf16_weights=true|false (DeepSpeed's own bf16 mode, with train.precision=bf16)",
    "data_types.grad_accum_dtype": "parallelism.bf16_weights (DeepSpeed 0.19 ZeRO-2/3 ignore this key: gradients "
                                   "accumulate in the weights' dtype; bf16_weights=false keeps them fp32)",
    "fp16.enabled": "train.precision",
    "torch_autocast.enabled": "train.precision",
    "torch_autocast.dtype": "train.precision",
    "torch_autocast.lower_precision_safe_modules": "train.precision (gradients are reduced in fp32)",
    "zero_optimization.stage": "parallelism=zero2|zero3",
    "zero_optimization.overlap_comm": "parallelism.overlap_comm",
    "zero_optimization.contiguous_gradients": "parallelism.contiguous_gradients",
    "zero_optimization.reduce_bucket_size": "parallelism.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "parallelism.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size": "parallelism.prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold": "parallelism.param_persistence_threshold",
    "zero_optimization.offload_optimizer": "parallelism.offload_optimizer (or parallelism=zero2_offload|zero3_offload)",
    "zero_optimization.offload_param": "parallelism.offload_params (or parallelism=zero3_offload)",
    "zero_allow_untested_optimizer": "optimizer.* (fft-dist always passes its own torch optimizer)",
}

# Keys that would change the optimisation problem behind fft-dist's back: refused outright.
FORBIDDEN_KEYS: dict[str, str] = {
    "optimizer": "the optimizer config group (optimizer=adamw|adam|sgd|adafactor, optimizer.*)",
    "scheduler": "train.lr_schedule, train.lr, train.warmup_steps / train.warmup_ratio",
}

_MISSING = object()

AUTO = -1
"""The value of a bucket field that means: derive it from the model and the device (:func:`bucket_sizes`)."""

# CPU (gloo): DeepSpeed's 5e8-element defaults allocate a 2 GB bucket every step there (CPU-FACTS.md).
CPU_BUCKETS = {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
               "prefetch_bucket_size": 2_000_000, "param_persistence_threshold": 0}
# GPU without a known hidden size: DeepSpeed's own defaults.
GPU_DEFAULT_BUCKETS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                       "prefetch_bucket_size": 50_000_000, "param_persistence_threshold": 100_000}
BUCKET_FIELDS = tuple(CPU_BUCKETS)


def hidden_size_of(model: ModelConfig) -> int | None:
    """The model's hidden size, by its family (:mod:`fft_dist.models.family`); None when the config
    cannot be read here (the rank reports that), so the auto buckets fall back to their defaults."""
    from fft_dist.model import hf_config
    from fft_dist.models.family import dimension

    try:
        return dimension(hf_config(model), "hidden_size")
    except (ConfigError, CheckpointError, OSError, ValueError, KeyError):  # KeyError: no model_type
        return None


def gpu_buckets(hidden_size: int | None) -> dict[str, int]:
    """GPU sizes scaled to the model, as DeepSpeed's Hugging Face integration does "auto": a reduce
    bucket of hidden^2 elements, a ZeRO-3 prefetch of 0.9 hidden^2 and a persistence threshold of
    10 hidden (norms and biases stay whole). The all-gather bucket keeps DeepSpeed's default."""
    if not hidden_size:
        return dict(GPU_DEFAULT_BUCKETS)
    square = hidden_size * hidden_size
    return {"reduce_bucket_size": square, "allgather_bucket_size": GPU_DEFAULT_BUCKETS["allgather_bucket_size"],
            "prefetch_bucket_size": int(0.9 * square), "param_persistence_threshold": 10 * hidden_size}


def bucket_sizes(parallelism: ParallelismConfig, *, hidden_size: int | None, on_gpu: bool) -> dict[str, int]:
    """The four bucket fields with every ``-1`` (auto) resolved for the device; set values are kept.

    Refuses a bucket of 0 or less than -1 (DeepSpeed would hang or fail deep inside a step).
    """
    auto = gpu_buckets(hidden_size) if on_gpu else CPU_BUCKETS
    out = {}
    for name in BUCKET_FIELDS:
        value = int(getattr(parallelism, name))
        low = 0 if name == "param_persistence_threshold" else 1
        if value != AUTO and value < low:
            raise ConfigError(f"parallelism.{name}={value} must be >= {low}, or -1 for auto "
                              f"(the size derived from the model's hidden size and the device)")
        out[name] = auto[name] if value == AUTO else value
    return out


def zero_stage(parallelism: ParallelismConfig) -> int:
    try:
        stage = get(parallelism.name).deepspeed_stage  # the backend descriptor's
    except ConfigError:
        stage = None
    if stage is None:
        raise ConfigError(
            f"parallelism.name={getattr(parallelism.name, 'value', parallelism.name)!r} is not a DeepSpeed "
            "ZeRO stage; use parallelism=zero2, zero2_offload, zero3 or zero3_offload"
        )
    return stage


def build_deepspeed_config(parallelism: ParallelismConfig, train: TrainConfig, plan: BatchPlan, *,
                           hidden_size: int | None = None, on_gpu: bool | None = None,
                           defaults: DeviceDefaults | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for our typed config (pure: no processes, no deepspeed import).

    Bucket fields left at -1 (auto) are sized by :func:`bucket_sizes` for ``hidden_size`` and the
    device (``on_gpu=None``: whether CUDA is available). Precision, overlap_comm and bf16_weights come
    from the rank's ``defaults``; None (the launcher's check, tests): decided for a GPU with bf16 when
    ``on_gpu``, else for CPU. ``parallelism.deepspeed_overrides`` is deep-merged last. Repeating a value
    we set is fine; a different value for a key we own raises :class:`ConfigError` naming the fft-dist option.
    """
    stage = zero_stage(parallelism)
    if plan.micro_batch_size * plan.grad_accum * plan.world_size != plan.global_batch_size:
        raise ConfigError(
            f"inconsistent batch plan: micro {plan.micro_batch_size} x accumulation {plan.grad_accum} x "
            f"world {plan.world_size} != global {plan.global_batch_size}"
        )
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if defaults is None:
        defaults = decide(FFTConfig(train=train, parallelism=parallelism), PLANNING_GPU if on_gpu else CPU,
                          deepspeed_stage=stage)
    precision = defaults.precision
    buckets = bucket_sizes(parallelism, hidden_size=hidden_size, on_gpu=on_gpu)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": defaults.overlap_comm,
        "contiguous_gradients": bool(parallelism.contiguous_gradients),
        "reduce_bucket_size": buckets["reduce_bucket_size"],
        "allgather_bucket_size": buckets["allgather_bucket_size"],
    }
    if stage == 2:
        zero["reduce_scatter"] = True
    else:
        zero["stage3_prefetch_bucket_size"] = buckets["prefetch_bucket_size"]
        zero["stage3_param_persistence_threshold"] = buckets["param_persistence_threshold"]
    if parallelism.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if parallelism.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": float(train.max_grad_norm),
        "bf16": {"enabled": False},
        "fp16": {"enabled": precision == Precision.fp16},
        "zero_optimization": zero,
        # Our optimizer, our semantics: a client torch optimizer, also under optimizer offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if precision == Precision.bf16 and defaults.bf16_weights:
        # parallelism.bf16_weights: DeepSpeed's own bf16 mode. bf16 working weights and gradients (ZeRO-2/3
        # accumulate them in bf16 whatever data_types.grad_accum_dtype says), all-gathers and reduce-scatters
        # in bf16, an fp32 master partition (seeded from the bf16-rounded weights) and fp32 Adam states.
        config["bf16"]["enabled"] = True
        config["communication_data_type"] = "bf16"
    elif precision == Precision.bf16:
        # fp32 weights (= master), bf16 compute under torch.autocast, fp32 gradients and reductions:
        # the semantics of parallelism=none and (up to per-op vs per-param casting) of FSDP2. Empty
        # lower_precision_safe_modules keeps the gradient reduction of Linear weights in fp32 as well.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if precision == Precision.fp16:
        # Dynamic loss scaling, like torch.amp.GradScaler on the other backends.
        config["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                               "hysteresis": 2, "min_loss_scale": 1})
    overrides = dict(_plain(parallelism.deepspeed_overrides) or {})
    if defaults.bf16_weights and overrides.get("communication_data_type", "bf16") != "bf16":
        raise ConfigError(f"parallelism.deepspeed_overrides.communication_data_type="
                          f"{overrides['communication_data_type']!r} conflicts with parallelism.bf16_weights=true, "
                          "which communicates in bf16; use parallelism.bf16_weights=false for fp32 weights and reductions")
    for key, option in FORBIDDEN_KEYS.items():
        if key in overrides:
            raise ConfigError(
                f"parallelism.deepspeed_overrides.{key} is not allowed: fft-dist drives DeepSpeed with its own "
                f"{key} so every backend trains the same way. Use {option} instead."
            )
    return _merge_overrides(config, overrides)


def _merge_overrides(base: dict[str, Any], overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        value = _plain(value)
        ours = out.get(key, _MISSING)
        if isinstance(value, dict) and (
            isinstance(ours, dict) or (ours is _MISSING and path not in OWNED_KEYS and _owned_below(path))
        ):  # descend, so an error names the deepest key
            out[key] = _merge_overrides(ours if isinstance(ours, dict) else {}, value, prefix=f"{path}.")
            continue
        owner = OWNED_KEYS.get(path) or _owned_below(path)
        if owner:
            if ours is _MISSING or not _same(ours, value):
                ours_text = "leaves it unset for this configuration" if ours is _MISSING else f"sets {ours!r}"
                raise ConfigError(
                    f"parallelism.deepspeed_overrides.{path}={value!r} conflicts with fft-dist, which {ours_text}. "
                    f"Use {owner} instead of overriding the DeepSpeed key."
                )
            continue
        out[key] = value
    return out


def _owned_below(path: str) -> str:
    """The fft-dist option owning some key under `path` (a dict override replacing our dict)."""
    for key, option in OWNED_KEYS.items():
        if key.startswith(path + "."):
            return option
    return ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) to plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    return value


def check_deepspeed(cfg: FFTConfig, plan: BatchPlan, defaults: DeviceDefaults | None = None) -> dict[str, Any]:
    """Every DeepSpeed rule in one place; returns the DeepSpeed config dict. Raises ConfigError.

    Runs in the launcher (through ``fft_dist.strategy.check``; `auto` values decided for the launcher's own
    device, a guess) and again in the strategy's constructor with the rank's ``defaults``.
    """
    par = cfg.parallelism
    stage = zero_stage(par)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"parallelism={Parallelism(par.name).value} needs DeepSpeed, which is not installed. "
            f"Install it after torch with: {INSTALL_HINT}"
        )
    if stage == 3 and cfg.train.on_nonfinite == OnNonFinite.skip and Precision(cfg.train.precision) != Precision.fp16:
        # DeepSpeed 0.19 ZeRO-3 checks for overflow only in fp16, so it applies a NaN/inf update
        # before we see the norm; skipping afterwards would keep the damaged weights.
        raise ConfigError("train.on_nonfinite=skip is not possible with ZeRO-3 in fp32/bf16 (DeepSpeed applies "
                          "a non-finite update itself); use train.on_nonfinite=stop, or parallelism=zero2|fsdp")
    if cfg.train.compile and stage == 3:
        raise ConfigError(COMPILE_REFUSED)
    if Precision(cfg.train.precision) == Precision.fp16 and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 with DeepSpeed needs a CUDA device; use bf16 or fp32 on CPU")
    # raises on overrides that fight our options; auto buckets follow the model's hidden size and the device
    return build_deepspeed_config(par, cfg.train, plan, hidden_size=hidden_size_of(cfg.model), defaults=defaults)


def zero3_inference_config(config: dict[str, Any], buckets: dict[str, int],
                           dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a frozen model (ZeRO-3 inference: partitioned parameters, no optimizer) beside
    a ZeRO-2 or ZeRO-3 run whose config is `config`; `buckets` from :func:`bucket_sizes` (its prefetch and
    persistence sizes). `dtype` (None: as the trainable model's weights) picks DeepSpeed's weight mode,
    which zero.Init builds in: bf16 or fp16 weights, or fp32 ones (with the run's autocast, if any)."""
    out = copy.deepcopy(config)
    zero = out["zero_optimization"]
    zero.pop("reduce_scatter", None)
    zero.pop("offload_optimizer", None)  # there is no optimizer
    zero.update({"stage": 3, "stage3_prefetch_bucket_size": buckets["prefetch_bucket_size"],
                 "stage3_param_persistence_threshold": buckets["param_persistence_threshold"]})
    if dtype is not None:
        out["bf16"] = {"enabled": dtype == torch.bfloat16}
        out["fp16"] = {"enabled": dtype == torch.float16}
        if dtype != torch.float32:
            out.pop("torch_autocast", None)  # the weights' dtype is the compute dtype
            out.pop("communication_data_type", None)
    return out
