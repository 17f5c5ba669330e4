"""The spec of the fft-dist trainer's own sections of a checkpoint (``train_state`` in train_state.json).

The checkpoint layer keeps ``train_state`` opaque (any caller may store its own dict there), so
the trainer's sections are checked here, before a resume uses them: a negative token count, a
sampler position that is a string or a schedule of ``"x"`` steps is refused with exit 4 and the
field's name, never a traceback and never a run that silently continues from garbage.

What :meth:`fft_dist.trainer.Trainer._save` writes::

    {"trainer": {<TrainState fields but step: the checkpoint's own step is the one step>},
     "sampler": <GlobalBatchSampler.position() or MixtureSampler.position()>,
     "schedule": {"total_steps": int >= 1, "warmup_steps": int >= 0}}

Eval losses may be NaN or +-Infinity: an eval split with no loss-bearing tokens gives NaN
(``fft_dist.evaluation.split_loss``) and a diverging model an infinite loss; JSON stores them as
``NaN``/``Infinity`` and the values are only compared and reported, so a real run's checkpoint
holding one stays resumable. Every other number is a finite count (0 <= n < 2**53).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fft_dist.checkpoint.spec import Bool, Float, Forms, Int, Invalid, MapOf, Nullable, Obj, Spec, Str, parse

COUNT = Int(0)
POSITIVE = Int(1)
SEED = Int(-(2**63), 2**64 - 1, expected="an integer seed (64 bits)")
"""train.seed: any integer torch.manual_seed takes (the config does not restrict its sign)."""
LOSS = Nullable(Float(finite=False))

TRAINER_SPEC = Obj({
    "tokens_seen": COUNT, "skipped_steps": COUNT,
    "best_checkpoint": Nullable(Str(r"step-\d{7,}", expected="a checkpoint folder name (step-NNNNNNN)")),
    "best_eval_loss": LOSS, "best_step": Nullable(COUNT), "evals_without_improvement": COUNT,
    "last_eval_loss": LOSS, "first_eval_loss": LOSS, "last_eval_step": Nullable(COUNT),
    "stopped_early": Bool(),
}, optional={"held_out_first": MapOf(LOSS), "held_out_last": MapOf(LOSS)},  # eval.sets (older checkpoints: none)
    expected="the trainer's counters (an object)")
"""``trainer``: :class:`TrainState`'s fields but ``step`` (tests/unit/test_checkpoint_metadata.py
keeps the two in step)."""

SINGLE_SOURCE_POSITION = Obj({
    "epoch": COUNT, "batch_in_epoch": COUNT, "sample_in_epoch": COUNT, "steps_per_epoch": POSITIVE,
    "seed": SEED, "global_batch_size": POSITIVE, "num_examples": POSITIVE,
}, expected="a single-source sampler position")


def _sources_add_up(position: dict) -> None:
    """MixtureSampler.position(): the sources' samples and rows are the mixture's, split."""
    for key in ("samples", "num_examples"):
        total = sum(s[key] for s in position["sources"].values())
        if total != position[key]:
            raise Invalid(("sources",), f"the sources' {key} add up to {total}, not to {key} {position[key]}")


MIXTURE_POSITION = Obj({
    "samples": COUNT, "samples_per_epoch": POSITIVE, "seed": SEED, "global_batch_size": POSITIVE,
    "num_examples": POSITIVE,
    "sources": MapOf(Obj({"samples": COUNT, "epoch": COUNT, "num_examples": POSITIVE}), min_len=1,
                     expected="an object of sources (name -> position)"),
}, expected="a mixture sampler position", after=_sources_add_up)
SAMPLER_SPEC = Forms(SINGLE_SOURCE_POSITION, MIXTURE_POSITION,
                     expected="a sampler position (single-source or mixture)")
SCHEDULE_SPEC = Obj({"total_steps": POSITIVE, "warmup_steps": COUNT}, expected="the lr schedule's length")

TRAINER_STATE_SPEC: Spec = Obj({"trainer": TRAINER_SPEC, "sampler": SAMPLER_SPEC, "schedule": SCHEDULE_SPEC},
                               expected="the fft-dist trainer's state (an object)")
"""The whole ``train_state`` dict the fft-dist trainer saves."""

def parse_trainer_state(saved: dict, where: str) -> dict:
    """`saved` (the ``train_state`` of a checkpoint the fft-dist trainer wrote) checked against
    :data:`TRAINER_STATE_SPEC` and returned as it is; else a CheckpointError
    ``"<where>: field train_state.<path>: expected ..., got ..."``. `where`: the train_state.json path."""
    return parse(TRAINER_STATE_SPEC, saved, str(where), at=("train_state",))


@dataclass
class TrainState:
    """Everything besides weights and optimizer states that an exact resume needs."""

    step: int = 0
    """Optimizer steps taken. Saved once, as the checkpoint's own step, not in the trainer dict."""
    tokens_seen: int = 0
    skipped_steps: int = 0
    """Steps whose update was dropped for a non-finite gradient norm (train.on_nonfinite=skip)."""
    best_checkpoint: str | None = None
    """The saved checkpoint (folder name) taken at the best eval loss; kept with checkpoint.keep_best."""
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval_loss: float | None = None
    first_eval_loss: float | None = None
    last_eval_step: int | None = None
    stopped_early: bool = False
    held_out_first: dict[str, float] = field(default_factory=dict)
    """eval.sets: each set's first eval loss (step 0), the "before" of the forgetting report."""
    held_out_last: dict[str, float] = field(default_factory=dict)
