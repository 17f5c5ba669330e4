"""Evaluation: the loss on each eval set, and the best-loss / patience bookkeeping it drives.

With one source the run reports `eval_loss` (loss-token average over the eval split). With
`data.mixture` each source's eval set is evaluated on its own (`eval_<name>_loss`, a token
average within that source), and `eval_loss`, which picks the best checkpoint and drives
patience, is their weight average: sum(share x eval_<name>_loss) over the sources with an eval
set, shares renormalised to 1. A source's loss then counts as much as its weight says, however
long or many its eval rows are, and a rising replay loss (forgetting) shows on its own.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fft_dist.config import EvalConfig
from fft_dist.data import collate
from fft_dist.data.training import EvalSet
from fft_dist.dist import DistContext, all_reduce_sum
from fft_dist.loss import Objective, StepLoss


class EvalSets:
    """The run's eval sets (iterate over them); len() counts their rows (what the banner shows)."""

    def __init__(self, sets: list[EvalSet]):
        self.sets = list(sets)

    def __iter__(self):
        return iter(self.sets)

    def __len__(self) -> int:
        return sum(len(e.split) for e in self.sets)

    def __bool__(self) -> bool:
        return len(self) > 0


def stop_agreed(should_stop: Callable[[], bool] | None, ctx: DistContext) -> bool:
    """True on every rank when any rank's `should_stop` says so (one small all-reduce)."""
    if should_stop is None:
        return False
    return bool(all_reduce_sum([float(should_stop())], ctx.device)[0] > 0)


@torch.no_grad()
def split_loss(strategy, split, *, ctx: DistContext, cfg: EvalConfig, pad_id: int, objective: Objective,
               should_stop: Callable[[], bool] | None = None,
               step_loss: StepLoss | None = None) -> tuple[float, dict[str, float]] | None:
    """Mean loss over `split`'s loss-bearing units (tokens, or examples), and what the objective reports
    beside it (eval_ppl or eval_accuracy); every rank runs the same number of forwards. None when
    `should_stop` (a stop signal) says so on any rank before a batch: the ranks agree before every
    batch, so a checkpoint is written within a batch's time, not the whole evaluation's. `step_loss`: the run's
    StepLoss, whose head (loss.chunk_size) computes the token loss without full logits."""
    mine = range(ctx.rank, len(split), ctx.world_size)
    size = cfg.micro_batch_size
    # Every rank must run the same number of forwards (FSDP/ZeRO-3 gather collectively).
    n_batches = math.ceil(len(range(0, len(split), ctx.world_size)) / size)
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    total_loss, units, correct = 0.0, 0, 0
    for i in range(n_batches):
        if stop_agreed(should_stop, ctx):
            return None
        rows = split.rows(mine[i * size : (i + 1) * size] or [0])
        batch = collate(rows, pad_id)
        head = step_loss.head(batch) if step_loss is not None else None
        out = strategy.forward(batch["input_ids"], batch["attention_mask"], head=head)
        if mine[i * size : (i + 1) * size]:
            total_loss += float(step_loss.main_sum(batch, out) if head is not None
                                else objective.loss_sum(out.logits, batch["labels"]))
            units += objective.count(batch)
            correct += objective.correct(out.logits, batch) if objective.correct else 0
    total, count, correct = all_reduce_sum([total_loss, units, correct], ctx.device).tolist()
    loss = total / count if count else float("nan")
    return loss, objective.eval_metrics(loss, correct, count)


def evaluate(strategy, sets: EvalSets | list[EvalSet], *, objective: Objective, **kw) -> dict[str, float] | None:
    """{'eval_loss', the objective's own metric (eval_ppl / eval_accuracy), plus 'eval_<name>_loss' per
    named set}; see the module docstring. None when a stop signal cut it short (see :func:`split_loss`)."""
    strategy.train(False)
    results = {}
    for e in sets:
        results[e.name] = split_loss(strategy, e.split, objective=objective, **kw)
        if results[e.name] is None:
            break
    strategy.train(True)
    if any(r is None for r in results.values()):
        return None
    if list(results) == [None]:
        loss, extra = results[None]
        return {"eval_loss": loss, **extra}
    total = sum(e.share for e in sets)
    loss = sum(e.share * results[e.name][0] for e in sets) / total
    out = {"eval_loss": loss, **objective.eval_metrics(loss, 0, 0)}
    out.update({f"eval_{name}_loss": result[0] for name, result in results.items()})
    return out


def track(state, losses: dict[str, float], step: int, *, patience: int) -> tuple[dict, str]:
    """Update `state`'s best / last / patience fields; return the metrics record and the console line."""
    loss = losses["eval_loss"]
    s = state
    s.last_eval_loss, s.last_eval_step = loss, step
    if s.first_eval_loss is None:
        s.first_eval_loss = loss
    if s.best_eval_loss is None or loss < s.best_eval_loss:
        s.best_eval_loss, s.best_step, s.evals_without_improvement = loss, step, 0
    elif step > 0:
        s.evals_without_improvement += 1
    per_source = {k: v for k, v in losses.items() if k.endswith("_loss") and k != "eval_loss"}
    extra = {k: v for k, v in losses.items() if k != "eval_loss" and k not in per_source}  # eval_ppl / eval_accuracy
    record = {"step": step, "eval_loss": loss, **extra, "eval_best_loss": s.best_eval_loss,
              "eval_best_step": s.best_step, **per_source}
    shown = "; ".join(f"{k[len('eval_'):]} {v:.4g}" for k, v in extra.items())
    line = (f"fft-dist: step {step}: eval loss {loss:.4f} ({shown}; best {s.best_eval_loss:.4f} "
            f"at step {s.best_step})")
    if per_source:
        line += " | " + ", ".join(f"{k[len('eval_'):-len('_loss')]} {v:.4f}" for k, v in per_source.items())
    if patience and s.evals_without_improvement >= patience:
        s.stopped_early = True
    return record, line
