"""The training loop: next-token cross-entropy, AdamW, warmup + cosine, exact resume.

Exactness: the batch of step ``s`` is a pure function of ``(train.seed, s)`` (see
:func:`nestlearn.data.train_batch`), and a checkpoint holds the weights, optimizer and scheduler
state, every RNG, the loop's own accumulators and (fp16) the loss scaler's state. Resuming from
step ``N`` therefore replays steps ``N+1..`` exactly as an uninterrupted run would (on the same
device and thread count).

Data parallelism (``train.parallel``, docs/distributed.md): under ``torchrun`` every rank runs
this loop on its rows of the global batch (:mod:`nestlearn.train.distributed`); losses and
evaluations are reduced over ranks, only rank 0 writes files, and checkpoints are sharded
(:mod:`nestlearn.train.distributed_checkpoint`). One process (``parallel=none``) is unchanged.

Interruption: the first Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint
and returns normally; a second one aborts at once.

One writer per run folder: a trainer holds the folder's lock (:mod:`nestlearn.train.run_lock`)
from construction until :meth:`Trainer.fit` returns (or :meth:`Trainer.close`); another process
(or another trainer of this process) on the same folder is refused with a message naming it.
A step that is already in a checkpoint is not written again (Ctrl-C right after a periodic save,
resuming a finished run), and a finished run resumed again adds no metrics rows.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nestlearn.config.loader import save_config, to_dict
from nestlearn.config.schema import RunConfig
from nestlearn.data import (
    TokenizedCorpus,
    check_resume_data,
    eval_batches,
    prepare_data,
    train_batch,
)
from nestlearn.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    NonFiniteMemoryError,
)
from nestlearn.eval.perplexity import evaluate_lm, unigram_metrics, upcast
from nestlearn.models.registry import build_model
from nestlearn.models.summary import count_parameters
from nestlearn.train.activation_checkpointing import apply_activation_checkpointing
from nestlearn.train.checkpoint import (
    load_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nestlearn.train.checkpoint_folders import (
    MANIFEST_FILE,
    checkpoint_root,
    clean_leftovers,
    list_checkpoints,
)
from nestlearn.train.compile import maybe_compile
from nestlearn.train.diagnose import locate_non_finite
from nestlearn.train.distributed import (
    DistEnv,
    check_optimizer,
    clip_gradients,
    gradient_sync,
    launch_env,
    setup_parallel,
    wrap_model,
)
from nestlearn.train.faults import fault_point
from nestlearn.train.level_steps import LevelSteps
from nestlearn.train.loss_scaling import MIN_SCALE, make_grad_scaler
from nestlearn.train.metrics import MetricsLog, read_metrics
from nestlearn.train.optim import build_optimizer, build_scheduler
from nestlearn.train.report import markdown_table, plot_losses, write_markdown
from nestlearn.train.run_lock import RunLock, hold_run_dir
from nestlearn.train.runtime import seed_everything


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    step: int
    interrupted: bool
    n_params: int
    tokens_seen: int
    train_seconds: float
    tokens_per_s: float
    final_eval: dict[str, float]  # empty if interrupted before any validation
    unigram_eval: dict[str, float]
    checkpoint: Path
    extra: dict[str, Any] = field(default_factory=dict)


class _StopRequest:
    """SIGINT/SIGTERM -> a flag checked between steps; a second signal raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resolve_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    if cfg.model.vocab_size == 0:
        return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size}; set model.vocab_size=0 to take it from the tokenizer"
        )
    return cfg


