"""The one training loop. It talks to the backend only through the Strategy protocol.

Loss normalisation: every micro-batch contributes sum(token CE) / N, where N is the number
of loss-bearing tokens in the whole global batch (all accumulation steps, all ranks). The
result is independent of how the global batch is split over ranks and micro batches.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fft_dist.config import BatchPlan, FFTConfig
from fft_dist.data import GlobalBatchSampler, collate, load_datasets
from fft_dist.data.examples import IGNORE_INDEX, Example
from fft_dist.dist import DistContext, all_reduce_sum, print0, seed_everything
from fft_dist.metrics import MetricsWriter, flops_per_token, peak_flops, peak_memory_mb
from fft_dist.model import (
    apply_freeze,
    build_model,
    check_vocab,
    count_parameters,
    decoder_layers,
    enable_activation_checkpointing,
    hf_config,
    load_tokenizer,
    tokenizer_dir,
)
from fft_dist.optim import lr_schedule, optimizer_factory
from fft_dist.strategy import make_strategy

class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops and no checkpoint of this state is written."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer states that an exact resume needs."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval_loss: float | None = None
    first_eval_loss: float | None = None
    last_eval_step: int | None = None
    stopped_early: bool = False


@dataclass
class Summary:
    steps: int
    seconds: float
    first_eval_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    run_dir: str
    checkpoint: str | None = None
    export: str | None = None
    stopped: str = "completed"
    extra: dict = field(default_factory=dict)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ignored (fp32)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def count_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class _StopSignal:
    """Turns SIGTERM / SIGUSR1 into a flag the loop checks (and agrees on) after each step."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum


