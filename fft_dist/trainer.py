"""The one training loop. It talks to the backend only through the Strategy protocol.

Loss normalisation (fft_dist.loss.total): every micro-batch contributes each loss term's sum / N, where
N counts the term's unit (loss tokens, examples, input tokens) in the whole global batch (all
accumulation steps, all ranks). The result is independent of how the global batch is split.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fft_dist.checkpoint import resume_rules
from fft_dist.config import BatchPlan, FFTConfig, OnNonFinite, Precision
from fft_dist.validate import warmup_steps_for
from fft_dist.data import collate
from fft_dist.data.training import load_training_data
from fft_dist.dist import DistContext, all_reduce_sum, print0, seed_everything
from fft_dist.errors import NonFiniteError
from fft_dist.evaluation import EvalSets, evaluate, held_out_sets, track
from fft_dist.loss import MAIN, build_loss, load_plugins
from fft_dist.loss.kd import METRIC as KD_METRIC
from fft_dist.loss.l2sp import METRIC as L2SP_METRIC
from fft_dist.metrics import MetricsWriter, flops_per_token, peak_flops, peak_memory_mb
from fft_dist.model import (
    apply_freeze,
    build_model,
    explicit_chat_template,
    grow_vocab,
    count_parameters,
    enable_activation_checkpointing,
    for_task,
    hf_config,
    load_tokenizer,
    new_head_names,
    save_run_tokenizer,
    task_of,
    tokenizer_dir,
)
from fft_dist.config.loss import AUTO_CHUNK
from fft_dist.models.family import embedding_rows
from fft_dist.models.head import chunking_holds
from fft_dist.models.vocab import GrownVocabulary
from fft_dist.optim import lr_schedule, optimizer_factory
from fft_dist.preemption import StopSignal, signal_name
from fft_dist.reference import anchor, host_reference
from fft_dist.run_checkpoints import RunCheckpoints
from fft_dist.train_state import TrainState
from fft_dist.strategy import device_defaults as decide_device_defaults, make_strategy


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
    export: Path | None = None
    """Where the HF export goes; written by rank 0 after the process group is gone."""
    export_source: Path | None = None
    tokenizer_dir: Path | None = None
    stopped: str = "completed"
    signal: str | None = None
    run_id: str | None = None
    """The run the export belongs to (its marker; a resumed run may replace only its own export)."""
    eval_split: bool = True
    """Whether there was an eval split at all (a small data set may hold out no row)."""
    held_out: dict[str, tuple[float, float]] = field(default_factory=dict)
    """eval.sets: name -> (loss before, loss after)."""

    @property
    def exit_code(self) -> int:
        from fft_dist import exit_codes

        return exit_codes.PREEMPTED if self.stopped == "preempted" else exit_codes.OK


class Trainer:
    def __init__(self, cfg: FFTConfig, *, ctx: DistContext, plan: BatchPlan, config_yaml: str,
                 stop: StopSignal | None = None):
        self.cfg, self.ctx, self.plan = cfg, ctx, plan
        self.run_dir = Path(cfg.run.dir)
        self.config_yaml = config_yaml
        self.ckpt_root = Path(cfg.checkpoint.dir)
        self.state = TrainState()
        self.metrics = MetricsWriter(self.run_dir, enabled=ctx.is_main, logging_cfg=cfg.logging,
                                     config_yaml=config_yaml)
        self.stop_signal = stop or StopSignal()
        self._bar = None

    # -- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        self.checkpoints = RunCheckpoints(cfg, self.ctx, log=self.metrics.write, say=self._say)
        if cfg.checkpoint.save_final or cfg.checkpoint.every_steps:
            self.checkpoints.check_writable()
        self.defaults = decide_device_defaults(cfg, self.ctx.device)  # every `auto`, for this rank's device
        seed_everything(cfg.train.seed, self.defaults.deterministic)
        self.tokenizer = load_tokenizer(cfg.model, chat_template=explicit_chat_template(cfg.data))
        self.hf_config = hf_config(cfg.model)
        self.old_vocab = grow_vocab(self.hf_config, self.tokenizer, cfg.model)  # model.add_tokens ...
        self.tokenizer_files = save_run_tokenizer(self.tokenizer) if self.ctx.is_main else None
        load_plugins(list(cfg.loss.plugins))  # a plugin may register a data format: import it before the data
        cache_dir = cfg.data.cache_dir or self.run_dir / "data_cache"
        data = load_training_data(cfg.data, self.tokenizer, cache_dir=cache_dir)
        held_out = held_out_sets(cfg.eval.sets, cfg.data, self.tokenizer, cache_dir=cache_dir)
        self.train_set, self.eval_set, stats = data.train, EvalSets(data.evals, held_out), data.stats
        self.sampler = data.sampler(self.plan.global_batch_size, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        if data.sources:
            print0("fft-dist: data mixture: " + ", ".join(f"{s.name} {s.share:.1%} of each batch ({len(p)} rows)"
                                                         for s, p in zip(data.sources, data.train.parts)))
        self.loss = build_loss(cfg.loss, fmt=cfg.data.format, model_config=self.hf_config)
        self.objective, self.task = self.loss.objective, task_of(cfg.data.format)
        for_task(self.hf_config, self.task, labels=stats.labels, pad_token_id=self.tokenizer.pad_token_id)
        self._resume_from = self._resume_sample_position()
        self.total_steps = cfg.train.max_steps or self.sampler.total_steps(cfg.train.epochs)
        self.warmup_steps = warmup_steps_for(cfg.train, self.total_steps)
        self.frozen: list[str] = []

        def build():
            torch.manual_seed(cfg.train.seed)  # identical init on every rank and backend
            model = build_model(self.hf_config)
            self.frozen = apply_freeze(model, cfg.model)
            if cfg.model.activation_checkpointing:
                enable_activation_checkpointing(model)
            self.n_params = count_parameters(model)
            self.new_head = new_head_names(model)
            self.grown = embedding_rows(model, self.hf_config.vocab_size) if self.old_vocab else {}
            return model

        self.lr_at = lr_schedule(cfg.train, self.total_steps)
        self.strategy = make_strategy(cfg, self.plan, self.ctx, self.defaults)
        make_optimizer = optimizer_factory(cfg.optimizer, cfg.train.lr, self.defaults.optimizer_implementation)
        self.strategy.setup(build_model=build, make_optimizer=make_optimizer, lr_at=self.lr_at)
        grown = (lambda source: GrownVocabulary(source, self.grown, old_rows=self.old_vocab)) if self.grown else None
        if cfg.model.path is not None:
            from fft_dist import checkpoint as ckpt

            fresh = ckpt.load_pretrained(self.strategy, cfg.model.path, new_head=self.new_head, seed=cfg.train.seed,
                                         init_std=getattr(self.hf_config, "initializer_range", 0.02), wrap=grown)
            if fresh:  # what transformers' from_pretrained warns as "newly initialized", in our words
                print0(f"fft-dist: warning: model.path={cfg.model.path} has no {', '.join(fresh)}: a new task head, "
                       "initialised fresh (seeded by train.seed); train it before trusting its predictions")
        # the starting point, from its source (a resume loads its checkpoint only after this): loss.kd, loss.l2sp
        self.anchor = anchor(cfg, self.strategy)
        self.reference = host_reference(cfg, self.strategy, self.hf_config, wrap=grown,
                                        build=lambda: (torch.manual_seed(cfg.train.seed), build_model(self.hf_config))[1])
        if self.loss.chunk_size and cfg.loss.chunk_size == AUTO_CHUNK and not chunking_holds(self.strategy.forward,
                                                                                             self.ctx.device):
            self.loss.chunk_size = 0  # auto never refuses: an explicit size would (fft_dist.models.head)
            print0(f"fft-dist: loss.chunk_size=auto: the {self.hf_config.model_type} model's logits are not what "
                   "fft-dist's head rules make of its config, so the loss uses the full logits")
        self.flops_per_token = flops_per_token(self.strategy.model, self.hf_config, cfg.data.max_length)
        self.peak_flops = peak_flops(self.ctx.device)
        print0(
            f"fft-dist: {cfg.model.name} ({self.n_params / 1e6:.2f}M params, {len(self.frozen)} frozen tensors, "
            f"{self.hf_config._attn_implementation} attention) | {self._tokenizer_line()} | "  # noqa: SLF001
            f"{cfg.parallelism.name.value} x {self.ctx.world_size} ranks ({self.ctx.backend}) | "
            f"{len(self.train_set)} train / {len(self.eval_set)} eval rows "
            f"({stats.truncated} truncated, {stats.dropped_no_loss} dropped with no loss tokens; "
            f"{'cached' if stats.reused else 'tokenised'} in {stats.cache}) | "
            f"global batch {self.plan.global_batch_size} = micro {self.plan.micro_batch_size} x "
            f"accum {self.plan.grad_accum} x world {self.plan.world_size} | {self.total_steps} steps"
        )
        print0(f"fft-dist: {self.defaults.banner()}")
        if cfg.checkpoint.save_final or cfg.checkpoint.every_steps:
            self.checkpoints.choose_async(self.strategy, frozen=self.frozen)  # checkpoint.async_save
        self.metrics.write(self.defaults.record())

    def _tokenizer_line(self) -> str:
        """Which tokenizer the run uses, and what it added (the banner names it: a wrong one is costly)."""
        added = getattr(self.tokenizer, "fft_dist_added", [])
        grown = f", embeddings {self.old_vocab} -> {self.hf_config.vocab_size} rows" if self.old_vocab else ""
        return (f"tokenizer {tokenizer_dir(self.cfg.model)} ({len(self.tokenizer)} tokens"
                f"{f', {len(added)} added' if added else ''}{grown})")

    def _resume_sample_position(self) -> tuple[Path, dict] | None:
        """The verified checkpoint to resume from; the sampler continues from its sample position."""
        found = self.checkpoints.choose_resume()
        if found is not None:
            self.sampler.resume_at(found[1]["step"], found[1]["train_state"]["sampler"])
        return found

    def _resume(self) -> None:
        from fft_dist import checkpoint as ckpt

        if self._resume_from is None:
            return
        path, envelope = self._resume_from
        problems = resume_rules.incompatibilities(
            envelope, model_config=self.hf_config.to_dict(), optimizer=self.cfg.optimizer.name.value,
            load_optimizer=self.cfg.checkpoint.load_optimizer, task=self.task)
        if problems:
            raise ckpt.CheckpointError(f"{path} cannot continue this run (nothing was loaded):\n  " + "\n  ".join(problems))
        saved = self.checkpoints.load(self.strategy, path)
        self.state = TrainState(step=envelope["step"], **saved["trainer"])  # the spec guarantees these fields
        notes = resume_rules.changes({**saved["sampler"], **saved["schedule"]}, self._plan_facts())
        print0(f"fft-dist: resumed from {path} at step {self.state.step}")
        for note in notes:
            print0(f"fft-dist: warning: since the checkpoint, {note}; the lr schedule and data order follow "
                   "the new settings from here on")
        if saved["sampler"]["global_batch_size"] != self.plan.global_batch_size:
            print0(f"fft-dist: the data continues at {self.sampler.describe(self.state.step)}, the first sample the "
                   "checkpoint had not trained on (nothing skipped or replayed); steps count on from the checkpoint's")
        if notes:
            self.metrics.write({"step": self.state.step, "event": "resume_changed", "changes": notes,
                                "lr_next": self.lr_at(self.state.step)})

    def _plan_facts(self) -> dict:
        """The facts a resume compares (saved with every checkpoint, each once)."""
        return {"global_batch_size": self.plan.global_batch_size, "num_examples": len(self.train_set),
                "seed": self.cfg.train.seed, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[dict]:
        groups = self.sampler.rank_micro_batches(step, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                                 micro_batch_size=self.plan.micro_batch_size)
        pad = self.tokenizer.pad_token_id
        return [collate(self.train_set.rows(g), pad) for g in groups]

    def train_step(self, step: int) -> dict:
        """One optimizer step. The per-step numbers stay on the device until one copy to the host after
        the last micro batch (the loss parts, stop flag, counts, gradient norm), whatever the accumulation:
        a GPU is never made to wait mid-step."""
        batches = self._micro_batches(step)
        device = self.ctx.device
        counts = all_reduce_sum(self.loss.local_counts(batches), device)  # global units: stay on the device
        n = len(self.loss.names)
        sums = self.loss.new_sums(device, spare=1)  # one slot per loss part, then the stop flag
        for batch in batches:
            ref = self.reference.for_batch(batch) if self.reference else None  # loss.kd: the same micro batch
            out = self.strategy.forward(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                                        head=self.loss.head(batch, ref))  # loss.chunk_size: no full logits
            self.strategy.backward(self.loss.micro_batch(batch, out, counts, sums, ref))
        sums[n] = float(self.stop_signal.received is not None)
        # on the device; none where the backend computes it inside its update (its declared capabilities)
        norm = None if self.strategy.capabilities.norm_in_update else self.strategy.grad_norm()
        reduced = [all_reduce_sum(sums, device), counts]
        if norm is not None:
            reduced.append(norm.detach().reshape(1).to(device, torch.float64))
        values = torch.cat(reduced).tolist()  # the step's one device-to-host copy
        any_stop, (global_tokens, global_inputs) = values[n], values[n + 1:n + 3]
        parts = self.loss.parts(values[:n], [global_tokens, global_inputs])
        loss_value = parts[MAIN]
        skip = self.cfg.train.on_nonfinite == OnNonFinite.skip
        if not math.isfinite(loss_value) and not skip:
            raise NonFiniteError(
                f"loss is {loss_value} at step {step + 1}; stopping without applying or saving this step "
                f"(the last good checkpoint, if any, is in {self.ckpt_root}). Lower train.lr or check the data.")
        grad_norm = self.strategy.apply_update(step, values[n + 3] if norm is not None else None)
        metrics = self.loss.metrics(parts)
        if self.anchor is not None:  # loss.l2sp: the decoupled pull, once per applied update
            squares = self.anchor.pull(self.strategy, self.lr_at(step) if math.isfinite(grad_norm) else 0.0)
            metrics[L2SP_METRIC] = self.anchor.value(float(all_reduce_sum(squares.reshape(1), device)[0]))
        # fp16's loss scaler skips overflowing steps by design: that is not divergence
        if not math.isfinite(grad_norm) and not skip and self.defaults.precision != Precision.fp16:
            raise NonFiniteError(
                f"gradient norm is {grad_norm} at step {step + 1}; the update was not applied and nothing is saved "
                f"(the last good checkpoint, if any, is in {self.ckpt_root}). Lower train.lr, or set "
                "train.on_nonfinite=skip to drop such steps and go on.")
        return {"loss": loss_value, "grad_norm": grad_norm, "tokens": int(global_tokens),
                "inputs": int(global_inputs), "stop": any_stop > 0, "skipped": not math.isfinite(grad_norm),
                "parts": metrics}

    def _say(self, message: str) -> None:
        """A rank-0 console line that does not break the progress bar."""
        if not self.ctx.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _eval_and_track(self, step: int) -> bool:
        """Evaluate and record; False when a stop signal cut the evaluation short (nothing recorded)."""
        losses = evaluate(self.strategy, self.eval_set, ctx=self.ctx, cfg=self.cfg.eval,
                          pad_id=self.tokenizer.pad_token_id, objective=self.objective, step_loss=self.loss,
                          should_stop=lambda: self.stop_signal.received is not None)
        if losses is None:
            return False
        record, line = track(self.state, losses, step, patience=self.cfg.eval.patience, select=self.cfg.eval.select,
                             held_out=list(self.cfg.eval.sets))
        self.metrics.write(record)
        self._say(line)
        return True

    def _save(self, step: int) -> None:
        """Save `step`; the run's Checkpointer keeps which checkpoint is the last and which the best."""
        from dataclasses import asdict

        s = self.state

        def train_state(best_checkpoint: str | None) -> dict:
            s.best_checkpoint = best_checkpoint  # the checkpointer's: this save may be the best one
            trainer_state = {k: v for k, v in asdict(s).items() if k != "step"}
            return {"trainer": trainer_state, "sampler": self.sampler.position(step),
                    "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}}

        self.checkpoints.save(
            self.strategy, step, best=s.best_step == step,  # this checkpoint holds the best-evaluated weights so far
            train_state=train_state,
            meta={"config_yaml": self.config_yaml, "model_config": self.hf_config.to_dict(),
                  "backend": self.cfg.parallelism.name.value, "model_path": self.cfg.model.path,
                  "optimizer": self.cfg.optimizer.name.value, "task": self.task,
                  "tokenizer_dir": self.tokenizer_files},  # the run's tokenizer, copied into the checkpoint
        )

    def run(self) -> Summary:
        self._build()
        try:
            return self._run()
        except BaseException:
            self.checkpoints.abandon()  # a save in flight ends before the rank (and its run's locks) goes
            raise

    def _run(self) -> Summary:
        self._resume()
        cfg, s = self.cfg, self.state
        start_time = time.perf_counter()
        stop_now = False  # a stop signal (agreed by all ranks) during a step or an evaluation
        # 0: evaluate only at the end; held-out sets (eval.sets) always get their "before" at step 0
        if s.step == 0 and self.eval_set and (cfg.eval.every_steps or cfg.eval.sets):
            stop_now = not self._eval_and_track(0)
        from fft_dist.progress import progress_bar

        self._bar = progress_bar(total=self.total_steps, initial=s.step, enabled=self.ctx.is_main, desc="train")
        self.strategy.train(True)
        while not stop_now and s.step < self.total_steps and not s.stopped_early:
            t0 = time.perf_counter()
            out = self.train_step(s.step)
            dt = time.perf_counter() - t0
            s.step += 1
            s.tokens_seen += out["inputs"]
            s.skipped_steps += int(out["skipped"])
            self._log_step(out, dt)
            self.checkpoints.poll(s.step)  # a background save that committed: its timings into the metrics
            stop_now = out["stop"]
            if not stop_now and cfg.eval.every_steps and s.step % cfg.eval.every_steps == 0 and s.step < self.total_steps:
                stop_now = not self._eval_and_track(s.step)
            if not stop_now and cfg.checkpoint.every_steps and s.step % cfg.checkpoint.every_steps == 0:
                self._save(s.step)
        self._bar.close()
        self._bar = None
        stopped, stop_signal = ("early_stopped" if s.stopped_early else "completed"), None
        if not stop_now and self.eval_set and s.last_eval_step != s.step:
            stop_now = not self._eval_and_track(s.step)
        if stop_now:  # exit 75 promises a checkpoint of the last step
            received = self.stop_signal.received
            stopped, stop_signal = "preempted", signal_name(received) if received else "a signal to another rank"
        if (stop_now or cfg.checkpoint.save_final) and self.checkpoints.saved_step != s.step:
            self._save(s.step)
        self.checkpoints.close(s.step)  # the end of training, a stop and the export wait for a save in flight
        last_ckpt = self.checkpoints.last
        held = {n: (s.held_out_first[n], s.held_out_last[n]) for n in s.held_out_first if n in s.held_out_last}
        if held:  # the forgetting report: each held-out set's loss before and after
            self.metrics.write({"step": s.step, "event": "forgetting", **{
                f"eval_{n}_loss_{k}": v for n, (a, b) in held.items()
                for k, v in (("before", a), ("after", b), ("change", b - a))}})
        self.metrics.close()
        summary = Summary(steps=s.step, seconds=time.perf_counter() - start_time, first_eval_loss=s.first_eval_loss,
                          final_eval_loss=s.last_eval_loss, best_eval_loss=s.best_eval_loss, best_step=s.best_step,
                          run_dir=str(self.run_dir), checkpoint=str(last_ckpt) if last_ckpt else None,
                          stopped=stopped, signal=stop_signal, tokenizer_dir=self.tokenizer_files,
                          eval_split=bool(self.eval_set), held_out=held)
        if stopped != "preempted" and cfg.checkpoint.export_final and last_ckpt is not None:
            summary.export_source = self.checkpoints.export_source()
            summary.export = self.run_dir / "hf"
            summary.run_id = self.checkpoints.run_id
        return summary

    def _log_step(self, out: dict, dt: float) -> None:
        s = self.state
        lr = self.lr_at(s.step - 1)
        tok_s = out["inputs"] / dt
        mfu = (tok_s * self.flops_per_token / (self.peak_flops * self.ctx.world_size)) if self.peak_flops else None
        if s.step % self.cfg.train.log_every_steps == 0 or s.step == self.total_steps or out["skipped"]:
            self.metrics.write({"step": s.step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                                "tokens_per_s": tok_s, "mfu": mfu, **peak_memory_mb(self.ctx.device),
                                "loss_tokens": out["tokens"], "tokens_seen": s.tokens_seen,
                                "skipped_steps": s.skipped_steps, **out["parts"]})
        if out["skipped"]:
            self._say(f"fft-dist: warning: step {s.step}: gradient norm {out['grad_norm']}; update skipped "
                      f"({s.skipped_steps} so far)")
        shown = {k: f"{v:.4g}" for k, v in out["parts"].items() if k in (KD_METRIC, L2SP_METRIC)}
        self._bar.set_postfix(loss=f"{out['loss']:.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
        self._bar.update(1)