def _run_dir_of(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def _lock_for_resume(path: Path) -> RunLock | None:
    """Rank 0 locks the run folder of ``--resume PATH`` (a run or a checkpoint folder) before
    reading it, so no other writer prunes it meanwhile; a missing folder is left to the reader's
    error. Single process: leftovers of a crashed save are tidied under the lock."""
    path = Path(path)
    rank, world_size, _ = launch_env()
    is_checkpoint = (path / MANIFEST_FILE).exists() or path.name.lstrip(".").startswith("step_")
    run_dir = _run_dir_of(path) if is_checkpoint else path
    if rank != 0 or not run_dir.is_dir():
        return None
    lock = RunLock(run_dir).acquire()
    if world_size == 1 and checkpoint_root(run_dir).is_dir():
        clean_leftovers(checkpoint_root(run_dir))
    return lock


def make_trainer_state(
    *,
    step: int,
    seed: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    level_steps: Any = None,
    tokens_seen: int = 0,
    train_seconds: float = 0.0,
    loss_sum: float = 0.0,
    loss_count: int = 0,
    data_fingerprint: dict[str, Any] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Everything besides the weights that a checkpoint needs to resume exactly at ``step``
    (also what a converted model is saved with at step 0, see ``nestlearn.convert``).
    ``data_fingerprint`` (:func:`nestlearn.data.data_fingerprint`) is what resume checks the
    data against. ``grad_scaler`` (fp16 runs): its scale and growth count are saved too."""
    extra = {} if level_steps is None else {"level_steps": level_steps.state_dict()}
    if grad_scaler is not None:
        extra["grad_scaler"] = grad_scaler.state_dict()
    data = {"fingerprint": data_fingerprint} if data_fingerprint else {}
    return {
        **extra,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        # The data position: batches are a pure function of (seed, step) and the data.
        "data": {"seed": seed, "next_step": step, **data},
        "tokens_seen": tokens_seen,
        "train_seconds": train_seconds,
        "loss_sum": loss_sum,
        "loss_count": loss_count,
    }


class Trainer:
    """Builds data, model and optimizer from a :class:`RunConfig` and trains.

    Use :meth:`from_checkpoint` to resume; a fresh run refuses a run folder that already holds
    checkpoints (nothing good is overwritten).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        corpus: TokenizedCorpus | None = None,
        _resume: Any = None,
        _lock: RunLock | None = None,
        allow_data_change: bool = False,
    ) -> None:
        # Resume only: continue even if the data differs from the checkpoint's (not exact).
        self._allow_data_change = allow_data_change
        self.dist: DistEnv
        self.dist, self.runtime = setup_parallel(cfg.train)
        check_optimizer(self.dist.mode, cfg.optim.name, cfg.optim.preconditioner)
        self.run_dir = Path(cfg.train.out_dir)
        # Before any work: out_dir must be a usable folder that no other process writes into.
        try:
            self._lock = hold_run_dir(self.run_dir, self.dist, _lock)
        except BaseException:
            if _lock is not None:
                _lock.release()
            raise
        try:
            self._setup(cfg, corpus, _resume)
        except BaseException:
            self._release_run_dir()
            raise

    def _setup(self, cfg: RunConfig, corpus: TokenizedCorpus | None, _resume: Any) -> None:
        if _resume is None and list_checkpoints(self.run_dir):
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints; resume it with "
                f"`nestlearn train --resume {self.run_dir}` or set train.out_dir to a new folder"
            )
        progress = cfg.train.progress
        tokenizer = _resume.tokenizer if _resume is not None else None
        with self.dist.main_first():  # rank 0 fills the token cache, the others read it
            self.corpus = corpus or prepare_data(
                cfg.data, tokenizer=tokenizer, progress=progress and self.dist.is_main
            )
        if _resume is not None:  # the same data as the checkpoint's, or a clear refusal
            saved = (_resume.trainer_state or {}).get("data", {}).get("fingerprint")
            check_resume_data(
                saved,
                self.corpus.data_fingerprint,
                _resume.path,
                allow_change=self._allow_data_change,
                report=self.dist.is_main,
                step=_resume.step,
            )
        self.cfg = _resolve_vocab(cfg, self.corpus.tokenizer.vocab_size)
        self.token_bytes = self.corpus.tokenizer.token_byte_lengths()
        seed_everything(self.cfg.train.seed)
        self.model = build_model(self.cfg.model).to(self.runtime.device)
        if self.cfg.train.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        maybe_compile(self.model, self.cfg.train.compile, self.cfg.train.compile_mode)
        # What train_step calls: the model itself, or DDP around it (FSDP shards it in place).
        self.forward_model = wrap_model(self.model, self.dist, self.runtime)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.steps)
        # Parameters stepped every p optimizer steps (SPEC §4 outer level); None when off.
        self.level_steps = LevelSteps.from_spec(self.model, self.cfg.train.level_periods)
        # fp16 only (None otherwise): loss scaling, overflowing steps skipped and retried.
        self.grad_scaler = make_grad_scaler(self.runtime.precision, self.runtime.device)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None  # the step last_checkpoint holds
        if _resume is not None:
            self._restore(_resume)
        elif self.dist.is_main:
            self.metrics.reset()
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.corpus.tokenizer.save(self.run_dir / "tokenizer.json")
        self.dist.barrier()

    @classmethod
    def from_checkpoint(
        cls, path: Path, overrides: dict[str, Any] | None = None, **kwargs: Any
    ) -> Trainer:
        """Resume from a run folder (its newest valid checkpoint) or a checkpoint folder.

        Overrides may change the loop (``train.steps``, logging, eval), never the model or data:
        those must match the checkpoint exactly. The run folder is locked before it is read.
        """
        lock = _lock_for_resume(path)
        try:
            return cls._from_checkpoint(path, overrides, _lock=lock, **kwargs)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _from_checkpoint(
        cls, path: Path, overrides: dict[str, Any] | None = None, **kwargs: Any
    ) -> Trainer:
        from nestlearn.config.loader import replace as replace_cfg

        loaded = read_checkpoint(path)
        cfg = replace_cfg(loaded.config, overrides or {})
        changed = [
            f"{section}.{key}"
            for section in ("model", "data")
            for key, value in to_dict(cfg)[section].items()
            if to_dict(loaded.config)[section][key] != value
        ]
        if changed:
            raise CheckpointError(
                f"cannot change {', '.join(changed)} when resuming {loaded.path}; "
                "start a new run (train.out_dir=...) instead"
            )
        run_dir = _run_dir_of(loaded.path)
        cfg = replace(cfg, train=replace(cfg.train, out_dir=str(run_dir)))
        return cls(cfg, _resume=loaded, **kwargs)

    def _restore(self, loaded) -> None:
        state = loaded.trainer_state
        if self.dist.enabled or loaded.format != 1:
            # Any layout from either format: DCP reshards, a single file is split per rank.
            from nestlearn.train.distributed_checkpoint import restore_state

            levels = {} if self.level_steps is None else self.level_steps.accumulators
            restore_state(loaded.path, loaded.format, state, self.model, self.optimizer, levels)
        else:
            load_weights(self.model, loaded.path, device=self.runtime.device)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.level_steps is not None and "level_steps" in state:
                self.level_steps.load_state_dict(state["level_steps"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        self._loss_sum = float(state["loss_sum"])
        self._loss_count = int(state["loss_count"])
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
        self.last_checkpoint = loaded.path
        self._saved_step = self.step

    def trainer_state(self) -> dict[str, Any]:
        return make_trainer_state(
            step=self.step,
            seed=self.cfg.train.seed,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            level_steps=self.level_steps,
            tokens_seen=self.tokens_seen,
            train_seconds=self.train_seconds,
            loss_sum=self._loss_sum,
            loss_count=self._loss_count,
            data_fingerprint=self.corpus.data_fingerprint,
            grad_scaler=self.grad_scaler,
        )

    def save(self) -> Path:
        """Write a checkpoint (collective under data parallelism: every rank calls it).

        A step already in ``last_checkpoint`` (saved or resumed from) is not written again: the
        state is the same, and re-writing would only open a window for losing it.
        """
        if self.last_checkpoint is not None and self._saved_step == self.step:
            return self.last_checkpoint
        self.last_checkpoint = self._write_checkpoint()
        self._saved_step = self.step
        return self.last_checkpoint

    def _write_checkpoint(self) -> Path:
        if self.dist.enabled:
            from nestlearn.train.distributed_checkpoint import save_sharded_checkpoint

            state = self.trainer_state()
            state.pop("optimizer")
            state.pop("level_steps", None)
            levels = {} if self.level_steps is None else self.level_steps.accumulators
            self.last_checkpoint = save_sharded_checkpoint(
                self.run_dir,
                self.step,
                model=self.model,
                optimizer=self.optimizer,
                levels=levels,
                trainer_state=state,
                cfg=self.cfg,
                tokenizer=self.corpus.tokenizer,
                keep_last=self.cfg.train.keep_last,
                env=self.dist,
            )
            return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            trainer_state=self.trainer_state(),
            cfg=self.cfg,
            tokenizer=self.corpus.tokenizer,
            keep_last=self.cfg.train.keep_last,
        )
        return self.last_checkpoint

    def _non_finite(
        self, what: str, value: float, tokens: torch.Tensor | None = None
    ) -> NonFiniteLossError:
        """The error for a non-finite loss or gradient norm. With the batch (``tokens``), a
        checked copy of the model (:mod:`nestlearn.train.diagnose`) names the layer, memory and
        token that went non-finite first, and the message gives that layer's advice instead of
        the outer step's."""
        step = self.step + 1
        last = self.last_checkpoint or "none yet"
        where = None
        if tokens is not None and not self.dist.enabled:  # sharded weights: no single copy
            where = locate_non_finite(self.cfg.model, self.model, tokens, self.runtime.autocast)
        if where:
            return NonFiniteLossError(
                f"{what} became {value} at step {step}; stopped before applying it. The cause "
                f"is inside the model: {where}. Last good checkpoint: {last} (a resume keeps "
                "the model's settings: a model.* change needs a new run)"
            )
        return NonFiniteLossError(
            f"{what} became {value} at step {step}; stopped before applying it. Last good "
            f"checkpoint: {last}. Lower optim.lr or raise optim.warmup_steps, then resume "
            "from it (or start again)"
        )

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm).

        Under data parallelism each rank trains on its rows of the global micro-batch and the
        returned loss is the mean over ranks (the single-process loss of the whole batch).

        fp16 (:mod:`nestlearn.train.loss_scaling`): the backward runs on the scaled loss and the
        gradients are unscaled before clipping, level periods and the optimizer. Gradients with
        inf/nan skip the step: nothing but the scale changes (halved), ``self.step`` stays, so
        the caller's next call retries the same batch; the returned grad norm is then non-finite.
        Below ``MIN_SCALE`` a non-finite gradient raises as in fp32.
        """
        tc = self.cfg.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(tc.grad_accum):
            x, y = train_batch(
                self.corpus.train,
                step=self.step,
                micro_step=micro,
                batch_size=tc.batch_size,
                seq_len=tc.seq_len,
                seed=tc.seed,
            )
            if self.dist.enabled:
                rows = self.dist.rows(tc.batch_size)
                x, y = x[rows], y[rows]
            x, y = x.to(self.runtime.device), y.to(self.runtime.device)
            last = micro == tc.grad_accum - 1
            with gradient_sync(self.forward_model, self.dist, last):
                try:
                    with self.runtime.autocast():
                        logits, _ = self.forward_model(x)
                except NonFiniteMemoryError as exc:  # model.check_finite: add the step
                    raise NonFiniteMemoryError(f"optimizer step {self.step + 1}: {exc}") from exc
                loss = F.cross_entropy(upcast(logits).reshape(-1, logits.size(-1)), y.reshape(-1))
                value = self.dist.mean(float(loss.detach()))
                if not math.isfinite(value):
                    raise self._non_finite("the training loss", value, x)
                scaled = loss / tc.grad_accum
                if self.grad_scaler is not None:
                    scaled = self.grad_scaler.scale(scaled)
                scaled.backward()
            total += value / tc.grad_accum
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # true gradients from here on
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_gradients(self.model.parameters(), clip)
        if not math.isfinite(grad_norm):
            if scaler is None or scaler.get_scale() <= MIN_SCALE:
                raise self._non_finite("the gradient norm", grad_norm)
            scaler.update()  # overflow: halve the scale; no parameter or schedule moves
            self.optimizer.zero_grad(set_to_none=True)
            return total, grad_norm
        if self.level_steps is not None:
            self.level_steps.apply(self.step)
        if scaler is not None:
            scaler.step(self.optimizer)  # steps: unscale_ found every gradient finite
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += tc.grad_accum * tc.batch_size * tc.seq_len
        return total, grad_norm

    def eval_windows(self, tokens: np.ndarray):
        ec = self.cfg.eval
        return eval_batches(
            tokens,
            batch_size=ec.batch_size,
            seq_len=ec.seq_len or self.cfg.train.seq_len,
            max_tokens=ec.max_tokens,
        )

    def evaluate(self) -> dict[str, float]:
        """Validation metrics; under data parallelism each rank scores its rows of every batch
        and the sums are reduced, so every rank gets the single-process numbers."""
        sharded = (
            dict(rows=self.dist.rows, reduce=self.dist.all_reduce) if self.dist.enabled else {}
        )
        return evaluate_lm(
            self.model,
            self.eval_windows(self.corpus.val),
            self.token_bytes,
            device=self.runtime.device,
            autocast=self.runtime.autocast,
            **sharded,
        )

    def unigram_baseline(self) -> dict[str, float]:
        targets = np.concatenate([y.numpy().ravel() for _, y in self.eval_windows(self.corpus.val)])
        return unigram_metrics(
            self.corpus.train, targets, self.corpus.tokenizer.vocab_size, self.token_bytes
        )

    def _log_eval(self) -> dict[str, float]:
        result = self.evaluate()
        scores = {k: result[k] for k in ("loss", "ppl", "bpb")}
        self._write(
            {
                "kind": "eval",
                "step": self.step,
                "tokens": self.tokens_seen,
                **scores,
                "eval_tokens": result["tokens"],
            }
        )
        return result

    def _last_eval(self, step: int | None = None) -> dict[str, float]:
        """The newest logged evaluation (of ``step`` only, if given); {} if none."""
        evals = [
            r
            for r in read_metrics(self.metrics.path)
            if r.get("kind") == "eval" and (step is None or r.get("step") == step)
        ]
        if not evals:
            return {}
        last = evals[-1]
        return {
            "loss": last["loss"],
            "ppl": last["ppl"],
            "bpb": last["bpb"],
            "tokens": last["eval_tokens"],
        }

    def fit(self) -> TrainResult:
        """Train to ``train.steps`` (or until interrupted), evaluate, checkpoint and report.

        The run folder's lock is held throughout (taken again if :meth:`close` or an earlier
        ``fit`` let it go) and released on return. A run already at ``train.steps`` trains
        nothing: it reports the logged final evaluation (evaluating only if none is logged for
        this step) and ``result.extra["already_finished"]`` is True.
        """
        self._lock = hold_run_dir(self.run_dir, self.dist, self._lock)
        try:
            return self._fit()
        finally:
            self._release_run_dir()

    def _fit(self) -> TrainResult:
        tc = self.cfg.train
        interrupted = False
        already_finished = self._saved_step is not None and self.step >= tc.steps
        window_tokens, window_time = 0, 0.0
        bar = tqdm(
            total=tc.steps,
            initial=self.step,
            disable=not (tc.progress and self.dist.is_main),
            desc=self.cfg.name,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        deadline = time.monotonic() + tc.max_minutes * 60 if tc.max_minutes > 0 else None
        with _StopRequest() as stop, bar:
            while self.step < tc.steps:
                start, step = time.perf_counter(), self.step
                loss, grad_norm = self.train_step()
                if self.step == step:  # fp16 overflow: skipped, same batch at half the scale
                    self.train_seconds += time.perf_counter() - start
                    continue
                fault_point("after_step", self.step)
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                window_time += elapsed
                window_tokens += tc.grad_accum * tc.batch_size * tc.seq_len
                self._loss_sum += loss
                self._loss_count += 1
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    tps = window_tokens / max(window_time, 1e-9)
                    mean_loss = self._loss_sum / self._loss_count
                    self._write(
                        {
                            "kind": "train",
                            "step": self.step,
                            "tokens": self.tokens_seen,
                            "loss": mean_loss,
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "tokens_per_s": tps,
                            **self._scale_record(),
                        }
                    )
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    self._loss_sum, self._loss_count = 0.0, 0
                    window_tokens, window_time = 0, 0.0
                bar.update(1)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    self._log_eval()
                if tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                    self.save()
                late = deadline is not None and time.monotonic() > deadline
                requested, late = self.dist.any(stop.requested, late)  # all ranks agree
                if requested or late:
                    interrupted = requested
                    break
        # Ctrl-C means "save and get out": skip the final validation (resuming redoes it).
        # Resuming a finished run evaluates only if its final validation was never logged.
        final_eval = self._last_eval() if interrupted else self._last_eval(self.step)
        (evaluate,) = self.dist.any(self.dist.is_main and not (interrupted or final_eval))
        if evaluate:  # rank 0 decides: evaluation is collective
            final_eval = self._log_eval()
        checkpoint = self.save()
        result = TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            interrupted=interrupted,
            n_params=count_parameters(self.model),
            tokens_seen=self.tokens_seen,
            train_seconds=self.train_seconds,
            tokens_per_s=self.tokens_seen / max(self.train_seconds, 1e-9),
            final_eval=final_eval,
            unigram_eval=self.unigram_baseline(),
            checkpoint=checkpoint,
            extra={"already_finished": already_finished},
        )
        if self.dist.is_main:
            self.write_report(result)
        return result

    def _scale_record(self) -> dict[str, float]:
        """fp16: the loss scale after this step (halved by each skipped step), for the log."""
        return {} if self.grad_scaler is None else {"loss_scale": self.grad_scaler.get_scale()}

    def _write(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.metrics.write(record)

    def close(self) -> None:
        """Let go of the run folder and leave the process group if this trainer created it
        (call once training is done)."""
        self._release_run_dir()
        self.dist.close()

    def _release_run_dir(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def write_report(self, result: TrainResult) -> None:
        """``loss.png`` and ``summary.md`` in the run folder."""
        records = read_metrics(self.metrics.path)
        plot_losses({self.cfg.name: records}, self.run_dir / "loss.png", title=self.cfg.name)
        write_markdown(self.run_dir / "summary.md", run_summary(self.cfg, result, self.corpus))


def run_summary(cfg: RunConfig, result: TrainResult, corpus: TokenizedCorpus) -> str:
    ev, uni = result.final_eval, result.unigram_eval
    nan = float("nan")
    rows = [
        [
            cfg.name,
            cfg.model.name,
            result.n_params,
            result.step,
            result.tokens_seen,
            ev.get("loss", nan),
            ev.get("ppl", nan),
            ev.get("bpb", nan),
            result.tokens_per_s,
        ],
        [
            "unigram (add-one)",
            "-",
            cfg.model.vocab_size,
            "-",
            corpus.train.size,
            uni["loss"],
            uni["ppl"],
            uni["bpb"],
            "-",
        ],
    ]
    headers = [
        "run",
        "model",
        "params",
        "steps",
        "train tokens",
        "val loss",
        "val ppl",
        "val bpb",
        "train tok/s",
    ]
    status = "interrupted (checkpoint saved)" if result.interrupted else "finished"
    return (
        f"# {cfg.name}\n\n"
        f"Status: {status} at step {result.step}. Validation on {int(uni['tokens']):,} held-out "
        f"tokens ({corpus.val_docs} documents); tokenizer `{corpus.tokenizer.kind}` with "
        f"{corpus.tokenizer.vocab_size:,} tokens.\n\n"
        + markdown_table(headers, rows)
        + f"\nCheckpoint: `{result.checkpoint}`\n"
    )
