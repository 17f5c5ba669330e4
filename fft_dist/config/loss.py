"""The loss section: the named terms added to the format's cross-entropy, and the modules of your own that
register terms or formats."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fft_dist.errors import ConfigError
from fft_dist.plugins import check_names as check_plugin_names


class ReferenceDtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _weight(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{option}={value!r}: a finite number >= 0 (0: off)")
    return float(value)


@dataclass
class KDConfig:
    """Distillation from the model the run started from (fft_dist/loss/kd.py)."""

    weight: float = 0.0
    """lambda of the distillation term T^2 x KL(reference || model), summed over the loss-bearing tokens and
    divided by the global count of those tokens (like the cross-entropy); logged as kd_loss. 0: off (no
    reference model is built). Token objectives only (refused with a classification format)."""
    temperature: float = 1.0
    """T > 0: both models' logits are divided by T before the softmax; the term is multiplied by T^2 so its
    gradient keeps the same scale whatever T (Hinton et al.)."""
    reference: str | None = None
    """A Hugging Face model folder to distil from (same architecture and vocabulary); null: the model the run
    started from (model.path, or the seeded initial weights). Rebuilt from this source on a resume (never
    checkpointed); frozen and sharded like the backend (a plain copy under none, FSDP2 under fsdp/hsdp,
    ZeRO-3 inference under zero2/zero3: its parameter bytes / N per rank)."""
    reference_dtype: ReferenceDtype = ReferenceDtype.auto
    """The reference's parameter dtype: auto (as the trainable model's), fp32, or bf16 (half the bytes; its
    logits then differ from fp32's by about 1e-2 relative, so kd_loss is good to about 1e-2 of its value)."""

    def __post_init__(self) -> None:
        self.weight = _weight(self.weight, "loss.kd.weight")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"loss.kd.temperature={t!r}: a finite number > 0")
        self.temperature = float(t)
        if self.reference is not None and (not isinstance(self.reference, str) or not self.reference.strip()):
            raise ConfigError(f"loss.kd.reference={self.reference!r}: a model folder, or null (the starting model)")


@dataclass
class L2SPConfig:
    """A pull toward the starting weights (L2-SP, fft_dist/loss/l2sp.py)."""

    weight: float = 0.0
    """lambda: after each optimizer step, theta <- theta - lr x lambda x (theta - theta0) on each rank's own
    shard (decoupled, like AdamW's weight decay but toward theta0, the weights the run started from: model.path
    or the seeded initial weights, rebuilt from that source on a resume). lambda x ||theta - theta0||^2 is logged
    as l2sp_loss. Costs one more copy of the rank's parameter shard. Not under parallelism=hsdp (refused: its
    later replica groups own no ranges). 0: off."""

    def __post_init__(self) -> None:
        self.weight = _weight(self.weight, "loss.l2sp.weight")


AUTO_CHUNK = -1
"""loss.chunk_size's default: decided by :meth:`LossConfig.chunk_for`."""
DEFAULT_CHUNK = 1024
"""What auto chunks by. The loss then holds about 10 x 1024 x vocabulary bytes (1.3 GB at 128k, bf16) instead of
10 x tokens x vocabulary (10.5 GB at 2 x 4096 tokens); a 1024-row head matmul still fills a GPU (h = 4096:
about 1 TFLOP per chunk), so the loop over chunks costs no measurable speed; a tiny run's micro batch is one
chunk. Parity with the full logits (1e-6) is tested on none, fsdp, hsdp, zero2 and zero3."""


BUILT_IN_TERMS = frozenset({"router_aux"})
"""loss.terms that never read the full logits (auto chunking stays on with them)."""


@dataclass
class LossConfig:
    """The loss: the data format's cross-entropy (logged as `loss`) plus these named terms."""

    terms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"router_aux": {}})
    """Terms added to the cross-entropy: name -> its options. router_aux: the MoE router's load-balancing
    loss, active when the model's config asks for it (output_router_logits, router_aux_loss_coef). Add one
    with +loss.terms.<name>={...}; drop one with ~loss.terms.<name>."""
    plugins: list[str] = field(default_factory=list)
    """Importable module names (a.b.c, never paths) that register terms with fft_dist.loss.register_term;
    imported on every rank before training (a malformed name is refused when the config is typed)."""
    chunk_size: int = -1
    """Tokens per chunk of the output projection and cross-entropy (training and evaluation), so no tokens x
    vocabulary logits exist: memory grows with chunk x vocabulary, and only loss-bearing tokens go through the
    head. Backward recomputes each chunk (one more head matmul). 0: off (the model's full logits). -1 (the
    default): auto, 1024 for token objectives unless loss.terms names a term other than the built-in router_aux
    (such a term may read the full logits, which chunking does not compute: set a size to chunk with it). The family's head rules still
    apply (tied heads, Gemma-2's soft-capping, Granite's and Cohere's logit scaling). A classification head is
    never chunked."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation from the starting (or a named) model: loss.kd.weight, temperature, reference, reference_dtype."""
    l2sp: L2SPConfig = field(default_factory=L2SPConfig)
    """The decoupled pull toward the starting weights: loss.l2sp.weight."""

    def __post_init__(self) -> None:  # typed once on the launcher: a path or code never reaches a rank
        check_plugin_names(self.plugins, "loss.plugins")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < AUTO_CHUNK:
            raise ConfigError(f"loss.chunk_size={self.chunk_size!r}: tokens per chunk, an integer >= 0 (0: off), or "
                              f"{AUTO_CHUNK} (auto: {DEFAULT_CHUNK})")

    def chunk_for(self, *, token_objective: bool) -> int:
        """The chunk size a run uses (0: full logits): auto resolved, and never for a classification head."""
        if not token_objective:
            return 0
        if self.chunk_size == AUTO_CHUNK:
            return 0 if any(name not in BUILT_IN_TERMS for name in self.terms) else DEFAULT_CHUNK
        return self.chunk_size
