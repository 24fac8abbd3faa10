"""The training loop both tools share: the language model (train.py) and the classifier (classify.py).

What is the same for both lives here, once: the budget (--steps, --epochs, --minutes; "more" on a
resume), the learning-rate schedule, Ctrl-C / SIGTERM (save, then stop), one writer per run (the
run's lock), the checks on --out, the progress bar, validation every --eval-every steps with the best
state kept beside the last, the guard that stops a diverging run and keeps the last good state, and
the loss curve. What differs is a handful of hooks a subclass fills in:

    _batch_loss()       the next batch's loss, keeping what model.backward() needs
    _after_step()       bookkeeping after the update (the LM carries h and c to the next chunk)
    validate()          the validation score, or None when there is no validation data
    save(best)          write a checkpoint (checkpoint.save_checkpoint with the model's own files)
    _announce(resumed)  the first line printed;  _final()  what is printed at the end
    _chunks_per_epoch()  steps in one pass over the training data (for --epochs)

One step:
    loss = model.loss(batch)              forward, cache kept for backward
    stop if loss is NaN/Inf or > EXPLODE_FACTOR × the first step's loss
    model.backward()                      gradients added into model.grads (zeroed before)
    clip(grads); optimizer.step(grads, lr_t)
Every --eval-every steps and at the end: validate, check that every parameter and the score are
finite (else stop, keeping the last good state), save (best=True when the score improved).

Under MPI (`mpiexec -n N`, distributed.py) the same loop runs on every rank with its share of the
batch: between backward and clipping, one Allreduce sums the ranks' weighted gradients and carries
the global loss, the stop flag (a signal on any rank stops all after the same step) and rank 0's
clock, so every rank checks, clips, steps and stops alike. Rank 0 alone prints and writes; at
each checkpoint the ranks' parameters are compared and the subclass gathers its state (_collect).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import time

import numpy as np

from .checkpoint import POINTER, CheckpointError, atomic_write, read_pointer, run_lock, run_state
from .config import EXPLODE_FACTOR, MAIN_JOB_MINUTES, LMError
from .distributed import DataParallel, null_output
from .optim import clip_grad_norm, clip_grad_value, make_optimizer, scheduled_lr


BUDGET = ("steps", "epochs", "minutes")     # on a resume these mean "this much more" (_set_budget)


def resumed_config(cls, resumable, ck, resume, overrides):
    """The resumed run's config (a RunConfig subclass, cls) with the overrides in `resumable`
    applied; any other flag that differs from the saved value is an error. Budget flags are left to
    TrainerBase._set_budget."""
    try:
        cls.check_types(ck["config"]["train"])
        saved = cls.from_dict(ck["config"]["train"])
        if not isinstance(ck["config"]["data"]["sha256"], str):
            raise TypeError("data.sha256 is not a string")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {resume!r} is corrupt: bad training configuration "
                              f"in config.json ({type(e).__name__}: {e})") from None
    for k, v in overrides.items():
        if k in ("data", "val_data") or k in BUDGET:
            continue
        if k not in resumable and getattr(saved, k) != v:
            raise LMError(f"--{k.replace('_', '-')} {v} differs from the resumed run's "
                          f"{getattr(saved, k)}; a resumed run keeps its hyperparameters")
        setattr(saved, k, v)
    return saved


class TrainingStopped(LMError):
    """The loss or the parameters went NaN/Inf, or the loss exploded; the last good checkpoint is kept.
    Under MPI every rank raises it alike (the loss is the global one, the parameters the same)."""
    collective = True


def plural(n, word):
    return f"{n:g} {word}" + ("" if n == 1 else "s")


class TrainerBase(DataParallel):
    """The shared loop; see the module docstring for the hooks a subclass provides (and
    distributed.DataParallel for what it does under MPI)."""

    metric = "score"            # the validation metric's name, as printed
    val_key = "val_score"       # its list in the history (state.json)
    higher_is_better = False    # bits/char: lower; accuracy: higher
    rate_unit = "items/s"       # the progress rate: items_per_step per second of training
    default_minutes = MAIN_JOB_MINUTES   # the budget when none of --steps/--epochs/--minutes is given
    resume_command = "lstmkit train"     # printed after Ctrl-C: how to continue

    def __init__(self, out_dir, progress=True, out=None, err=None):
        self._init_world()              # self.world: distributed.Single for one process
        self.out = (out or sys.stdout) if self.rank0 else null_output()   # rank 0 alone prints
        self.err = err or sys.stderr
        self.progress = progress and self.rank0
        self.out_dir = out_dir
        self.stop_signal = None

    # -- set-up ---------------------------------------------------------------------------------
    def _check_out_dir(self, out_dir):
        """--out must be new, empty (a first save that was interrupted leaves it so), or this run's
        own folder: never another run or the user's files (checkpoint.run_state). Only rank 0 writes
        there, so only rank 0 checks."""
        if not self.rank0:
            return
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
        if not self.rank0:              # rank 0 alone writes
            return
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

    def _new_history(self):
        return {"step": [], "loss": [], "val_step": [], self.val_key: []}

    def _set_budget(self, more):
        """Turn the budget into a total (steps, or minutes when training by time). `more` holds a
        resume's budget flags, which add to what the run has done."""
        cfg = self.cfg
        if "steps" in more:
            cfg.steps, cfg.epochs, cfg.minutes = self.step + more["steps"], 0.0, 0.0
        elif "epochs" in more:
            cfg.steps = self.step + max(1, math.ceil(more["epochs"] * self._chunks_per_epoch()))
            cfg.epochs, cfg.minutes = 0.0, 0.0
        elif "minutes" in more:
            cfg.steps, cfg.epochs, cfg.minutes = 0, 0.0, self.elapsed / 60 + more["minutes"]
        if not (cfg.steps or cfg.epochs or cfg.minutes):
            cfg.minutes = self.default_minutes
        if cfg.epochs and not cfg.steps:
            cfg.steps = max(1, math.ceil(cfg.epochs * self._chunks_per_epoch()))
        vals = self.history[self.val_key]
        self.last_val = vals[-1] if vals else None
        self.best_val = (max(vals) if self.higher_is_better else min(vals)) if vals else None

    # -- reporting ------------------------------------------------------------------------------
    def _write(self, s):
        from tqdm import tqdm
        tqdm.write(s, file=self.out)
        self.out.flush()

    def _budget_text(self):
        cfg = self.cfg
        return plural(cfg.steps, "step") if cfg.steps else plural(round(cfg.minutes, 2), "minute")

    def _check_finite(self, last_saved):
        """Only finite parameters and a finite validation score are ever saved."""
        bad = [k for k, p in self.model.params.items() if not np.isfinite(p).all()]
        what = f"parameter {bad[0]} is not finite" if bad else None
        if what is None and self.last_val is not None and not math.isfinite(self.last_val):
            what = f"the validation score is {self.last_val}"
        if what:
            raise TrainingStopped(f"training stopped at step {self.step}: {what}; the last good checkpoint "
                                  f"(step {last_saved}) is kept in {self.out_dir}; try a lower --lr or --grad-clip")

    def _train_curve(self):
        """The training loss per step in the units the plot shows, and their name."""
        return np.asarray(self.history["loss"]), "training loss (nats)"

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
        y, label = self._train_curve()
        ax.plot(h["step"], y, lw=0.8, alpha=0.7, label=label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if h["val_step"]:
            ax2 = ax if label.startswith(self.metric) else ax.twinx()
            ax2.plot(h["val_step"], h[self.val_key], "o-", color="C1", label=f"validation {self.metric}")
            ax2.set_ylabel(self.metric)
            if ax2 is not ax:
                ax2.legend(loc="upper right")
        ax.set_ylabel(label)
        ax.set_title(self._plot_title())
        ax.legend(loc="upper left" if h["val_step"] else "best")
        atomic_write(os.path.join(self.out_dir, "loss.png"), lambda f: fig.savefig(f, format="png"))

    def _plot_title(self):
        return os.path.basename(os.path.abspath(self.out_dir))

    # -- the loop -------------------------------------------------------------------------------
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
        if self.world.agree(failed=False) is not None:   # another rank's set-up failed; it says why
            return self._result("failed elsewhere")
        if self.world.size > 1:
            self._start_world()
        old_handlers = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[s] = signal.signal(s, self._on_signal)
            except ValueError:   # not the main thread: no signal handling
                pass
        try:
            # one writer per run (rank 0): a second trainer is refused
            with run_lock(self.out_dir) if self.rank0 else contextlib.nullcontext():
                self._check_out_dir(self.out_dir)   # again, now that no other writer can change it
                return self._run()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _result(self, status, signum=None):
        return {"status": status, "step": self.step, "signal": signum, "val": self.last_val,
                "best_val": self.best_val, "loss": self.history["loss"][-1] if self.history["loss"] else None}

    def _progress_bar(self):
        from tqdm import tqdm
        cfg = self.cfg
        time_mode = not cfg.steps
        fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} s of training [{elapsed}<{remaining}{postfix}]" \
            if time_mode else "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"
        return tqdm(total=int(round(cfg.minutes * 60)) if time_mode else cfg.steps,
                    initial=int(self.elapsed) if time_mode else self.step, bar_format=fmt,
                    disable=not self.progress, file=self.err, mininterval=1.0, dynamic_ncols=True, leave=False)

    def _check_loss(self, loss):
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or loss > EXPLODE_FACTOR * self.first_loss:
            what = "is not finite" if not math.isfinite(loss) else \
                f"exploded ({loss:.3g} nats > {EXPLODE_FACTOR:g} x the first step's {self.first_loss:.3g})"
            raise TrainingStopped(f"training stopped at step {self.step + 1}: the loss {what}; the last "
                                  f"good checkpoint (step {self.last_saved}) is kept in {self.out_dir}; "
                                  f"try a lower --lr or --grad-clip")

    def _train_step(self):
        """One optimizer step on the next batch; returns its loss (under MPI the global batch's)."""
        cfg, model = self.cfg, self.model
        model.train()
        model.zero_grad()
        loss = self._batch_loss()
        if self.world.size == 1:
            self._check_loss(loss)              # before a backward through NaNs
        model.backward()
        if self.world.size > 1:
            loss = self._reduce(loss)           # the mean gradient and loss of all ranks
            self._check_loss(loss)              # the same number on every rank: all stop alike
        if cfg.grad_clip > 0:
            if cfg.clip_mode == "norm":
                clip_grad_norm(model.grads, cfg.grad_clip)
            else:
                clip_grad_value(model.grads, cfg.grad_clip)
        self.optimizer.step(model.grads, self._lr())
        self._after_step()
        self.step += 1
        self.history["step"].append(self.step)
        self.history["loss"].append(round(loss, 6))
        return loss

    def _after_step(self):
        pass

    def _improved(self, val):
        if self.best_val is None:
            return True
        return val > self.best_val if self.higher_is_better else val < self.best_val

    def _validate_and_save(self, loss, rate):
        t0 = time.perf_counter()
        self.last_val = self.validate()
        self._add_time(time.perf_counter() - t0)       # validation counts towards --minutes, as saved
        best = False
        if self.last_val is not None:
            self.history["val_step"].append(self.step)
            self.history[self.val_key].append(round(self.last_val, 6))
            self.history.setdefault("val_minutes", []).append(round(self.elapsed / 60, 4))
            best = self._improved(self.last_val)
        self._check_finite(self.last_saved)
        if best:
            self.best_val = self.last_val
        self._checkpoint(best=best)
        self.last_saved = self.step
        self._write(self._step_line(loss, rate, best))

    def _step_line(self, loss, rate, best):
        val = f"{self.last_val:.4f}" if self.last_val is not None else "-"
        return (f"step {self.step:6d}  epoch {self._epochs_done():6.2f}  loss {loss:.4f} nats  val {val} "
                f"{self.metric}{' (best)' if best else ''}  {rate:,.0f} {self.rate_unit}  {self.elapsed / 60:.1f} min")

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
            self._checkpoint()     # a good checkpoint exists from the start
        bar = self._progress_bar()
        rate, status = None, "done"
        try:
            while not self._done():
                if self._stop_requested():
                    status = "interrupted"
                    break
                t0 = time.perf_counter()
                # a diverging run overflows; the loss and finiteness checks report it in one line
                with np.errstate(over="ignore", invalid="ignore"):
                    loss = self._train_step()
                dt = time.perf_counter() - t0
                self._add_time(dt)
                r = self.items_per_step / dt
                rate = r if rate is None else 0.9 * rate + 0.1 * r
                if self.step % cfg.eval_every == 0 or self._done():
                    with np.errstate(over="ignore", invalid="ignore"):
                        self._validate_and_save(loss, rate)
                self._between_steps()
                val = f"{self.last_val:.3f}" if self.last_val is not None else "-"
                bar.set_postfix_str(f"step {self.step} loss {loss:.3f} val {val} {rate:,.0f} {self.rate_unit}",
                                    refresh=False)
                bar.update((int(self.elapsed) - bar.n) if not cfg.steps else 1)
        finally:
            bar.close()
        if self.step != self.last_saved or status == "interrupted":
            self._check_finite(self.last_saved)
            self._checkpoint()
        if status == "interrupted":
            name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(self.stop_signal, "a signal")
            self._write(f"stopped by {name} at step {self.step}; saved {self.out_dir}; "
                        f"continue with: {self.resume_command} --resume {self.out_dir}")
            return self._result(status, self.stop_signal)
        if self.rank0:
            self._final()
        val = f"{self.last_val:.4f} {self.metric}" if self.last_val is not None else "no validation"
        best = f" (best {self.best_val:.4f})" if self.best_val is not None and self.best_val != self.last_val else ""
        self._write(f"done: step {self.step}, validation {val}{best}; checkpoint in {self.out_dir}"
                    + self._done_hint())
        return self._result(status)

    def _done_hint(self):
        return ""

    def _between_steps(self):
        """After validation, before the next step: the LM prints its samples here."""
