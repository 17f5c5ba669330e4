"""What a resume must refuse, and what it must say, when the run differs from the checkpoint.

Tensor shapes are checked by the checkpoint reader. These rules catch what shapes cannot: a
model trained for another task (causal LM vs sequence classification), an architecture with the
same shapes (8 heads of 16 vs 16 heads of 8), an optimizer whose state would be silently
dropped, and changes of batch size or schedule that change the optimisation problem without an error.
"""
from __future__ import annotations

import json
from typing import Any

# transformers config entries that describe how a model runs, not what it computes.
RUNTIME_KEYS = frozenset({
    "transformers_version", "_name_or_path", "use_cache", "_attn_implementation", "attn_implementation",
    "_attn_implementation_autoset", "dtype", "torch_dtype", "architectures", "output_hidden_states",
    "output_attentions", "return_dict", "_commit_hash", "torchscript", "use_return_dict",
})


def _arch(config: dict | None) -> dict[str, Any]:
    """The architecture entries, as JSON sees them (the saved side went through JSON: int keys became str)."""
    plain = json.loads(json.dumps(config or {}, default=str))
    return {k: v for k, v in plain.items() if k not in RUNTIME_KEYS}


def saved_optimizer(envelope: dict) -> str | None:
    """The optimizer the checkpoint was trained with (from its meta, or its config snapshot)."""
    meta = envelope.get("meta") or {}
    if isinstance(meta.get("optimizer"), str):
        return meta["optimizer"]
    from omegaconf import OmegaConf

    try:
        snapshot = OmegaConf.create(envelope.get("config_yaml") or "{}")
        return OmegaConf.select(snapshot, "optimizer.name", default=None)
    except Exception:  # noqa: BLE001 - an unreadable snapshot only means we cannot tell
        return None


TASK_FORMATS = {"causal_lm": "data.format text, prompt_completion, chat or tokenized",
                "sequence_classification": "data.format=classification"}
"""Each task fft_dist.model builds for, and the formats that train it."""


def saved_task(envelope: dict) -> str:
    """The task the checkpoint's model was built for; checkpoints from before tasks were recorded are causal LMs."""
    task = (envelope.get("meta") or {}).get("task")
    return task if isinstance(task, str) else "causal_lm"


def incompatibilities(envelope: dict, *, model_config: dict, optimizer: str, load_optimizer: bool,
                      task: str = "causal_lm") -> list[str]:
    """Reasons the checkpoint cannot continue this run (empty: it can)."""
    before = saved_task(envelope)
    if before != task:  # every other difference (heads, label sets) follows from this one
        return [f"task: the checkpoint holds a {before} model ({TASK_FORMATS.get(before, '?')}), this run trains a "
                f"{task} model ({TASK_FORMATS.get(task, '?')}); to start a new task from its weights, export it "
                "(fft-dist export) and point model.path at the folder instead of resuming"]
    problems = []
    saved, now = _arch(envelope.get("model_config")), _arch(model_config)
    if saved:
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) != now.get(key):
                problems.append(f"model config {key}: checkpoint {saved.get(key)!r}, this run {now.get(key)!r}")
    before = saved_optimizer(envelope)
    if load_optimizer and before is not None and before != optimizer:
        problems.append(
            f"optimizer: the checkpoint holds {before} state, this run uses optimizer={optimizer}, which would drop it; "
            f"resume with optimizer={before}, or start {optimizer} fresh from these weights with "
            "checkpoint.load_optimizer=false"
        )
    return problems


def changes(saved: dict, now: dict) -> list[str]:
    """Human-readable notes for settings that changed but may change on purpose."""
    notes = []
    labels = {"global_batch_size": "train.global_batch_size", "total_steps": "the run length (steps)",
              "warmup_steps": "the warmup (steps)", "num_examples": "the number of training rows",
              "seed": "train.seed (the data order)"}
    for key, label in labels.items():
        if key in saved and key in now and saved[key] != now[key]:
            notes.append(f"{label} changed from {saved[key]} to {now[key]}")
    return notes
