"""Every patch fft-dist applies to DeepSpeed, transformers or torch globals for the ZeRO strategies.

Each one names the version it was written against (DeepSpeed 0.19.8, transformers 5.23, torch
2.13) and why it exists, and each one is undone or scoped as narrowly as the library allows. Revisit
them when those versions change. ``import deepspeed`` happens only inside these functions.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from typing import Iterator

import torch
from torch import nn


def import_deepspeed():
    """Import DeepSpeed with the CPU accelerator where there is no GPU, and without the shm op.

    Call ``check_deepspeed`` first: it reports a missing DeepSpeed with the install command.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed 0.19 picks cpu anyway, but warns
    import deepspeed

    # DeepSpeed 0.19.8: every init_distributed() builds the `deepspeed_shm_comm_op` extension
    # (about 40 s on a fresh machine). It serves inference all-reduce only; training never calls
    # it. `import deepspeed.comm.torch as m` would bind the torch package, hence import_module.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
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
def hf_init_on_gathered_params(deepspeed) -> Iterator[None]:
    """Run transformers' weight init at the usual moments under ``zero.Init``, on gathered parameters.

    transformers 5.x, DeepSpeed 0.19: under ``zero.Init`` each module's parameters are partitioned
    as soon as the module is built, so the init that ``post_init`` runs would touch empty tensors.
    transformers' own ZeRO-3 route (a live ``HfDeepSpeedConfig``) defers all init to the end and
    draws on rank 0 only: the weights come from another random stream than the same seed gives
    under fsdp / zero2 / none (the first loss differs). Patching
    ``PreTrainedModel._initialize_weights`` (its signature in transformers 5.23:
    ``(self, module, is_custom_code=False)``) to gather one module's parameters while it runs, on
    every rank, gives bit-identical weights and RNG state at a peak of one module's parameters.
    Undone on exit. Enter it before ``zero.Init``: DeepSpeed 0.19 replaces ``torch.Tensor.__new__``
    inside ``zero.Init``, and importing transformers' modeling code there (which imports
    ``torch._dynamo``, torch 2.13) fails with a signature mismatch.
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


def keep_arange_dtype() -> contextlib.AbstractContextManager:
    """transformers' own guard (5.x) that stops ``zero.Init`` from casting RoPE's ``torch.arange``.

    DeepSpeed 0.19's ``zero.Init`` wraps tensor constructors to its dtype; the rotary ``inv_freq``
    is then computed from a rounded arange. Enter it before ``zero.Init``; it undoes itself.
    """
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change

        return prevent_arange_dtype_change()
    except ImportError:
        return contextlib.nullcontext()


@contextlib.contextmanager
def full_shapes(params: list[nn.Parameter]) -> Iterator[None]:
    """Let code that looks at ``p.ndim`` / ``p.shape`` (our decay / no-decay split) see the full shapes.

    DeepSpeed 0.19 ZeRO-3: under ``zero.Init`` every parameter's ``.data`` is an empty 1-D
    placeholder, so ``p.ndim`` is 1 for every weight. A zero-stride view of one element has the
    full shape and costs no memory. The placeholders are put back on exit.
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


class ScopedZero3Linear:
    """Keep DeepSpeed's ZeRO-3 ``F.linear`` inside our engine calls instead of the whole process.

    DeepSpeed 0.19.8: entering ``zero.Init`` (with ``zero_optimization.memory_efficient_linear``,
    default true) replaces ``torch.nn.functional.linear`` with ``zero3_linear_wrap`` and never puts
    it back, so every later ``nn.Linear`` in the process (an FSDP run after a ZeRO-3 run in one
    process, user code after training) goes through DeepSpeed's autograd function. That function
    matters during ZeRO-3 forward and backward: it saves the weight parameter itself for backward,
    while plain ``F.linear`` saves a view of the gathered weight, which would keep every layer's
    full weight alive between forward and backward after ZeRO-3 has released it.

    So: :meth:`capture` (after the engine is built) takes DeepSpeed's version, if it was installed,
    and restores the original; :meth:`scope` installs DeepSpeed's version around each forward and
    backward of the engine (activation-checkpointing recompute runs in backward) and restores it after.
    """

    def __init__(self):
        self.original = torch.nn.functional.linear
        self.zero3_linear = None

    def capture(self) -> None:
        current = torch.nn.functional.linear
        if current is not self.original:
            self.zero3_linear = current
            torch.nn.functional.linear = self.original

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        if self.zero3_linear is None:
            yield
            return
        torch.nn.functional.linear = self.zero3_linear
        try:
            yield
        finally:
            torch.nn.functional.linear = self.original
