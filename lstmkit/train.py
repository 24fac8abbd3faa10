"""The trainer: truncated BPTT over B streams, validation, samples, checkpoints, loss curve, stop/resume.

One step, on chunk k of the streams (data.py):
    loss_k, (h, c) = model.loss(x_k, y_k, (h, c))     h, c carried from chunk k-1 (zeros at an epoch's start)
    grads = d loss_k / d params                        model.backward(): no gradient flows into chunk k-1
    clip(grads); params -= update(grads)               optim.py
Reported losses: nats per token; bits per character = nats / ln 2 × tokens / characters (per
original character for the jamo tokenizer); perplexity = e^nats for the word tokenizer.

Stopping: after --steps (total), --epochs, or --minutes (of training time, summed over resumes);
on Ctrl-C / SIGTERM (the state is saved first); or when the loss turns NaN/Inf or exceeds
EXPLODE_FACTOR × the first step's loss (the last good checkpoint is kept and nothing newer saved).
Resuming restores the parameters, optimizer slots and step, the position in the data, h and c, and
the dropout RNG, so a run stopped and resumed ends with the same weights as one left alone.

Shape letters: T sequence length, B batch size, L layers, H hidden size, V vocabulary size.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
import uuid

import numpy as np

from . import __version__
from .checkpoint import (POINTER, CheckpointError, atomic_write, read_checkpoint, read_pointer, run_lock, run_state,
                         save_checkpoint)
from .config import EXPLODE_FACTOR, MAIN_JOB_MINUTES, LMError, TrainConfig, validate
from .data import BatchStream, read_text, split_train_val, text_digest
from .evaluate import LN2, evaluate
from .model import LanguageModel
from .optim import clip_grad_norm, clip_grad_value, make_optimizer, scheduled_lr
from .sample import Sampler
from .tokenizers import build_tokenizer
from .train_state import check_carry, check_training_state

# hyperparameters a resumed run may change; every other one must stay as the checkpoint has it
RESUMABLE = {"steps", "epochs", "minutes", "eval_every", "sample_every", "sample_length", "sample_temperature"}
BUDGET = ("steps", "epochs", "minutes")
# what --init-from takes from the checkpoint it starts from: the model's shape and its vocabulary
MODEL_SHAPE = ("tokenizer", "hidden_size", "num_layers", "embed_size")


class TrainingStopped(LMError):
    """The loss or the parameters went NaN/Inf, or the loss exploded; the last good checkpoint is kept."""


def _plural(n, word):
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def resumed_config(ck, resume, overrides) -> TrainConfig:
    """The resumed run's TrainConfig with the allowed overrides applied; budget flags are handled by
    Trainer._set_budget (on a resume they mean 'this much more')."""
    try:
        TrainConfig.check_types(ck["config"]["train"])
        saved = TrainConfig.from_dict(ck["config"]["train"])
        if not isinstance(ck["config"]["data"]["sha256"], str):
            raise TypeError("data.sha256 is not a string")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {resume!r} is corrupt: bad training configuration "
                              f"in config.json ({type(e).__name__}: {e})") from None
    for k, v in overrides.items():
        if k == "data" or k in BUDGET:
            continue
        if k not in RESUMABLE and getattr(saved, k) != v:
            raise LMError(f"--{k.replace('_', '-')} {v} differs from the resumed run's "
                          f"{getattr(saved, k)}; a resumed run keeps its hyperparameters")
        setattr(saved, k, v)
    return saved


def init_config(cfg, ck, init_from, overrides) -> TrainConfig:
    """cfg with the model's shape taken from the --init-from checkpoint; a flag that asks for another
    shape is an error (the weights would not fit)."""
    model_cfg = ck["config"]["train"]
    for k in MODEL_SHAPE:
        if k in overrides and overrides[k] != model_cfg.get(k):
            raise LMError(f"--{k.replace('_', '-')} {overrides[k]} differs from the --init-from checkpoint's "
                          f"{model_cfg.get(k)}; a model started from a checkpoint keeps its shape")
        setattr(cfg, k, model_cfg[k])
    if "dropout" not in overrides:
        cfg.dropout = model_cfg.get("dropout", cfg.dropout)
    return cfg


class Trainer:
    """Trains a LanguageModel on a text.

        cfg = TrainConfig(data="shakespeare", hidden_size=128, steps=500)
        result = Trainer(cfg, out_dir="runs/shakespeare").run()     # -> dict with the final losses
        Trainer(cfg, out_dir="runs/shakespeare", resume="runs/shakespeare",
                overrides={"steps": 100}).run()                     # 100 more steps of a saved run
        Trainer(cfg, out_dir="runs/ft", init_from="runs/shakespeare").run()  # fine-tune on cfg.data

    Budgets (--steps, --epochs, --minutes) count from the start of the run; on a resume, a budget
    flag means that much MORE training, and with none the resumed run finishes the budget it had.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str, resume: str | None = None, overrides=None,
                 progress: bool = True, out=None, err=None, init_from: str | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.progress = progress
        self.out_dir = out_dir
        overrides = overrides or {}
        ck = read_checkpoint(resume, training=True) if resume is not None else None
        start = read_checkpoint(init_from, which="best") if init_from is not None else None
        if ck is not None:
            cfg = resumed_config(ck, resume, overrides)
        elif start is not None:
            cfg = init_config(cfg, start, init_from, overrides)
        validate(cfg)
        self.cfg = cfg
        self._load_data(overrides.get("data", cfg.data), ck, start, init_from)   # checked before any write
        self.run_id = ck["config"]["run_id"] if ck is not None else uuid.uuid4().hex
        self._check_out_dir(out_dir)
        if ck is not None:
            self._restore(ck, resume)
        else:
            self._fresh(start, init_from)
        self._set_budget(overrides if ck is not None else {})
        self.stop_signal = None
        self.last_val = self.history["val_bpc"][-1] if self.history["val_bpc"] else None
        self.best_val = min(self.history["val_bpc"]) if self.history["val_bpc"] else None

    # -- set-up, one concern each ------------------------------------------------------------
    def _load_data(self, spec, ck, start, init_from):
        """Text -> tokenizer -> ids -> training stream and validation ids."""
        cfg = self.cfg
        text = read_text(spec)
        digest = text_digest(text)
        if ck is not None:
            if digest != ck["config"]["data"]["sha256"]:
                raise LMError(f"--resume: the data {spec!r} differs from the text the run was trained on "
                              f"(sha256 {ck['config']['data']['sha256'][:12]}...)")
            self.tok = ck["tokenizer"]
        elif start is not None:
            self.tok = start["tokenizer"]
            self.tok.check_known(text, f"--init-from: the data {spec!r}")   # the vocabulary cannot grow
        else:
            self.tok = build_tokenizer(cfg.tokenizer, text)
        ids = self.tok.encode(text)
        train_ids, val_ids = split_train_val(ids, cfg.val_frac)
        self.stream = BatchStream(train_ids, cfg.batch_size, cfg.seq_len, "training text")
        self.val_ids = val_ids if len(val_ids) >= 2 else None
        self.val_tokens_per_char = 1.0
        if self.val_ids is not None and cfg.val_frac > 0:
            self.val_tokens_per_char = len(val_ids) / max(len(self.tok.decode(val_ids)), 1)
        if ck is None and os.path.isfile(cfg.data):
            cfg.data = os.path.abspath(cfg.data)     # so that --resume finds it from anywhere
        self.data_info = {"spec": cfg.data, "sha256": digest, "characters": len(text), "tokens": int(len(ids))}
        if start is not None:
            self.data_info["init_from"] = {"path": os.path.abspath(init_from),
                                           "run_id": start["config"].get("run_id"),
                                           "state": os.path.basename(start["dir"])}

    def _check_out_dir(self, out_dir):
        """--out must be new, empty (a first save that was interrupted leaves it so), or this run's
        own folder: never another run or the user's files (checkpoint.run_state)."""
        state = run_state(out_dir)
        if state == "foreign" and not os.path.isdir(out_dir):
            raise LMError(f"--out {out_dir!r} exists and is not a directory")
        if state == "foreign":
            raise LMError(f"--out {out_dir!r} is a folder that is not empty and holds no lstmkit checkpoint "
                          f"({POINTER} is missing); choose a new or empty folder")
        ptr = read_pointer(out_dir) if state == "run" else None
        if ptr is not None and ptr.get("run_id") != self.run_id:
            raise LMError(f"--out {out_dir!r} already holds the checkpoint of another run (step "
                          f"{ptr.get('step')}); choose a new --out, or --resume it")

    def _check_writable(self):
        """Create --out and write a file in it before the first step, so that a run that could not
        save is refused now, not after hours of training."""
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.out_dir)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise LMError(f"cannot write in --out {self.out_dir!r}: {e.strerror or e}") from None

    def _make_optimizer(self):
        cfg = self.cfg
        return make_optimizer(cfg.optimizer, self.model.params, cfg.effective_lr, cfg.momentum,
                              betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)

    def _fresh(self, start, init_from):
        cfg = self.cfg
        self.model = LanguageModel(self.tok.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.dropout,
                                   cfg.embed_size, seed=cfg.seed)
        if start is not None:
            self.model.load_params(start["model"].params)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.history = {"step": [], "loss": [], "val_step": [], "val_bpc": []}
        self.elapsed = 0.0
        self.first_loss = None
        self.carry = self.model.initial_state(cfg.batch_size)

    def _restore(self, ck, resume):
        """Model, optimizer, data position, RNG, history and carried state of a saved run, each value
        checked first (train_state.py)."""
        cfg = self.cfg
        self.model = ck["model"]
        st = check_training_state(ck["state"], self.stream.chunks_per_epoch, resume)
        self.optimizer = self._make_optimizer()
        try:
            self.optimizer.load_state(ck["optimizer_arrays"], st["optimizer"])
            self.model.lstm.dropout_rng.bit_generator.state = st["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {resume!r} is corrupt: bad optimizer or RNG state "
                                  f"({type(e).__name__}: {e})") from None
        self.stream.load_state({"epoch": st["epoch"], "chunk": st["chunk"]})
        self.step, self.history = st["step"], st["history"]
        self.elapsed, self.first_loss = st["elapsed_s"], st["first_loss"]
        self.carry = check_carry(ck["carry"], (cfg.num_layers, cfg.batch_size, cfg.hidden_size),
                                 self.model.dtype, resume)

    def _set_budget(self, more):
        """Turn the budget into a total (steps, or minutes when training by time). `more` holds a
        resume's budget flags, which add to what the run has done."""
        cfg = self.cfg
        if "steps" in more:
            cfg.steps, cfg.epochs, cfg.minutes = self.step + more["steps"], 0.0, 0.0
        elif "epochs" in more:
            cfg.steps = self.step + max(1, math.ceil(more["epochs"] * self.stream.chunks_per_epoch))
            cfg.epochs, cfg.minutes = 0.0, 0.0
        elif "minutes" in more:
            cfg.steps, cfg.epochs, cfg.minutes = 0, 0.0, self.elapsed / 60 + more["minutes"]
        if not (cfg.steps or cfg.epochs or cfg.minutes):
            cfg.minutes = MAIN_JOB_MINUTES
        if cfg.epochs and not cfg.steps:
            cfg.steps = max(1, math.ceil(cfg.epochs * self.stream.chunks_per_epoch))

    # -- reporting ---------------------------------------------------------------------------
    def _bpc(self, nats):
        if self.tok.kind == "word":
            return math.exp(nats)
        return nats / LN2 * self.val_tokens_per_char

    @property
    def metric(self):
        return "perplexity" if self.tok.kind == "word" else "bits/char"

    def validate(self):
        """The validation text's score, read as one stream like `lstmkit eval` (evaluate.py)."""
        if self.val_ids is None:
            return None
        nats, _ = evaluate(self.model, self.val_ids)
        return self._bpc(nats)

    def sample_text(self, length=None, seed=None) -> str:
        cfg = self.cfg
        seed = (cfg.seed, self.step) if seed is None else seed
        return Sampler(self.model, self.tok).generate(cfg.sample_length if length is None else length,
                                                      temperature=cfg.sample_temperature,
                                                      seed=np.random.SeedSequence(list(seed)))

    def _write(self, s):
        from tqdm import tqdm
        tqdm.write(s, file=self.out)
        self.out.flush()

    def _budget_text(self):
        cfg = self.cfg
        return _plural(cfg.steps, "step") if cfg.steps else _plural(round(cfg.minutes, 2), "minute")

    def _check_finite(self, last_saved):
        """Only finite parameters and a finite validation score are ever saved."""
        bad = [k for k, p in self.model.params.items() if not np.isfinite(p).all()]
        what = f"parameter {bad[0]} is not finite" if bad else None
        if what is None and self.last_val is not None and not math.isfinite(self.last_val):
            what = f"the validation score is {self.last_val}"
        if what:
            raise TrainingStopped(f"training stopped at step {self.step}: {what}; the last good checkpoint "
                                  f"(step {last_saved}) is kept in {self.out_dir}; try a lower --lr or --grad-clip")

    def save(self, best=False):
        state = {"step": self.step, "data_position": self.stream.state(),
                 "rng": {"dropout": self.model.lstm.dropout_rng.bit_generator.state},
                 "history": self.history, "elapsed_s": self.elapsed, "first_loss": self.first_loss,
                 "lstmkit_version": __version__}
        config = {"train": self.cfg.to_dict(), "data": self.data_info, "lstmkit_version": __version__}
        save_checkpoint(self.out_dir, model=self.model, tokenizer=self.tok, config=config, run_id=self.run_id,
                        step=self.step, state=state, optimizer=self.optimizer, carry=self.carry,
                        best=best, val=self.last_val)
        self.plot()

    def plot(self):
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:   # the curve is a convenience; training does not depend on it
            return
        h = self.history
        if not h["step"]:
            return
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        scale = 1.0 if self.tok.kind == "word" else self.val_tokens_per_char / LN2 \
            if self.val_ids is not None else 1.0 / LN2
        ax.plot(h["step"], np.asarray(h["loss"]) * scale if self.tok.kind != "word" else np.exp(h["loss"]),
                lw=0.8, alpha=0.7, label="training (per chunk)")
        if h["val_step"]:
            ax.plot(h["val_step"], h["val_bpc"], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel(self.metric)
        ax.set_title(f"{os.path.basename(os.path.abspath(self.out_dir))}: {self.tok.kind} LSTM "
                     f"{self.cfg.num_layers}x{self.cfg.hidden_size}")
        ax.grid(alpha=0.3)
        ax.legend()
        atomic_write(os.path.join(self.out_dir, "loss.png"), lambda f: fig.savefig(f, format="png"))

    # -- the loop ----------------------------------------------------------------------------
    def _done(self):
        cfg = self.cfg
        if cfg.steps:
            return self.step >= cfg.steps
        return bool(cfg.minutes) and self.elapsed >= cfg.minutes * 60

    def _lr(self):
        """This update's learning rate: warm-up, then the schedule over the run's budget."""
        cfg = self.cfg
        if cfg.steps:
            progress = (self.step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        else:
            progress = self.elapsed / (cfg.minutes * 60)
        return scheduled_lr(cfg.effective_lr, self.step, cfg.lr_schedule, warmup=cfg.warmup_steps,
                            progress=progress, decay=cfg.lr_decay, every=cfg.lr_decay_every,
                            min_lr=cfg.effective_min_lr)

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def run(self) -> dict:
        old_handlers = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[s] = signal.signal(s, self._on_signal)
            except ValueError:   # not the main thread: no signal handling
                pass
        try:
            with run_lock(self.out_dir):            # one writer per run: a second trainer is refused
                self._check_out_dir(self.out_dir)   # again, now that no other writer can change it
                return self._run()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _result(self, status, signum=None):
        return {"status": status, "step": self.step, "signal": signum, "val": self.last_val,
                "best_val": self.best_val, "loss": self.history["loss"][-1] if self.history["loss"] else None}

    def _announce(self, resumed):
        cfg, model = self.cfg, self.model
        self._write(f"lstmkit: {'resuming' if resumed else 'training'} a {cfg.tokenizer} LSTM "
                    f"{cfg.num_layers}x{cfg.hidden_size} ({model.num_parameters():,} parameters, vocabulary "
                    f"{self.tok.vocab_size}) on {cfg.data} ({self.data_info['characters']:,} characters), "
                    f"{cfg.optimizer} lr {cfg.effective_lr:g}, batch {cfg.batch_size}x{cfg.seq_len}; "
                    + (f"step {self.step} of " if resumed else "") + self._budget_text()
                    + f"; saving to {self.out_dir}")

    def _progress_bar(self):
        from tqdm import tqdm
        cfg = self.cfg
        time_mode = not cfg.steps
        fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} s of training [{elapsed}<{remaining}{postfix}]" \
            if time_mode else "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"
        return tqdm(total=int(round(cfg.minutes * 60)) if time_mode else cfg.steps,
                    initial=int(self.elapsed) if time_mode else self.step, bar_format=fmt,
                    disable=not self.progress, file=self.err, mininterval=1.0, dynamic_ncols=True, leave=False)

    def _train_step(self):
        """One optimizer step on the next chunk; returns its loss (nats per token)."""
        cfg, model = self.cfg, self.model
        x, y, epoch_start = self.stream.next()
        if epoch_start:
            self.carry = model.initial_state(cfg.batch_size)
        model.train()
        model.zero_grad()
        loss, carry = model.loss(x, y, self.carry)
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > EXPLODE_FACTOR * self.first_loss:
            what = "is not finite" if not math.isfinite(loss) else \
                f"exploded ({loss:.3g} nats > {EXPLODE_FACTOR:g} x the first step's {self.first_loss:.3g})"
            raise TrainingStopped(f"training stopped at step {self.step + 1}: the loss {what}; the last "
                                  f"good checkpoint (step {self.last_saved}) is kept in {self.out_dir}; "
                                  f"try a lower --lr or --grad-clip")
        model.backward()
        if cfg.grad_clip > 0:
            if cfg.clip_mode == "norm":
                clip_grad_norm(model.grads, cfg.grad_clip)
            else:
                clip_grad_value(model.grads, cfg.grad_clip)
        self.optimizer.step(model.grads, self._lr())
        self.carry = (carry[0].copy(), carry[1].copy())
        self.step += 1
        self.history["step"].append(self.step)
        self.history["loss"].append(round(loss, 6))
        return loss

    def _validate_and_save(self, loss, rate):
        t0 = time.perf_counter()
        self.last_val = self.validate()
        self.elapsed += time.perf_counter() - t0       # validation counts towards --minutes, as saved
        best = False
        if self.last_val is not None:
            self.history["val_step"].append(self.step)
            self.history["val_bpc"].append(round(self.last_val, 6))
            self.history.setdefault("val_minutes", []).append(round(self.elapsed / 60, 4))
            best = self.best_val is None or self.last_val < self.best_val
        self._check_finite(self.last_saved)
        if best:
            self.best_val = self.last_val
        self.save(best=best)
        self.last_saved = self.step
        val = f"{self.last_val:.3f}" if self.last_val is not None else "-"
        self._write(f"step {self.step:6d}  epoch {self.stream.epochs_done:6.2f}  loss {loss:.4f} nats  "
                    f"val {val} {self.metric}{' (best)' if best else ''}  {rate:,.0f} tokens/s  "
                    f"{self.elapsed / 60:.1f} min")

    def _run(self) -> dict:
        cfg = self.cfg
        resumed = self.step > 0
        if resumed and self._done():
            self._write(f"lstmkit: nothing to do: the run in {self.out_dir} has reached its budget "
                        f"(step {self.step}, {self._budget_text()}); give --steps, --epochs or --minutes "
                        f"to train that much more")
            return self._result("nothing to do")
        self._check_writable()
        self._announce(resumed)
        self.last_saved = self.step
        if not resumed:
            self.save()     # a good checkpoint exists from the start
        bar = self._progress_bar()
        tok_per_step = cfg.batch_size * cfg.seq_len
        rate, status = None, "done"
        try:
            while not self._done():
                if self.stop_signal is not None:
                    status = "interrupted"
                    break
                t0 = time.perf_counter()
                # a diverging run overflows; the loss and finiteness checks report it in one line
                with np.errstate(over="ignore", invalid="ignore"):
                    loss = self._train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                rate = tok_per_step / dt if rate is None else 0.9 * rate + 0.1 * tok_per_step / dt
                if self.step % cfg.eval_every == 0 or self._done():
                    with np.errstate(over="ignore", invalid="ignore"):
                        self._validate_and_save(loss, rate)
                if cfg.sample_every and self.step % cfg.sample_every == 0 and not self._done():
                    t1 = time.perf_counter()
                    self._write(f"----- sample at step {self.step} ({self.elapsed / 60:.1f} min) -----\n"
                                f"{self.sample_text()}\n-----")
                    self.elapsed += time.perf_counter() - t1
                val = f"{self.last_val:.3f}" if self.last_val is not None else "-"
                bar.set_postfix_str(f"step {self.step} loss {loss:.3f} val {val} {rate:,.0f} tok/s", refresh=False)
                bar.update((int(self.elapsed) - bar.n) if not cfg.steps else 1)
        finally:
            bar.close()
        if self.step != self.last_saved or status == "interrupted":
            self._check_finite(self.last_saved)
            self.save()
        if status == "interrupted":
            name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(self.stop_signal, "a signal")
            self._write(f"stopped by {name} at step {self.step}; saved {self.out_dir}; "
                        f"continue with: lstmkit train --resume {self.out_dir}")
            return self._result(status, self.stop_signal)
        self._final_sample()
        val = f"{self.last_val:.4f} {self.metric}" if self.last_val is not None else "no validation"
        best = f" (best {self.best_val:.4f})" if self.best_val is not None and self.best_val != self.last_val else ""
        self._write(f"done: step {self.step}, validation {val}{best}; checkpoint in {self.out_dir} "
                    f"(lstmkit sample {self.out_dir})")
        return self._result(status)

    def _final_sample(self):
        cfg = self.cfg
        if not cfg.sample_length:
            return
        self._write(f"----- final sample (step {self.step}) -----")
        Sampler(self.model, self.tok).generate(cfg.sample_length, temperature=cfg.sample_temperature,
                                               seed=np.random.SeedSequence([cfg.seed, self.step]),
                                               on_text=lambda s: (self.out.write(s), self.out.flush()))
        self.out.write("\n-----\n")
