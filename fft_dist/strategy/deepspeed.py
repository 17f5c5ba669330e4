"""parallelism=zero2 / zero3 (and the *_offload variants): DeepSpeed ZeRO behind the Strategy seam.

The DeepSpeed config dict and every DeepSpeed rule live in :mod:`.deepspeed_config` (checked
before launch and again here), the patches to DeepSpeed / transformers in :mod:`.deepspeed_compat`.
The optimizer is ours (a client ``torch.optim`` optimizer with our decay / no-decay groups), the
lr comes from our schedule, and the loss normalisation is ours: DeepSpeed only shards, reduces,
clips and steps.

Numerics (the contract every backend meets, tests/e2e/test_deepspeed.py):
- fp32: the same weights at init (ZeRO-3 builds under ``zero.Init`` but runs HF's init at the
  usual moments on gathered parameters, so the random stream is the plain build's) and the same
  loss curve as ``none`` / ``fsdp`` to float round-off.
- bf16 with ``parallelism.bf16_weights=false`` (auto on CPU): fp32 weights (= the master copy) with
  bf16 compute under ``torch.autocast`` and fp32 gradient reductions, which is what ``none`` does.
  ``bf16_weights=true`` (auto on a GPU) is DeepSpeed's own bf16 mode: bf16 working weights, gradients
  and communication, an fp32 master seeded from the bf16-rounded weights; less memory and traffic,
  but the updates differ from the other backends from step 2 on.
- fp16: DeepSpeed's fp16 mode with dynamic loss scaling (CUDA only: check_deepspeed refuses it elsewhere).

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

Mixture-of-Experts: transformers 5 keeps an MoE layer's experts as fused 3-D parameters of one module
(``mlp.experts.gate_up_proj``), which ZeRO-3 gathers whole when that module runs, so a rank whose tokens
skip some experts gathers the same parameters as the others and no DeepSpeed leaf module
(``set_z3_leaf_modules``) is needed (tests/e2e/test_moe_checkpoints.py starves experts on one rank, eager
and grouped_mm experts alike).

``import deepspeed`` happens only inside functions, so FSDP users never need it.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch import nn

from fft_dist.config import BatchPlan, FFTConfig
from fft_dist.device_defaults import DeviceDefaults
from fft_dist.dist import DistContext
from fft_dist.model import compile_layers
from fft_dist.models.head import Head, deferred_head
from fft_dist.optim import set_lr
from fft_dist.strategy.base import (
    Capabilities,
    Fragment,
    FragmentSource,
    LrSchedule,
    OptimizerFactory,
    Strategy,
    model_inputs,
)
from fft_dist.strategy.deepspeed_compat import (
    ScopedZero3Linear,
    full_shapes,
    hf_init_on_gathered_params,
    import_deepspeed,
    keep_arange_dtype,
)
from fft_dist.strategy.deepspeed_config import (
    bucket_sizes,
    check_deepspeed,
    hidden_size_of,
    zero3_inference_config,
    zero_stage,
)
from fft_dist.strategy.frozen_zero import ZeroFrozenModel, build_zero3_frozen
from fft_dist.strategy.initial import build_replicated


class DeepSpeedStrategy(Strategy):
    """ZeRO-2 / ZeRO-3 via a DeepSpeed engine; see the module docstring."""

    capabilities = Capabilities(norm_in_update=True)  # engine.step() computes the norm, clips and steps

    def __init__(self, cfg: FFTConfig, plan: BatchPlan, ctx: DistContext, defaults: DeviceDefaults):
        self.ds_config = check_deepspeed(cfg, plan, defaults)  # the launcher's check again, with this rank's decisions
        self.meta_init = cfg.model.path is not None  # ZeRO-2: the weights are loaded after setup
        self.plan = plan
        self.ctx = ctx
        self.stage = zero_stage(cfg.parallelism)
        self._cfg = cfg  # host_frozen reads the bucket options and the model's hidden size
        self.compile = cfg.train.compile
        self.name = f"zero{self.stage}"
        self._ds = import_deepspeed()
        # The trainer already initialised torch.distributed; DeepSpeed wraps that group.
        self._ds.init_distributed(dist_backend=ctx.backend, dist_init_required=False, verbose=False)
        self._linear = ScopedZero3Linear()
        self.engine = None
        self.model: nn.Module
        self.module: nn.Module
        self.lr_at: LrSchedule
        self._micro = 0  # backward calls since the last step
        self._names: list[tuple[str, nn.Parameter]] = []

    # -- setup -------------------------------------------------------------------------------
    def setup(
        self, *, build_model: Callable[[], nn.Module], make_optimizer: OptimizerFactory, lr_at: LrSchedule
    ) -> None:
        self.lr_at = lr_at
        if self.stage == 3:
            model = self.build_partitioned(build_model)
            with full_shapes(list(model.parameters())):
                optimizer = make_optimizer(model)
        else:  # built once (rank 0, or on meta for model.path), not in every rank's host memory
            model = build_replicated(build_model, self.ctx.device, meta_init=self.meta_init)
            optimizer = make_optimizer(model)
        engine, _, _, _ = self._ds.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.ds_config), dist_init_required=False
        )
        self._linear.capture()  # DeepSpeed's F.linear only inside our engine calls from now on
        self.engine = engine
        self.model = engine
        self.module = engine.module
        if self.compile:  # ZeRO-2 only (check_deepspeed refuses it under ZeRO-3)
            compile_layers(self.module)
        self._names = list(self.module.named_parameters())  # tied weights appear once
        self._zero = engine.optimizer  # DeepSpeedZeroOptimizer (stage 1/2) or DeepSpeedZeroOptimizer_Stage3
        self._base = self._zero.optimizer  # our torch optimizer, now over flat fp32 partitions
        if self.stage == 2:
            self._group_of = {id(p): i for i, group in enumerate(self._zero.bit16_groups) for p in group}

    def build_partitioned(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        """ZeRO-3: build under zero.Init, so no rank ever holds the full model (each module is
        partitioned as soon as it is constructed), with the same weights as a plain build."""
        ds = self._ds
        # Both patches are entered before zero.Init (see deepspeed_compat), and undone after it.
        with keep_arange_dtype(), hf_init_on_gathered_params(ds), \
                ds.zero.Init(config_dict_or_path=copy.deepcopy(self.ds_config)):
            return build_model()

    def host_frozen(self, build_model: Callable[[], nn.Module], dtype: torch.dtype | None = None) -> ZeroFrozenModel:
        """A ZeRO-3 inference engine under zero2 and zero3 alike (:mod:`.frozen_zero`). Its weights are built
        under zero.Init with HF's init on gathered parameters (as ZeRO-3 builds the trainable model), so the
        same seed gives the same weights; under model.path, fill them with ``load_fragments``."""
        # ZeRO-3 whatever the stage: its prefetch and persistence sizes, as a zero3 run of this model would have
        buckets = bucket_sizes(self._cfg.parallelism, hidden_size=hidden_size_of(self._cfg.model),
                               on_gpu=self.ctx.device.type == "cuda")
        config = zero3_inference_config(self.ds_config, buckets, dtype)
        return build_zero3_frozen(self._ds, config, build_model, device=self.ctx.device, rank=self.ctx.rank)

    # -- forward / backward / step -----------------------------------------------------------
    def _set_boundary(self, micro_index: int) -> None:
        # micro_index: 1-based index of the micro batch whose backward comes next.
        self.engine.set_gradient_accumulation_boundary(micro_index >= self.plan.grad_accum)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head: Head | None = None):
        if self.engine.training:
            self._set_boundary(self._micro + 1)
        # ZeRO-3: the head runs in the output embedding's own call, whose hooks gather its weight (and again in backward)
        with self._linear.scope(), deferred_head(self.module, head):
            return self.engine(**model_inputs(input_ids, attention_mask, position_ids, self.ctx.device))

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
        with self._linear.scope():
            self.engine.backward(loss * float(self.ctx.world_size), scale_wrt_gas=False)

    def grad_norm(self) -> None:
        return None  # DeepSpeed computes it inside engine.step()

    def apply_update(self, step: int, norm: float | None) -> float:
        if self._micro != self.plan.grad_accum:
            raise RuntimeError(
                f"step() after {self._micro} backward() calls; the batch plan has {self.plan.grad_accum} "
                "micro batches per optimizer step"
            )
        set_lr(self._base, float(self.lr_at(step)))  # keeps each group's layer-wise lr_scale
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

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
