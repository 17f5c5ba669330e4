"""What the run started from, kept beside it: the distillation reference (``loss.kd``) and theta0 for the
pull toward the starting weights (``loss.l2sp``).

Both are rebuilt from their source whenever a run starts, a resumed one included, and never checkpointed:
the reference is hosted by the strategy (:meth:`fft_dist.strategy.base.Strategy.host_frozen`: sharded like
the backend) and filled from ``loss.kd.reference`` or ``model.path`` (else it keeps the seeded initial
weights, built as the trainable model's are); theta0 is a copy of the rank's parameter ranges taken right
after the trainable model was built and loaded, before a checkpoint is loaded into it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fft_dist.config import FFTConfig
from fft_dist.errors import ConfigError
from fft_dist.loss.kd import Reference
from fft_dist.loss.l2sp import Anchor

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def host_reference(cfg: FFTConfig, strategy, hf_config, *, build: Callable[[], Any],
                   wrap: Callable[[Any], Any] | None) -> Reference | None:
    """Collective: the distillation reference (None when loss.kd.weight is 0). `build`: builds the model as the
    trainable one was (same seed); `wrap`: the source wrapper the trainable model was loaded through (a grown
    vocabulary), applied to the reference's folder too."""
    kd = cfg.loss.kd
    if not kd.weight:
        return None
    if not strategy.capabilities.frozen_model:
        raise ConfigError(f"loss.kd.weight={kd.weight}: parallelism={cfg.parallelism.name.value} cannot host the "
                          "frozen reference model; set loss.kd.weight=0")
    frozen = strategy.host_frozen(build, DTYPES[kd.reference_dtype.value])
    folder = kd.reference or cfg.model.path
    if folder is not None:
        from fft_dist.checkpoint import HFFolderSource
        from fft_dist.models.conversions import meta_model

        option = "loss.kd.reference" if kd.reference else "model.path"
        meta = meta_model(hf_config)
        source = HFFolderSource(folder, model=meta)
        source = wrap(source) if wrap is not None else source
        wrong = [f"{n} {tuple(p.shape)} vs {source.shape(n)}" for n, p in meta.named_parameters()
                 if source.shape(n) is None or tuple(source.shape(n)) != tuple(p.shape)]
        if wrong:
            raise ConfigError(f"{option}={folder}: not the trained model's architecture; the reference needs the "
                              f"same parameters and shapes (model vs folder): {', '.join(wrong[:6])}")
        frozen.load_fragments(source)
        source.close()
    return Reference(frozen, chunked=bool(cfg.loss.chunk_for(token_objective=True)))  # kd: tokens only


def anchor(cfg: FFTConfig, strategy) -> Anchor | None:
    """theta0 for loss.l2sp (None when its weight is 0): call after the model is built and loaded, before a
    resume loads a checkpoint into it."""
    if not cfg.loss.l2sp.weight:
        return None
    from fft_dist.dist import all_reduce_sum

    held = Anchor.capture(cfg.loss.l2sp.weight, strategy.fragments())
    if float(all_reduce_sum([0.0 if held.start else 1.0])[0]):  # agreed: every rank raises or none does
        raise ConfigError(f"loss.l2sp.weight={cfg.loss.l2sp.weight}: parallelism={cfg.parallelism.name.value} leaves "
                          "some ranks without parameter ranges of their own (hsdp: the replica groups after the "
                          "first), so the pull would not reach their copies; set loss.l2sp.weight=0")
    return held
