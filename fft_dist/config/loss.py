"""The loss section: the named terms added to the format's cross-entropy, and the modules of your own that
register terms or formats."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fft_dist.errors import ConfigError
from fft_dist.plugins import check_names as check_plugin_names


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
    chunk_size: int = 0
    """Tokens per chunk of the output projection and cross-entropy (training and evaluation), so no tokens x
    vocabulary logits exist: memory grows with chunk x vocabulary, and only loss-bearing tokens go through the
    head. Backward recomputes each chunk (one more head matmul). 0: off (the model's full logits). The
    family's head rules still apply (tied heads, Gemma-2's soft-capping, Granite's and Cohere's logit
    scaling). Token objectives only: a classification head is never chunked. E.g. 1024."""

    def __post_init__(self) -> None:  # typed once on the launcher: a path or code never reaches a rank
        check_plugin_names(self.plugins, "loss.plugins")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ConfigError(f"loss.chunk_size={self.chunk_size!r}: tokens per chunk, an integer >= 0 (0: off)")
