"""Evaluation: the loss on each eval set, and the best-loss / patience bookkeeping it drives.

With one source the run reports `eval_loss` (loss-token average over the eval split). With
`data.mixture` each source's eval set is evaluated on its own (`eval_<name>_loss`, a token
average within that source), and `eval_loss`, which picks the best checkpoint and drives
patience, is their weight average: sum(share x eval_<name>_loss) over the sources with an eval
set, shares renormalised to 1. A source's loss then counts as much as its weight says, however
long or many its eval rows are, and a rising replay loss (forgetting) shows on its own.

`eval.sets` adds held-out sets that are never trained on (a forgetting report): each is evaluated
with the task's sets, logged as `eval_<name>_loss`, and kept out of `eval_loss`; the run remembers
each one's first value, so every record shows the change (`eval_<name>_loss_change`) and the end of
the run the loss before and after. `eval.select` weighs the task loss and these sets' losses into
the loss that picks the best checkpoint (`eval_select_loss`); without it, `eval_loss` alone.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fft_dist.config import DataConfig, EvalConfig
from fft_dist.data import collate
from fft_dist.data.mixture import GLOBAL_KEYS
from fft_dist.data.pipeline import load_datasets
from fft_dist.data.training import EvalSet
from fft_dist.errors import ConfigError
from fft_dist.dist import DistContext, all_reduce_sum
from fft_dist.loss import Objective, StepLoss


def held_out_sets(sets: dict, data: DataConfig, tok, *, cache_dir) -> list[EvalSet]:
    """eval.sets, each read and tokenised like a data.mixture source (the run's tokenizer, max_length and
    other top-level data settings), every row of its file an eval row. Collective, like load_datasets."""
    from dataclasses import fields, replace

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    allowed = [f.name for f in fields(DataConfig) if f.name not in GLOBAL_KEYS + ("eval_path", "eval_fraction")]
    base = replace(data, mixture={}, path=None, eval_path=None, group_by_length=0, max_examples=1)
    out = []
    for name, entry in sets.items():
        where = f"eval.sets.{name}"
        entry = dict(entry)
        for key in entry:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: not an option of a held-out set; it takes any of {allowed}")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(replace(base, name=str(name))), entry)
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            key = f".{e.full_key}" if getattr(e, "full_key", None) else ""
            raise ConfigError(f"{where}{key}: {str(e).splitlines()[0]}") from None
        # the whole file is the eval split (the train side, capped at one row, is not used)
        _, split, _ = load_datasets(replace(cfg, eval_path=cfg.path), tok, cache_dir=cache_dir, where=where,
                                    eval_only=True)
        out.append(EvalSet(str(name), 0.0, split))
    return out


class EvalSets:
    """The run's eval sets (iterate over them); len() counts their rows (what the banner shows).
    `held_out`: eval.sets, evaluated with them but kept out of eval_loss."""

    def __init__(self, sets: list[EvalSet], held_out: list[EvalSet] = ()):
        self.sets = list(sets)
        self.held_out = list(held_out)
        if self.held_out and not self:  # they would never be evaluated (the loop evaluates when there are task sets)
            raise ConfigError(f"eval.sets.{self.held_out[0].name}: held-out sets are evaluated beside the task's eval "
                              "split, and this run's data has none; give it one (data.eval_fraction > 0, data.eval_path, "
                              "or an eval_path per data.mixture source)")

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
    held_out = list(getattr(sets, "held_out", []))
    results, kept = {}, {}
    for group, e in [(results, e) for e in sets] + [(kept, e) for e in held_out]:
        group[e.name] = split_loss(strategy, e.split, objective=objective, **kw)
        if group[e.name] is None:
            strategy.train(True)
            return None
    strategy.train(True)
    if list(results) == [None]:
        loss, extra = results[None]
        out = {"eval_loss": loss, **extra}
    else:
        total = sum(e.share for e in sets)
        loss = sum(e.share * results[e.name][0] for e in sets) / total
        out = {"eval_loss": loss, **objective.eval_metrics(loss, 0, 0)}
        out.update({f"eval_{name}_loss": result[0] for name, result in results.items()})
    out.update({f"eval_{name}_loss": result[0] for name, result in kept.items()})
    return out


def selection_loss(losses: dict[str, float], select: dict[str, float]) -> float:
    """eval.select's weighted combination ('task': eval_loss; a set name: eval_<name>_loss)."""
    if not select:
        return losses["eval_loss"]
    total = sum(select.values())
    return sum(w * losses["eval_loss" if k == "task" else f"eval_{k}_loss"] for k, w in select.items()) / total


def track(state, losses: dict[str, float], step: int, *, patience: int, select: dict[str, float] | None = None,
          held_out: list[str] = ()) -> tuple[dict, str]:
    """Update `state`'s best / last / patience fields; return the metrics record and the console line.
    `select`: eval.select (the best is the lowest selection loss); `held_out`: the eval.sets names."""
    loss = losses["eval_loss"]
    chosen = selection_loss(losses, select or {})
    s = state
    s.last_eval_loss, s.last_eval_step = loss, step
    if s.first_eval_loss is None:
        s.first_eval_loss = loss
    for name in held_out:
        s.held_out_first.setdefault(name, losses[f"eval_{name}_loss"])
        s.held_out_last[name] = losses[f"eval_{name}_loss"]
    if s.best_eval_loss is None or chosen < s.best_eval_loss:
        s.best_eval_loss, s.best_step, s.evals_without_improvement = chosen, step, 0
    elif step > 0:
        s.evals_without_improvement += 1
    per_source = {k: v for k, v in losses.items() if k.endswith("_loss") and k != "eval_loss"}
    extra = {k: v for k, v in losses.items() if k != "eval_loss" and k not in per_source}  # eval_ppl / eval_accuracy
    changes = {f"eval_{n}_loss_change": s.held_out_last[n] - s.held_out_first[n] for n in held_out}
    record = {"step": step, "eval_loss": loss, **extra, "eval_best_loss": s.best_eval_loss,
              "eval_best_step": s.best_step, **per_source, **changes,
              **({"eval_select_loss": chosen} if select else {})}
    shown = "; ".join(f"{k[len('eval_'):]} {v:.4g}" for k, v in extra.items())
    chose = f"eval.select loss {chosen:.4f}; " if select else ""
    line = f"fft-dist: step {step}: eval loss {loss:.4f} ({shown}; {chose}best {s.best_eval_loss:.4f} at step {s.best_step})"
    if per_source:
        line += " | " + ", ".join(f"{k[len('eval_'):-len('_loss')]} {v:.4f}" for k, v in per_source.items())
    if patience and s.evals_without_improvement >= patience:
        s.stopped_early = True
    return record, line