class Trainer:
    def __init__(self, cfg: FFTConfig, *, ctx: DistContext, plan: BatchPlan, run_dir: Path, config_yaml: str):
        self.cfg, self.ctx, self.plan = cfg, ctx, plan
        self.run_dir = run_dir
        self.config_yaml = config_yaml
        self.ckpt_root = Path(cfg.checkpoint.dir)
        self.state = TrainState()
        self.metrics = MetricsWriter(run_dir, enabled=ctx.is_main, logging_cfg=cfg.logging, config_yaml=config_yaml)
        self.stop_signal = _StopSignal()

    # -- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.tokenizer = load_tokenizer(cfg.model)
        self.hf_config = hf_config(cfg.model)
        check_vocab(self.hf_config, self.tokenizer)
        self.train_set, self.eval_set, stats = load_datasets(cfg.data, self.tokenizer)
        self.sampler = GlobalBatchSampler(len(self.train_set), self.plan.global_batch_size,
                                          seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps or self.sampler.total_steps(cfg.train.epochs)
        warmup = cfg.train.warmup_steps or round(cfg.train.warmup_ratio * self.total_steps)
        if warmup > self.total_steps:
            from fft_dist.config import ConfigError

            raise ConfigError(f"warmup ({warmup} steps) is longer than training ({self.total_steps} steps)")
        self.frozen: list[str] = []

        def build():
            torch.manual_seed(cfg.train.seed)  # identical init on every rank and backend
            model = build_model(self.hf_config)
            self.frozen = apply_freeze(model, cfg.model)
            if cfg.model.activation_checkpointing:
                enable_activation_checkpointing(model)
            self.n_params = count_parameters(model)
            self.n_layers = len(decoder_layers(model))
            return model

        self.lr_at = lr_schedule(cfg.train, self.total_steps)
        self.strategy = make_strategy(cfg, self.plan, self.ctx)
        self.strategy.setup(build_model=build, make_optimizer=optimizer_factory(cfg.optimizer, cfg.train.lr),
                            lr_at=self.lr_at)
        if cfg.model.path is not None:
            from fft_dist import checkpoint as ckpt

            ckpt.load_pretrained(self.strategy, cfg.model.path)
        hidden = getattr(self.hf_config, "hidden_size", None) or getattr(self.hf_config, "n_embd", 0)
        self.flops_per_token = flops_per_token(self.n_params, self.n_layers, hidden, cfg.data.max_length)
        self.peak_flops = peak_flops(self.ctx.device)
        print0(
            f"fft-dist: {cfg.model.name} ({self.n_params / 1e6:.2f}M params, {len(self.frozen)} frozen tensors) | "
            f"{cfg.parallelism.name.value} x {self.ctx.world_size} ranks ({self.ctx.backend}) | "
            f"{len(self.train_set)} train / {len(self.eval_set)} eval rows "
            f"({stats.truncated} truncated, {stats.dropped_no_loss} dropped with no loss tokens) | "
            f"global batch {self.plan.global_batch_size} = micro {self.plan.micro_batch_size} x "
            f"accum {self.plan.grad_accum} x world {self.plan.world_size} | {self.total_steps} steps"
        )

    def _resume(self) -> None:
        if self.cfg.resume == "none":
            return
        from fft_dist import checkpoint as ckpt

        path = ckpt.find_resume(self.cfg.resume, self.ckpt_root)
        if path is None:
            return
        saved = ckpt.load_checkpoint(self.strategy, path)
        known = TrainState.__dataclass_fields__
        self.state = TrainState(**{k: v for k, v in saved.get("trainer", {}).items() if k in known})
        print0(f"fft-dist: resumed from {path} at step {self.state.step}")

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[dict]:
        groups = self.sampler.rank_micro_batches(step, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                                 micro_batch_size=self.plan.micro_batch_size)
        pad = self.tokenizer.pad_token_id
        return [collate([self.train_set[i] for i in g], pad) for g in groups]

    def train_step(self, step: int) -> dict:
        batches = self._micro_batches(step)
        local_tokens = sum(count_loss_tokens(b) for b in batches)
        local_inputs = sum(int(b["attention_mask"].sum()) for b in batches)
        global_tokens, global_inputs = all_reduce_sum([local_tokens, local_inputs], self.ctx.device).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            logits = self.strategy.forward(batch["input_ids"], batch["attention_mask"])
            loss = token_loss_sum(logits, batch["labels"])
            self.strategy.backward(loss / global_tokens)
            loss_sum += loss.detach().double().cpu()
        stop = float(self.stop_signal.received is not None)
        total_loss, any_stop = all_reduce_sum([float(loss_sum), stop], self.ctx.device).tolist()
        loss_value = total_loss / global_tokens
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {step + 1}; stopping without saving this state "
                f"(the last good checkpoint, if any, is in {self.ckpt_root}). Lower train.lr or check the data."
            )
        grad_norm = self.strategy.step(step)
        return {"loss": loss_value, "grad_norm": grad_norm, "tokens": int(global_tokens),
                "inputs": int(global_inputs), "stop": any_stop > 0}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.strategy.train(False)
        mine = self.eval_set[self.ctx.rank :: self.ctx.world_size]
        size = self.cfg.eval.micro_batch_size
        # Every rank must run the same number of forwards (FSDP/ZeRO-3 gather collectively).
        n_batches = math.ceil(len(self.eval_set[0 :: self.ctx.world_size]) / size) if self.eval_set else 0
        if self.cfg.eval.max_batches:
            n_batches = min(n_batches, self.cfg.eval.max_batches)
        loss_sum, tokens = 0.0, 0
        for i in range(n_batches):
            rows: list[Example] = mine[i * size : (i + 1) * size] or self.eval_set[:1]
            batch = collate(rows, self.tokenizer.pad_token_id)
            logits = self.strategy.forward(batch["input_ids"], batch["attention_mask"])
            if mine[i * size : (i + 1) * size]:
                loss_sum += float(token_loss_sum(logits, batch["labels"]))
                tokens += count_loss_tokens(batch)
        total, count = all_reduce_sum([loss_sum, tokens], self.ctx.device).tolist()
        self.strategy.train(True)
        return total / count if count else float("nan")

    def _eval_and_track(self, step: int) -> None:
        loss = self.evaluate()
        s = self.state
        s.last_eval_loss, s.last_eval_step = loss, step
        if s.first_eval_loss is None:
            s.first_eval_loss = loss
        if s.best_eval_loss is None or loss < s.best_eval_loss:
            s.best_eval_loss, s.best_step, s.evals_without_improvement = loss, step, 0
        elif step > 0:
            s.evals_without_improvement += 1
        self.metrics.write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                            "eval_best_loss": s.best_eval_loss, "eval_best_step": s.best_step})
        if self.cfg.eval.patience and s.evals_without_improvement >= self.cfg.eval.patience:
            s.stopped_early = True

    def _save(self, step: int) -> Path:
        from fft_dist import checkpoint as ckpt

        trainer_state = asdict(self.state)
        return ckpt.save_checkpoint(
            self.strategy, ckpt_root=self.ckpt_root, step=step,
            train_state={"trainer": trainer_state, "sampler": self.sampler.position(step),
                         "tokens_seen": self.state.tokens_seen, "step": step},
            keep_last=self.cfg.checkpoint.keep_last,
            meta={"config_yaml": self.config_yaml, "model_config": self.hf_config.to_dict(),
                  "backend": self.cfg.parallelism.name.value, "model_path": self.cfg.model.path,
                  "tokenizer_dir": str(tokenizer_dir(self.cfg.model))},
        )

    def run(self) -> Summary:
        self._build()
        self._resume()
        cfg, s = self.cfg, self.state
        start_time = time.perf_counter()
        if s.step == 0 and self.eval_set and cfg.eval.every_steps:  # 0: evaluate only at the end
            self._eval_and_track(0)
        last_ckpt: Path | None = None
        last_saved_step: int | None = None
        stopped = "completed"
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=s.step, disable=not self.ctx.is_main, desc="train",
                   dynamic_ncols=True, mininterval=1.0)
        self.strategy.train(True)
        while s.step < self.total_steps and not s.stopped_early:
            t0 = time.perf_counter()
            out = self.train_step(s.step)
            dt = time.perf_counter() - t0
            s.step += 1
            s.tokens_seen += out["inputs"]
            lr = self.lr_at(s.step - 1)
            tok_s = out["inputs"] / dt
            mfu = (tok_s * self.flops_per_token / (self.peak_flops * self.ctx.world_size)) if self.peak_flops else None
            if s.step % cfg.train.log_every_steps == 0 or s.step == self.total_steps:
                self.metrics.write({"step": s.step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                                    "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_mb": peak_memory_mb(self.ctx.device),
                                    "loss_tokens": out["tokens"], "tokens_seen": s.tokens_seen})
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
            if cfg.eval.every_steps and s.step % cfg.eval.every_steps == 0 and s.step < self.total_steps:
                self._eval_and_track(s.step)
            if out["stop"]:
                last_ckpt, last_saved_step = self._save(s.step), s.step
                stopped = "preempted"
                break
            if cfg.checkpoint.every_steps and s.step % cfg.checkpoint.every_steps == 0:
                last_ckpt, last_saved_step = self._save(s.step), s.step
        bar.close()
        if stopped == "completed":
            if s.stopped_early:
                stopped = "early_stopped"
            if self.eval_set and s.last_eval_step != s.step:
                self._eval_and_track(s.step)
            if cfg.checkpoint.save_final and last_saved_step != s.step:
                last_ckpt = self._save(s.step)
        export = None
        if stopped != "preempted" and cfg.checkpoint.export_final and last_ckpt is not None:
            export = self.run_dir / "hf"
            if self.ctx.is_main:
                from fft_dist import checkpoint as ckpt

                ckpt.export_hf(last_ckpt, export, tokenizer_dir=tokenizer_dir(cfg.model))
        self.metrics.close()
        return Summary(steps=s.step, seconds=time.perf_counter() - start_time, first_eval_loss=s.first_eval_loss,
                       final_eval_loss=s.last_eval_loss, best_eval_loss=s.best_eval_loss, best_step=s.best_step,
                       run_dir=str(self.run_dir), checkpoint=str(last_ckpt) if last_ckpt else None,
                       export=str(export) if export else None, stopped=stopped)
