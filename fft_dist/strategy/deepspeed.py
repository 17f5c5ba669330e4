"""parallelism=zero2 / zero3 (and the *_offload variants): DeepSpeed ZeRO behind the Strategy seam.

The DeepSpeed config dict is built from our typed config (:func:`build_deepspeed_config`), so a
user never writes DeepSpeed JSON. The optimizer is ours (a client ``torch.optim`` optimizer with
our decay / no-decay groups), the lr comes from our schedule, and the loss normalisation is ours:
DeepSpeed only shards, reduces, clips and steps.

Numerics (the contract every backend meets, tests/test_deepspeed.py):
- fp32: the same weights at init (ZeRO-3 builds under ``zero.Init`` but runs HF's init at the
  usual moments on gathered parameters, so the random stream is the plain build's) and the same
  loss curve as ``none`` / ``fsdp`` to float round-off.
- bf16: fp32 weights (= the master copy) with bf16 compute under ``torch.autocast`` and fp32
  gradient reductions, which is what ``none`` does. DeepSpeed's native bf16 mode is an explicit
  opt-in (``+parallelism.deepspeed_overrides.bf16.enabled=true``): less memory, but its fp32
  master starts from the bf16-rounded weights, so the updates differ from step 2 on.
- fp16: DeepSpeed's fp16 mode with dynamic loss scaling (GPU only; DeepSpeed refuses it on CPU).

Model-state bytes per rank, fp32 + AdamW, Psi parameters, N ranks (measured to 0.01%):
- ZeRO-2: 4 Psi (full working weights) + 4 Psi/N (fp32 master) + 4 Psi/N (gradient partition,
  between backward and step) + 8 Psi/N (exp_avg, exp_avg_sq) = 4 Psi + 16 Psi/N;
- ZeRO-3: 4 Psi/N (working partition) + 4 Psi/N (fp32 master) + 4 Psi/N (gradient partition, a
  buffer kept across steps) + 8 Psi/N (Adam) + one reduce bucket = 20 Psi/N + 4 reduce_bucket_size;
- FSDP2 for comparison: 16 Psi/N (its sharded fp32 parameters are the master).
The ZeRO paper's 16 Psi/N (stage 3) counts 2 + 2 bytes of fp16 weights and gradients plus 12 of
fp32 master and Adam. In fp32 the working copy and the gradients take 4 + 4 bytes, and DeepSpeed
still keeps its own master copy, hence 20; the bf16 autocast mode keeps that layout too.

What a rank owns of every parameter and optimizer state is a contiguous range of the flattened
tensor (ZeRO-3: ``rank * partition`` onwards; ZeRO-2: ``p._hp_mapping``), so both stages yield
the same :class:`Fragment`s as FSDP2 and share one checkpoint format.

``import deepspeed`` happens only inside this module's functions, so FSDP users never need it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fft_dist.config import Parallelism, BatchPlan, ConfigError, ParallelismConfig, Precision, TrainConfig
from fft_dist.dist import DistContext
from fft_dist.strategy.base import Fragment, FragmentSource, LrSchedule, OptimizerFactory

INSTALL_HINT = "pip install --no-build-isolation 'fft-dist[deepspeed]'"

# Large enough that DeepSpeed never prints its own progress lines (we log through metrics).
_STEPS_PER_PRINT = 2**62

_STAGES = {Parallelism.zero2: 2, Parallelism.zero3: 3}

# DeepSpeed keys that fft-dist sets from its own options: an override may repeat the value we set,
# but a different value is an error that names the fft-dist option to change instead.
OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation = global / (micro x world size))",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "train.precision",
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


# --------------------------------------------------------------------------------------------
# The config dict
# --------------------------------------------------------------------------------------------
def zero_stage(parallelism: ParallelismConfig) -> int:
    try:
        return _STAGES[Parallelism(parallelism.name)]
    except (KeyError, ValueError):
        raise ConfigError(
            f"parallelism.name={getattr(parallelism.name, 'value', parallelism.name)!r} is not a DeepSpeed "
            "ZeRO stage; use parallelism=zero2, zero2_offload, zero3 or zero3_offload"
        ) from None


def build_deepspeed_config(parallelism: ParallelismConfig, train: TrainConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed config dict for our typed config (pure: no processes, no deepspeed import).

    ``parallelism.deepspeed_overrides`` is deep-merged last. Repeating a value we set is fine; a
    different value for a key we own raises :class:`ConfigError` naming the fft-dist option.
    """
    stage = zero_stage(parallelism)
    if plan.micro_batch_size * plan.grad_accum * plan.world_size != plan.global_batch_size:
        raise ConfigError(
            f"inconsistent batch plan: micro {plan.micro_batch_size} x accumulation {plan.grad_accum} x "
            f"world {plan.world_size} != global {plan.global_batch_size}"
        )
    if parallelism.offload_params and stage != 3:
        raise ConfigError("parallelism.offload_params needs ZeRO-3 (parallelism=zero3_offload)")
    precision = Precision(train.precision)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(parallelism.overlap_comm),
        "contiguous_gradients": bool(parallelism.contiguous_gradients),
        "reduce_bucket_size": int(parallelism.reduce_bucket_size),
        "allgather_bucket_size": int(parallelism.allgather_bucket_size),
    }
    if stage == 2:
        zero["reduce_scatter"] = True
    else:
        zero["stage3_prefetch_bucket_size"] = int(parallelism.prefetch_bucket_size)
        zero["stage3_param_persistence_threshold"] = int(parallelism.param_persistence_threshold)
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
    if precision == Precision.bf16:
        # fp32 weights (= master), bf16 compute under torch.autocast, fp32 gradients and reductions:
        # the semantics of parallelism=none and (up to per-op vs per-param casting) of FSDP2. DeepSpeed's
        # native "bf16" mode would keep bf16 working weights and seed its fp32 master from the bf16-rounded
        # init, which changes every update from step 2 on. Empty lower_precision_safe_modules keeps the
        # gradient reduction of Linear weights in fp32 as well.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if precision == Precision.fp16:
        # Dynamic loss scaling, like torch.amp.GradScaler on the other backends.
        config["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                               "hysteresis": 2, "min_loss_scale": 1})
    overrides = dict(_plain(parallelism.deepspeed_overrides) or {})
    native_bf16 = isinstance(overrides.get("bf16"), dict) and overrides["bf16"].get("enabled") is True
    if precision == Precision.bf16 and native_bf16:
        # Expert opt-in: DeepSpeed's own bf16 mode (bf16 working weights and gradients, fp32 master seeded
        # from the bf16-rounded weights). Less memory (ZeRO-3 16 instead of 20 bytes/param/N, ZeRO-2 2
        # instead of 4 bytes/param for the working copy), but the updates differ from the other backends.
        config["bf16"]["enabled"] = True
        del config["torch_autocast"]
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


# --------------------------------------------------------------------------------------------
# Importing DeepSpeed
# --------------------------------------------------------------------------------------------
def import_deepspeed():
    """Import DeepSpeed lazily, with the CPU accelerator where there is no GPU and no shm-op build.

    The shm op (``deepspeed_shm_comm_op``) serves inference all-reduce only, and building it costs
    about 40 s on a fresh machine at every ``init_distributed``; training never uses it.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(f"DeepSpeed is not installed ({exc}). Install it after torch with: {INSTALL_HINT}") from exc
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # `import a.b.torch as m` binds torch
    if getattr(comm_torch.build_shm_op, "__name__", "") != "_no_shm_op":

        def _no_shm_op():
            return None

        comm_torch.build_shm_op = _no_shm_op
    if os.environ.get("FFT_DIST_DEEPSPEED_VERBOSE", "0") in ("", "0"):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed 0.19 still calls the collectives torch 2.13 renamed; torch warns on every call.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
            category=FutureWarning,
        )
    return deepspeed


@contextlib.contextmanager
def _hf_init_on_gathered_params(deepspeed):
    """Run transformers' weight init at the same moments as without ZeRO-3, on gathered parameters.

    Under ``zero.Init`` each module's parameters are partitioned as soon as the module is built,
    so the init that ``post_init`` runs would touch empty tensors. transformers' own ZeRO-3 route
    (a live ``HfDeepSpeedConfig``) defers all init to the end and draws on rank 0 only: the
    weights are distributed correctly but come from a different random stream than the same seed
    gives under fsdp / zero2 / none (the first loss differs). Here each module's parameters are
    gathered only while its ``_initialize_weights`` runs, on every rank, in the usual order: the
    weights and the RNG state afterwards are bit-identical to a plain build, and peak memory is
    one module's parameters.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # not a transformers model: nothing to patch
        yield
        return
    original = PreTrainedModel._initialize_weights

    def _initialize_weights(self, module, is_custom_code=False):
        if getattr(module, "_is_hf_initialized", False):
            return original(self, module, is_custom_code)
        # _init_weights may also touch direct children's parameters (e.g. module.q_proj.weight)
        params = list(module.parameters(recurse=False))
        for child in module.children():
            params.extend(child.parameters(recurse=False))
        params = [p for p in params if hasattr(p, "ds_id")]
        if not params:
            return original(self, module, is_custom_code)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            return original(self, module, is_custom_code)

    PreTrainedModel._initialize_weights = _initialize_weights
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


def _keep_arange_dtype():
    """transformers' guard that keeps zero.Init from casting RoPE's torch.arange (enter before Init)."""
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change

        return prevent_arange_dtype_change()
    except ImportError:
        return contextlib.nullcontext()


@contextlib.contextmanager
def _full_shapes(params: list[nn.Parameter]):
    """Let code that looks at ``p.ndim`` / ``p.shape`` (our decay / no-decay split) see the full shapes.

    Under ``zero.Init`` every parameter's ``.data`` is an empty 1-D placeholder, so ``p.ndim`` is 1
    for every weight. A zero-stride view of one element has the full shape and costs no memory.
    """
    saved = []
    for p in params:
        shape = getattr(p, "ds_shape", None)
        if shape is None or tuple(p.shape) == tuple(shape):
            continue
        saved.append((p, p.data))
        p.data = torch.zeros(1, dtype=p.dtype, device=p.device).expand(tuple(shape))
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


# --------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------
class DeepSpeedStrategy:
    """ZeRO-2 / ZeRO-3 via a DeepSpeed engine; see the module docstring."""

    def __init__(self, *, parallelism: ParallelismConfig, train: TrainConfig, plan: BatchPlan, ctx: DistContext):
        self.parallelism = parallelism
        self.train_cfg = train
        self.plan = plan
        self.ctx = ctx
        self.stage = zero_stage(parallelism)
        self.name = f"zero{self.stage}"
        self.ds_config = build_deepspeed_config(parallelism, train, plan)
        self._ds = import_deepspeed()
        if Precision(train.precision) == Precision.fp16:
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise ConfigError(
                    f"train.precision=fp16 is not supported by DeepSpeed on this device "
                    f"({get_accelerator().device_name()}); use train.precision=bf16 or fp32"
                )
        # The trainer already initialised torch.distributed; DeepSpeed wraps that group.
        self._ds.init_distributed(dist_backend=ctx.backend, dist_init_required=False, verbose=False)
        self.engine = None
        self.model: nn.Module
        self.module: nn.Module
        self.lr_at: LrSchedule
        self._client_optimizer: torch.optim.Optimizer
        self._micro = 0  # backward calls since the last step
        self._names: list[tuple[str, nn.Parameter]] = []

    # -- setup -------------------------------------------------------------------------------
    def setup(
        self, *, build_model: Callable[[], nn.Module], make_optimizer: OptimizerFactory, lr_at: LrSchedule
    ) -> None:
        ds = self._ds
        self.lr_at = lr_at
        if self.stage == 3:
            model = self.build_partitioned(build_model)
            with _full_shapes(list(model.parameters())):
                optimizer = make_optimizer(model)
        else:
            model = build_model().to(self.ctx.device)
            optimizer = make_optimizer(model)
        self._client_optimizer = optimizer
        engine, _, _, _ = ds.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.ds_config), dist_init_required=False
        )
        self.engine = engine
        self.model = engine
        self.module = engine.module
        self._names = list(self.module.named_parameters())  # tied weights appear once
        self._zero = engine.optimizer  # DeepSpeedZeroOptimizer (stage 1/2) or DeepSpeedZeroOptimizer_Stage3
        self._base = self._zero.optimizer  # our torch optimizer, now over flat fp32 partitions
        if self.stage == 2:
            self._group_of = {id(p): i for i, group in enumerate(self._zero.bit16_groups) for p in group}

    def build_partitioned(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        """ZeRO-3: build under zero.Init, so no rank ever holds the full model (each module is
        partitioned as soon as it is constructed), with the same weights as a plain build."""
        ds = self._ds
        with _keep_arange_dtype(), ds.zero.Init(config_dict_or_path=copy.deepcopy(self.ds_config)), \
                _hf_init_on_gathered_params(ds):
            return build_model()

    # -- forward / backward / step -----------------------------------------------------------
    def _set_boundary(self, micro_index: int) -> None:
        # micro_index: 1-based index of the micro batch whose backward comes next.
        self.engine.set_gradient_accumulation_boundary(micro_index >= self.plan.grad_accum)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.engine.training:
            self._set_boundary(self._micro + 1)
        out = self.engine(input_ids=input_ids.to(self.ctx.device), attention_mask=attention_mask.to(self.ctx.device))
        return out.logits

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already sum(token losses) / (valid tokens of the whole global batch).

        DeepSpeed averages gradients over the data-parallel ranks when it reduces them, so the loss
        is multiplied by the world size; its own division by the accumulation steps is switched off
        (scale_wrt_gas=False) rather than undone, which saves a rounding step.
        """
        self._micro += 1
        if self._micro > self.plan.grad_accum:
            raise RuntimeError(
                f"backward() called {self._micro} times since the last step(); the batch plan has "
                f"{self.plan.grad_accum} micro batches per optimizer step"
            )
        self._set_boundary(self._micro)
        self.engine.backward(loss * float(self.ctx.world_size), scale_wrt_gas=False)

    def step(self, step: int) -> float:
        if self._micro != self.plan.grad_accum:
            raise RuntimeError(
                f"step() after {self._micro} backward() calls; the batch plan has {self.plan.grad_accum} "
                "micro batches per optimizer step"
            )
        lr = float(self.lr_at(step))
        for group in self._base.param_groups:
            group["lr"] = lr
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken, from the optimizer state like torch ('step'), 0 before the first."""
        for state in self._base.state.values():
            step = state.get("step")
            if step is not None:
                return int(step.item()) if isinstance(step, torch.Tensor) else int(step)
        return 0

    # -- flat fp32 partitions: one per (sub) group -------------------------------------------
    def _flat_partitions(self) -> list[tuple[torch.Tensor, int]]:
        """(flat fp32 partition, index of its param group in the base optimizer)."""
        z = self._zero
        if self.stage == 2:
            return [(flat, i) for i, flat in enumerate(z.single_partition_of_fp32_groups)]
        return [(flat, z.sub_group_to_group_id[i]) for i, flat in enumerate(z.fp32_partitioned_groups_flat)]

    def _flat_of(self, p: nn.Parameter) -> torch.Tensor | None:
        """The flat fp32 partition (optimizer key) that holds this rank's piece of p."""
        if self.stage == 2:
            i = self._group_of.get(id(p))
            return None if i is None else self._zero.single_partition_of_fp32_groups[i]
        if not p.requires_grad:
            return None
        sub_group, _, _ = self._zero.grad_position[self._zero.get_param_id(p)]
        return self._zero.fp32_partitioned_groups_flat[sub_group]

    def ensure_optimizer_state(self) -> None:
        """Create optimizer states with one zero-gradient, lr=0 step, then reset 'step' to 0.

        A fresh torch optimizer creates its state lazily at the first step; loading a checkpoint
        into a fresh engine needs the tensors to exist. An lr=0 step on zero gradients leaves the
        weights bit-identical (AdamW: p * (1 - 0 * wd) - 0 * 0 / (0 + eps)), and zero moments with
        step 0 are exactly the state torch would create itself.
        """
        flats = self._flat_partitions()
        if all(self._base.state.get(flat) for flat, _ in flats):
            return
        base = self._base
        saved_params = [g["params"] for g in base.param_groups]
        saved_lr = [g["lr"] for g in base.param_groups]
        saved_grads = [flat.grad for flat, _ in flats]
        try:
            for g in base.param_groups:
                g["params"] = []
                g["lr"] = 0.0
            for flat, gid in flats:
                base.param_groups[gid]["params"].append(flat)
                flat.grad = torch.zeros_like(flat)
            base.step()
        finally:
            for g, params, lr in zip(base.param_groups, saved_params, saved_lr):
                g["params"] = params
                g["lr"] = lr
            for (flat, _), grad in zip(flats, saved_grads):
                flat.grad = grad
        for flat, _ in flats:
            step = base.state[flat].get("step")
            if isinstance(step, torch.Tensor):
                step.zero_()
            elif step is not None:
                base.state[flat]["step"] = 0

    def _state_kinds(self, flat: torch.Tensor) -> list[str]:
        state = self._base.state.get(flat, {})
        return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == flat.shape]

    def _step_tensor(self, flat: torch.Tensor) -> torch.Tensor | None:
        step = self._base.state.get(flat, {}).get("step")
        return step if isinstance(step, torch.Tensor) else None

    # -- fragments -------------------------------------------------------------------------------
    def _local_ranges(self, name: str, p: nn.Parameter) -> Iterator[tuple[str, tuple[int, ...], int, torch.Tensor]]:
        """(kind, full shape, flat start, live 1-D tensor) of every range of p this rank owns."""
        if self.stage == 3:
            yield from self._local_ranges_z3(p)
        else:
            yield from self._local_ranges_z2(p)

    def _local_ranges_z3(self, p: nn.Parameter):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        shape = tuple(p.ds_shape)
        numel = int(p.ds_numel)
        part = int(p.partition_numel())
        start = self.ctx.rank * part
        valid = max(0, min(part, numel - start))
        if valid == 0:
            return
        if not p.requires_grad:  # frozen: no fp32 master, the partition itself is the value
            yield "param", shape, start, p.ds_tensor.data.view(-1)[:valid]
            return
        yield "param", shape, start, safe_get_local_fp32_param(p).view(-1)[:valid]
        flat = self._flat_of(p)
        for kind in self._state_kinds(flat):
            yield kind, shape, start, safe_get_local_optimizer_state(p, kind).view(-1)[:valid]

    def _local_ranges_z2(self, p: nn.Parameter):
        shape = tuple(p.shape)
        if id(p) not in self._group_of:  # frozen: not partitioned, every rank has it; rank 0 owns it
            if self.ctx.rank == 0:
                yield "param", shape, 0, p.data.view(-1)
            return
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return
        start = int(mapping.lp_fragment_address.start)
        yield "param", shape, start, mapping.get_hp_fragment().view(-1)
        # Slice the optimizer states ourselves: DeepSpeed links mapping.optim_fragment lazily after
        # the first optimizer step of group 0 only, so later groups' fragments stay unlinked.
        flat = self._zero.single_partition_of_fp32_groups[self._group_of[id(p)]]
        address = mapping.get_hp_fragment_address()
        for kind in self._state_kinds(flat):
            yield kind, shape, start, self._base.state[flat][kind].narrow(0, address.start, address.numel)

    def fragments(self) -> Iterator[Fragment]:
        with torch.no_grad():
            for name, p in self._names:
                for kind, shape, start, local in self._local_ranges(name, p):
                    yield Fragment(name, kind, shape, start, local)
                if self.ctx.rank == 0:
                    flat = self._flat_of(p)
                    step = None if flat is None else self._step_tensor(flat)
                    if step is not None:
                        yield Fragment(name, "step", (1,), 0, step.view(1))

    def load_fragments(self, source: FragmentSource) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        self.ensure_optimizer_state()
        steps_done: set[int] = set()
        with torch.no_grad():
            for name, p in self._names:
                if self.stage == 3 and p.requires_grad:
                    # Through DeepSpeed's setters (they handle optimizer swapping); padding kept as is.
                    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

                    for kind, _, start, local in self._local_ranges(name, p):
                        if kind != "param" and not source.has(name, kind):
                            continue
                        getter = (safe_get_local_fp32_param(p) if kind == "param"
                                  else safe_get_local_optimizer_state(p, kind))
                        full = getter.detach().clone().view(-1)
                        full[: local.numel()] = source.read(name, kind, start, start + local.numel()).to(full.dtype)
                        if kind == "param":
                            safe_set_local_fp32_param(p, full)
                        else:
                            safe_set_local_optimizer_state(p, full, kind)
                elif self.stage == 2 and id(p) not in self._group_of:
                    p.data.view(-1).copy_(source.read(name, "param", 0, p.numel()).to(p.dtype))
                else:
                    for kind, _, start, local in self._local_ranges(name, p):
                        if kind != "param" and not source.has(name, kind):
                            continue
                        local.copy_(source.read(name, kind, start, start + local.numel()).to(local.dtype))
                flat = self._flat_of(p)
                if flat is not None and id(flat) not in steps_done and source.has(name, "step"):
                    step = self._step_tensor(flat)
                    if step is not None:
                        step.copy_(source.read(name, "step", 0, 1).reshape(step.shape).to(step.dtype))
                        steps_done.add(id(flat))
        self._refresh_working_params()

    def _refresh_working_params(self) -> None:
        """Copy the fp32 master partitions into the working (lp) parameters, as after a step."""
        z = self._zero
        with torch.no_grad():
            if self.stage == 2:
                z.update_lp_params()  # local copy + all-gather of every rank's partition
            else:
                for sub_group in range(len(z.fp16_groups)):
                    z._reassign_or_swap_out_partitioned_parameters(sub_group)
                persistent = getattr(z, "persistent_parameters", [])
                if persistent:
                    persistent[0].all_gather(persistent)
