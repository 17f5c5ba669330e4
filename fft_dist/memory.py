"""Per-GPU memory of a training set-up, estimated from the typed config (pure: no processes).

The model is built on the meta device, so the parameter count, the largest decoder layer and
the largest single module are real without allocating anything. The model-state bytes come from each
backend's descriptor (:mod:`fft_dist.strategy.backends`); activations and the table are assembled here.
The byte rules per backend are docs/memory.md; the fp32 layouts are the ones
measured per rank in tests/unit/test_memory.py (and tests/e2e/test_deepspeed.py). Vocabulary:
:mod:`fft_dist.strategy.sizing`.

`auto` settings are estimated as a rank on a GPU with bf16 decides them (fft_dist.device_defaults:
precision bf16, DeepSpeed's bf16 weights): `estimate` and `plan` run on login nodes without GPUs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fft_dist.config import DataFormat, FFTConfig, Precision
from fft_dist.config.checkpoint import AsyncSave
from fft_dist.strategy import backend as registry
from fft_dist.strategy.sizing import (  # noqa: F401 - re-exported: memory's public vocabulary
    ModelShape, Setup, native_16bit, optimizer_bytes_per_param, planned,
)

BACKENDS = tuple(registry.listed_rows(gpus=1))
"""The rows of every estimate table (none, fsdp, zero2, zero3, zero2_offload, zero3_offload)."""
GIB = 1024**3


def model_shape(cfg: FFTConfig) -> ModelShape:
    """Build the configured model on the meta device (no memory) and read its shape."""
    import torch
    from transformers import AutoModelForCausalLM

    from fft_dist.model import apply_freeze, decoder_layers, hf_config
    from fft_dist.models.family import dimension

    config = hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    apply_freeze(model, cfg.model)
    params = list({id(p): p for p in model.parameters()}.values())
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    largest_module = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    hidden = dimension(config, "hidden_size")
    heads = dimension(config, "num_attention_heads")
    kv_heads = dimension(config, "num_key_value_heads", default=heads)
    intermediate = dimension(config, "intermediate_size", default=4 * hidden)
    names = {n.rsplit(".", 1)[-1] for n, _ in layers[0].named_modules()} if layers else set()
    return ModelShape(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        hidden=hidden, layers=len(layers), intermediate=intermediate, kv_hidden=hidden * kv_heads // heads,
        heads=heads, vocab=int(config.vocab_size), gated_mlp="gate_proj" in names or "w3" in names,
        largest_layer=max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0),
        largest_module=largest_module,
        root_params=sum(p.numel() for p in params if id(p) not in in_layers),
        param_sizes=tuple(p.numel() for p in params),
        attention=config._attn_implementation,  # noqa: SLF001 - resolved by hf_config (auto -> the family's)
    )


def assumptions(cfg: FFTConfig) -> str:
    """What the table assumes for the `auto` settings (its header says so: the GPU is not here)."""
    deepspeed = next((b.name for b in registry.backends() if b.deepspeed_stage), cfg.parallelism.name)
    decided = planned(cfg, deepspeed)  # as a ZeRO row decides (bf16 weights are DeepSpeed's own mode)
    text = f"precision {decided.precision.value}" + (" (auto: as on a GPU with bf16)" if "train.precision" in decided.auto
                                                      else "")
    if decided.precision == Precision.bf16:
        text += f", ZeRO rows with {'bf16' if decided.bf16_weights else 'fp32'} weights" + (
            " (parallelism.bf16_weights=auto on that GPU)" if "parallelism.bf16_weights" in decided.auto else "")
    return text


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, checkpointing: bool,
                     precision: Precision, eager_attention: bool = False, chunk: int = 0) -> int:
    """Bytes saved for backward during one micro batch (docs/memory.md states the formula).

    Per token and decoder layer the saved tensors are: the two norms' inputs and outputs (4h),
    q and k after RoPE (h + h_kv), v (h_kv), the attention output (h), and the MLP's gate, up,
    act(gate) and their product (4i; 2i for a plain MLP). sdpa keeps no s x s scores; eager adds
    them. Checkpointing keeps each layer's input and recomputes one layer at a time. The logits
    add b s V (e + 4): the logits and the fp32 log-softmax the loss saves (+4 for the fp32 copy
    of 16-bit logits); with loss.chunk_size (`chunk`) they are one chunk's (:func:`logits_bytes`).
    """
    e = 4 if Precision(precision) == Precision.fp32 else 2
    tokens = micro_batch * seq_len
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate
    per_layer = tokens * (6 * shape.hidden + 2 * shape.kv_hidden + mlp) * e
    if eager_attention:
        per_layer += micro_batch * shape.heads * seq_len * seq_len * e
    logits = logits_bytes(shape, tokens, e, chunk)
    if checkpointing:
        return shape.layers * tokens * shape.hidden * 4 + per_layer + logits
    return shape.layers * per_layer + logits


def logits_bytes(shape: ModelShape, tokens: int, e: int, chunk: int = 0) -> int:
    """The loss's vocabulary-sized memory. Full logits (chunk 0): the logits (e bytes), their fp32 copy under
    16-bit compute, and the loss's fp32 log-softmax. Chunked (fft_dist.loss.chunked): one chunk's logits in the
    compute dtype under 16-bit compute and two fp32 chunk-sized buffers (its logits and the softmax), plus the
    loss-bearing rows and their fp32 log-sum-exp kept for backward (tokens x (h e + 4))."""
    if not chunk:
        return tokens * shape.vocab * (e + 4 + (0 if e == 4 else 4))
    return min(tokens, chunk) * shape.vocab * ((0 if e == 4 else e) + 8) + tokens * (shape.hidden * e + 4)


def eval_activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, precision: Precision,
                          eager_attention: bool = False, chunk: int = 0) -> int:
    """The peak of one eval forward (no_grad, eval.micro_batch_size rows): nothing is saved for
    backward, so it is the larger of one layer's intermediates and the logits with the loss's fp32
    copies, plus the hidden states carried between layers. Eval's micro batch (default 8) is larger
    than training's, so at a 128k vocabulary this can be the run's activation peak.
    """
    if micro_batch <= 0:
        return 0
    e = 4 if Precision(precision) == Precision.fp32 else 2
    tokens = micro_batch * seq_len
    layer = activation_bytes(dataclasses.replace(shape, layers=1, vocab=0), micro_batch=micro_batch,
                             seq_len=seq_len, checkpointing=False, precision=precision,
                             eager_attention=eager_attention)
    return max(layer, logits_bytes(shape, tokens, e, chunk)) + tokens * shape.hidden * e


def runs_eval(cfg: FFTConfig) -> bool:
    """Whether the run has an eval set (an eval forward at eval.micro_batch_size happens)."""
    return cfg.data.eval_path is not None or cfg.data.eval_fraction > 0 or bool(cfg.data.mixture)


def setup_for(cfg: FFTConfig, backend: str, gpus: int, *, micro_batch: int | None = None,
              checkpointing: bool | None = None, eval_micro_batch: int | None = None) -> Setup:
    """A row's knobs: the config's own, unless given."""
    return Setup(backend, gpus, cfg.train.micro_batch_size if micro_batch is None else micro_batch,
                 cfg.data.max_length, cfg.model.activation_checkpointing if checkpointing is None else checkpointing,
                 (cfg.eval.micro_batch_size if runs_eval(cfg) else 0) if eval_micro_batch is None else eval_micro_batch,
                 shard_size=configured_shard_size(cfg, backend, gpus) or 0)


def configured_shard_size(cfg: FFTConfig, backend: str, gpus: int) -> int | None:
    """The row's shard group at `gpus` GPUs as configured, from its descriptor (HSDP); None for a backend
    without groups, or where the configured group does not fit `gpus`."""
    group_size = registry.row_backend(backend).group_size
    return group_size(cfg, gpus) if group_size else None


def estimate(shape: ModelShape, cfg: FFTConfig, setup: Setup) -> dict[str, Any]:
    """One row: per-GPU bytes by category, CPU bytes per GPU for offload, and what the buckets are."""
    backend, n = setup.parallelism, setup.gpus
    psi, t = shape.params, shape.trainable
    precision = planned(cfg, backend).precision
    state = registry.row_backend(backend).memory(shape, cfg, setup)
    params, grads, master, optim, detail, cpu = (state.params, state.grads, state.master, state.optim,
                                                 state.detail, state.cpu)
    eager = shape.attention == "eager"
    chunk = cfg.loss.chunk_for(token_objective=cfg.data.format != DataFormat.classification.value)
    acts = {on: activation_bytes(shape, micro_batch=setup.micro_batch, seq_len=setup.seq_len, checkpointing=on,
                                 precision=precision, eager_attention=eager, chunk=chunk)
            for on in (False, True)}
    eval_acts = eval_activation_bytes(shape, micro_batch=setup.eval_micro_batch, seq_len=setup.seq_len,
                                      precision=precision, eager_attention=eager, chunk=chunk)
    buffers = sum(v for key, v in detail.items() if key != "persistent_params")
    # training's saved activations and eval's forward never coexist: the larger one is the peak
    per_gpu = {"params": params, "grads": grads, "master": master, "optimizer": optim,
               "activations": max(acts[setup.checkpointing], eval_acts), "buffers": buffers}
    copies, cpu_copies = kept_copies(shape, cfg, setup)
    per_gpu.update(copies)
    cpu += cpu_copies
    per_gpu["total"] = sum(per_gpu.values())
    return {"staging_bytes_per_gpu": staging_bytes(shape, cfg, setup), "parallelism": backend, "gpus": n, "params": psi, "trainable_params": t,
            "micro_batch_size": setup.micro_batch, "seq_len": setup.seq_len,
            "activation_checkpointing": setup.checkpointing, "eval_micro_batch_size": setup.eval_micro_batch,
            "per_gpu_bytes": per_gpu,
            "activations_by_checkpointing": {"off": acts[False], "on": acts[True]},
            "train_activations": acts[setup.checkpointing], "eval_activations": eval_acts,
            "cpu_bytes_per_gpu": cpu, "detail": detail, **({"shard_size": setup.shard_size} if setup.shard_size else {})}


KEPT = {"kd_reference": "kd reference", "l2sp_theta0": "l2sp theta0"}
"""per_gpu_bytes keys of what a run keeps beside the model (only present when on) -> their names in the table."""


def kept_copies(shape: ModelShape, cfg: FFTConfig, setup: Setup) -> tuple[dict[str, int], int]:
    """What loss.kd and loss.l2sp keep beside the trainable model, per GPU (named entries) and per GPU in CPU
    memory (theta0 of an offloaded row lives with its fp32 partition). The reference (fft_dist/reference.py):
    its parameter bytes / N, in loss.kd.reference_dtype (auto: as the trainable weights are held: fp32 under
    none / fsdp / hsdp, DeepSpeed's weight dtype on the ZeRO rows), as a plain copy (none), FSDP2 (fsdp: /N,
    hsdp: /shard group) or ZeRO-3 inference (zero2 and zero3: /N, but parameters under ZeRO-3's persistence
    threshold stay whole). theta0 (fft_dist/loss/l2sp.py): a copy of the rank's own parameter ranges, fp32:
    the whole model (none), its FSDP2 shard (fsdp), the fp32 master partition of the trainable ones (ZeRO)."""
    backend, n = setup.parallelism, setup.gpus
    descriptor = registry.row_backend(backend)
    out: dict[str, int] = {}
    cpu = 0
    if cfg.loss.kd.weight:
        dtype = cfg.loss.kd.reference_dtype.value
        zero = descriptor.deepspeed_stage is not None
        e = {"bf16": 2, "fp32": 4}.get(dtype) or (2 if zero and native_16bit(cfg, backend) else 4)
        if descriptor.single_process:
            held = shape.params
        elif zero:
            from fft_dist.strategy.backends.zero import deepspeed_parallelism
            from fft_dist.strategy.deepspeed_config import bucket_sizes

            threshold = bucket_sizes(deepspeed_parallelism(cfg.parallelism, "zero3"), hidden_size=shape.hidden,
                                     on_gpu=True)["param_persistence_threshold"]
            persistent = sum(size for size in shape.param_sizes if size <= threshold)
            held = (shape.params - persistent) // n + persistent
        else:
            held = shape.params // (setup.shard_size or n)
        out["kd_reference"] = e * held
    if cfg.loss.l2sp.weight and not descriptor.group_size:  # replica groups (hsdp): L2-SP is refused there
        if descriptor.single_process:
            theta0 = 4 * shape.params
        elif descriptor.deepspeed_stage is not None:
            theta0 = 4 * shape.trainable // n
        else:
            theta0 = 4 * shape.params // n
        if any(r.name == backend and r.offload for r in descriptor.rows):
            cpu += theta0
        else:
            out["l2sp_theta0"] = theta0
    return out, cpu


def staging_bytes(shape: ModelShape, cfg: FFTConfig, setup: Setup) -> int:
    """Host memory of checkpoint.async_save's staging buffer per GPU (0 when off): a copy of what the rank
    checkpoints, its share of the fp32 weights and of the optimizer states (fft_dist/checkpoint/stage.py; the
    rank decides auto before training with this formula at its real share
    (stage.projected_staging_bytes), against its host's available memory)."""
    if cfg.checkpoint.async_save == AsyncSave.off:
        return 0
    descriptor = registry.row_backend(setup.parallelism)
    share = 1 if descriptor.single_process else (setup.shard_size or setup.gpus)
    return (4 * shape.params + optimizer_bytes_per_param(cfg) * shape.trainable) // share


def model_state_bytes(row: dict[str, Any]) -> int:
    """Parameters, gradients, master and optimizer states of a row: what a rank holds between steps."""
    b = row["per_gpu_bytes"]
    return b["params"] + b["grads"] + b["master"] + b["optimizer"]


def backends_for(gpus: int, cfg: FFTConfig | None = None) -> tuple[str, ...]:
    """The listed rows at `gpus` (`none` is one process: 1 GPU only), and the configured backend's own
    row when it has no listed ones (hsdp), where it can run at `gpus`."""
    rows = tuple(registry.listed_rows(gpus=gpus))
    chosen = registry.get(cfg.parallelism.name) if cfg is not None else None
    if chosen is None or chosen.rows or (chosen.single_process and gpus != 1):
        return rows
    if chosen.group_size and chosen.group_size(cfg, gpus) is None:
        return rows
    return rows + (chosen.name,)


USABLE = 0.9
"""The budget: the share of a GPU's memory the estimate may count on; the rest is the CUDA context,
NCCL's buffers and the allocator's own use."""
HEADROOM = 0.10
"""Default share of the budget a plan leaves free for what the estimate does not see (temporaries,
fragmentation, estimate error): `--headroom`."""


def budget(gpu_mem: int) -> float:
    return USABLE * gpu_mem


def limit(gpu_mem: int, headroom: float = HEADROOM) -> float:
    """The most a set-up may need on a GPU of ``gpu_mem``: the budget less ``headroom`` of it."""
    return budget(gpu_mem) * (1.0 - headroom)


def estimate_table(cfg: FFTConfig, shape: ModelShape, gpus: list[int], *, gpu_mem: int | None = None,
                   headroom: float = HEADROOM) -> list[dict[str, Any]]:
    """Every backend at every GPU count for the configured micro batches, sequence length and
    checkpointing; with ``gpu_mem`` each row says whether it fits (within :func:`limit`)."""
    rows = []
    for n in gpus:
        for backend in backends_for(n, cfg):
            row = estimate(shape, cfg, setup_for(cfg, backend, n))
            if gpu_mem is not None:
                row["fits"] = fits(row, gpu_mem, headroom=headroom)
            rows.append(row)
    return rows


def fits(row: dict[str, Any], gpu_mem: int, *, headroom: float = HEADROOM) -> bool:
    return row["per_gpu_bytes"]["total"] <= limit(gpu_mem, headroom)


def format_table(rows: list[dict[str, Any]], gpu_mem: int | None = None) -> str:
    """A fixed-width table in GiB, one line per row; `activations` is the larger of `train` and `eval`."""
    cols = ["params", "grads", "master", "optimizer", "activations", "buffers", "total"]
    toggled = "tr-AC" if rows and rows[0]["activation_checkpointing"] else "tr+AC"  # training's, AC toggled
    head = (f"{'backend':14s} {'gpus':>4s} " + " ".join(f"{c[:6]:>7s}" for c in cols)
            + f" {'train':>7s} {toggled:>7s} {'eval':>7s} {'cpu':>7s} {'stage':>7s}")
    if gpu_mem is not None:
        head += "  fits"
    lines = [head]
    for r in rows:
        b = r["per_gpu_bytes"]
        other = r["activations_by_checkpointing"]["off" if r["activation_checkpointing"] else "on"]
        name = r["parallelism"] + (f" shard {r['shard_size']}" if r.get("shard_size") else "")
        line = (f"{name:14s} {r['gpus']:4d} " + " ".join(f"{b[c] / GIB:7.2f}" for c in cols)
                + "".join(f" {x / GIB:7.2f}" for x in (r["train_activations"], other, r["eval_activations"],
                                                        r["cpu_bytes_per_gpu"], r["staging_bytes_per_gpu"])))
        if gpu_mem is not None:
            line += "  yes" if r["fits"] else "  no"
        lines.append(line)
        kept = [f"{name} {b[key] / GIB:.2f}" for key, name in KEPT.items() if key in b]
        if kept:
            lines.append(f"{'':19s}of the total: {', '.join(kept)} GiB")
    return "\n".join(lines)
