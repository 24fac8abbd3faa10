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
import time
import uuid

import numpy as np

from . import __version__
from .checkpoint import POINTER, CheckpointError, atomic_write, read_checkpoint, read_pointer, save_checkpoint
from .config import EVAL_BATCH_SIZE, EXPLODE_FACTOR, MAIN_JOB_MINUTES, LMError, TrainConfig, validate
from .data import BatchStream, DataError, eval_chunks, read_text, split_train_val, text_digest
from .model import LanguageModel
from .optim import clip_grad_norm, clip_grad_value, decayed_lr, make_optimizer
from .sample import Sampler
from .tokenizers import build_tokenizer

LN2 = math.log(2.0)

# hyperparameters a resumed run may change; every other one must stay as the checkpoint has it
RESUMABLE = {"steps", "epochs", "minutes", "eval_every", "sample_every", "sample_length", "sample_temperature"}


class TrainingStopped(LMError):
    """The loss went NaN/Inf or exploded; the last good checkpoint is kept."""


def evaluate(model, ids, seq_len=128, batch_size=EVAL_BATCH_SIZE) -> tuple[float, int]:
    """Mean nats per predicted token over ids, and the number of tokens predicted (eval mode)."""
    was = model.lstm.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for x, y in eval_chunks(ids, batch_size, seq_len):
            loss, state = model.loss(x, y, state)
            total += loss * y.size
            count += y.size
    finally:
        model._cache = None
        model.train(was)
    return total / max(count, 1), count


def score_text(model, tokenizer, text, seq_len=128) -> dict:
    """Loss of a model on a text: {"loss_nats", "tokens", "bits_per_char" or "perplexity"}."""
    ids = tokenizer.encode(text)                     # ValueError names unknown symbols (char, jamo)
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); at least 2 are needed to score it")
    nats, n = evaluate(model, ids, seq_len)
    out = {"loss_nats": nats, "tokens": n, "tokenizer": tokenizer.kind}
    if tokenizer.kind == "word":
        out["perplexity"] = math.exp(nats)
    else:
        out["bits_per_char"] = nats / LN2 * (len(ids) / len(text))
        out["characters"] = len(text)
    return out


class Trainer:
    """Trains a LanguageModel on a text.

        cfg = TrainConfig(data="shakespeare", hidden_size=128, steps=500)
        result = Trainer(cfg, out_dir="runs/shakespeare").run()     # -> dict with the final losses
        Trainer(cfg, out_dir="runs/shakespeare", resume=True).run()  # continue a saved run
    """

    def __init__(self, cfg: TrainConfig, out_dir: str, resume: str | None = None, overrides=None,
                 progress: bool = True, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.progress = progress
        self.out_dir = out_dir
        overrides = overrides or {}
        ck = None
        if resume is not None:
            ck = read_checkpoint(resume, training=True)
            try:
                TrainConfig.check_types(ck["config"]["train"])
                saved = TrainConfig.from_dict(ck["config"]["train"])
                if not isinstance(ck["config"]["data"]["sha256"], str):
                    raise TypeError("data.sha256 is not a string")
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint {resume!r} is corrupt: bad training configuration "
                                      f"in config.json ({type(e).__name__}: {e})") from None
            for k, v in overrides.items():
                if k == "data":
                    continue
                if k not in RESUMABLE and getattr(saved, k) != v:
                    raise LMError(f"--{k.replace('_', '-')} {v} differs from the resumed run's "
                                  f"{getattr(saved, k)}; a resumed run keeps its hyperparameters")
                setattr(saved, k, v)
            cfg = saved
            if any(k in overrides for k in ("steps", "epochs", "minutes")):
                for k in ("steps", "epochs", "minutes"):
                    if k not in overrides:
                        setattr(cfg, k, type(getattr(cfg, k))(0))
        validate(cfg)
        if not (cfg.steps or cfg.epochs or cfg.minutes):
            cfg.minutes = MAIN_JOB_MINUTES
        self.cfg = cfg

        # data: everything is checked before anything is written
        text = read_text(overrides.get("data", cfg.data))
        digest = text_digest(text)
        if ck is not None:
            if digest != ck["config"]["data"]["sha256"]:
                raise LMError(f"--resume: the data {overrides.get('data', cfg.data)!r} differs from the text "
                              f"the run was trained on (sha256 {ck['config']['data']['sha256'][:12]}...)")
            self.tok = ck["tokenizer"]
        else:
            self.tok = build_tokenizer(cfg.tokenizer, text)
        ids = self.tok.encode(text)
        train_ids, val_ids = split_train_val(ids, cfg.val_frac)
        self.stream = BatchStream(train_ids, cfg.batch_size, cfg.seq_len, "training text")
        self.val_ids = val_ids if len(val_ids) >= 2 else None
        self.val_tokens_per_char = 1.0
        if self.val_ids is not None and cfg.val_frac > 0:
            val_text = self.tok.decode(val_ids)
            self.val_tokens_per_char = len(val_ids) / max(len(val_text), 1)
        if ck is None and os.path.isfile(cfg.data):
            cfg.data = os.path.abspath(cfg.data)     # so that --resume finds it from anywhere
        self.data_info = {"spec": cfg.data, "sha256": digest, "characters": len(text), "tokens": int(len(ids))}

        # the output directory must not hold another run
        ptr = read_pointer(out_dir) if os.path.isdir(out_dir) else None
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise LMError(f"--out {out_dir!r} exists and is not a directory")
        run_id = ck["config"]["run_id"] if ck is not None else uuid.uuid4().hex
        if ptr is not None and ptr.get("run_id") != run_id:
            raise LMError(f"--out {out_dir!r} already holds the checkpoint of another run (step "
                          f"{ptr.get('step')}); choose a new --out, or --resume it")
        if ptr is None and os.path.isdir(out_dir) and os.listdir(out_dir):
            raise LMError(f"--out {out_dir!r} is a folder that is not empty and holds no lstmkit checkpoint "
                          f"({POINTER} is missing); choose a new or empty folder")
        self.run_id = run_id

        # model, optimizer, training state
        if ck is not None:
            self.model = ck["model"]
            st = ck["state"]
            self.optimizer = make_optimizer(cfg.optimizer, self.model.params, cfg.effective_lr, cfg.momentum)
            try:
                self.optimizer.load_state(ck["optimizer_arrays"], st["optimizer"])
                self.stream.load_state(st["data_position"])
                self.model.lstm.dropout_rng.bit_generator.state = st["rng"]["dropout"]
                self.step = int(st["step"])
                self.history = st["history"]
                if not all(isinstance(self.history.get(k), list) for k in ("step", "loss", "val_step", "val_bpc")):
                    raise ValueError("the loss history is not lists of steps and losses")
                self.elapsed = float(st["elapsed_s"])
                self.first_loss = st["first_loss"]
                if self.first_loss is not None:
                    self.first_loss = float(self.first_loss)
                self.carry = ck["carry"]
                if self.carry[0].shape != (cfg.num_layers, cfg.batch_size, cfg.hidden_size):
                    raise ValueError("carried state has the wrong shape")
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"checkpoint {resume!r} is corrupt: bad training state in state.json "
                                      f"({type(e).__name__}: {e})") from None
        else:
            self.model = LanguageModel(self.tok.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.dropout,
                                       cfg.embed_size, seed=cfg.seed)
            self.optimizer = make_optimizer(cfg.optimizer, self.model.params, cfg.effective_lr, cfg.momentum)
            self.step = 0
            self.history = {"step": [], "loss": [], "val_step": [], "val_bpc": []}
            self.elapsed = 0.0
            self.first_loss = None
            self.carry = self.model.initial_state(cfg.batch_size)
        if cfg.epochs and not cfg.steps:
            cfg.steps = max(1, math.ceil(cfg.epochs * self.stream.chunks_per_epoch))
        self.stop_signal = None
        self.last_val = self.history["val_bpc"][-1] if self.history["val_bpc"] else None

    # -- reporting ---------------------------------------------------------------------------
    def _bpc(self, nats):
        if self.tok.kind == "word":
            return math.exp(nats)
        return nats / LN2 * self.val_tokens_per_char

    @property
    def metric(self):
        return "perplexity" if self.tok.kind == "word" else "bits/char"

    def validate(self):
        if self.val_ids is None:
            return None
        nats, _ = evaluate(self.model, self.val_ids, self.cfg.seq_len)
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

    def save(self):
        state = {"step": self.step, "data_position": self.stream.state(),
                 "rng": {"dropout": self.model.lstm.dropout_rng.bit_generator.state},
                 "history": self.history, "elapsed_s": self.elapsed, "first_loss": self.first_loss,
                 "lstmkit_version": __version__}
        config = {"train": self.cfg.to_dict(), "data": self.data_info, "lstmkit_version": __version__}
        save_checkpoint(self.out_dir, model=self.model, tokenizer=self.tok, config=config, run_id=self.run_id,
                        step=self.step, state=state, optimizer=self.optimizer, carry=self.carry)
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
        if cfg.steps and self.step >= cfg.steps:
            return True
        if cfg.minutes and not cfg.steps and self.elapsed >= cfg.minutes * 60:
            return True
        return False

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
            return self._run()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _run(self) -> dict:
        from tqdm import tqdm
        cfg, model, opt = self.cfg, self.model, self.optimizer
        os.makedirs(self.out_dir, exist_ok=True)
        resumed = self.step > 0
        self._write(f"lstmkit: {'resuming' if resumed else 'training'} a {cfg.tokenizer} LSTM "
                    f"{cfg.num_layers}x{cfg.hidden_size} ({model.num_parameters():,} parameters, vocabulary "
                    f"{self.tok.vocab_size}) on {cfg.data} ({self.data_info['characters']:,} characters), "
                    f"{cfg.optimizer} lr {cfg.effective_lr:g}, batch {cfg.batch_size}x{cfg.seq_len}; "
                    + (f"{cfg.steps} steps" if cfg.steps else f"{cfg.minutes:g} minutes")
                    + f"; saving to {self.out_dir}")
        if not resumed:
            self.save()     # a good checkpoint exists from the start
        time_mode = not cfg.steps
        total = int(round(cfg.minutes * 60)) if time_mode else cfg.steps
        bar = tqdm(total=total, initial=int(self.elapsed) if time_mode else self.step,
                   disable=not self.progress, file=self.err, mininterval=1.0, dynamic_ncols=True,
                   unit="s" if time_mode else "step", leave=False)
        tok_per_step = cfg.batch_size * cfg.seq_len
        rate = None
        status = "done"
        last_saved = self.step
        while not self._done():
            if self.stop_signal is not None:
                status = "interrupted"
                break
            t0 = time.perf_counter()
            x, y, epoch_start = self.stream.next()
            if epoch_start:
                self.carry = model.initial_state(cfg.batch_size)
            model.train()
            model.zero_grad()
            loss, carry = model.loss(x, y, self.carry)
            if self.first_loss is None:
                self.first_loss = loss
            if not math.isfinite(loss) or loss > EXPLODE_FACTOR * self.first_loss:
                bar.close()
                what = "is not finite" if not math.isfinite(loss) else \
                    f"exploded ({loss:.3g} nats > {EXPLODE_FACTOR:g} x the first step's {self.first_loss:.3g})"
                raise TrainingStopped(f"training stopped at step {self.step + 1}: the loss {what}; the last "
                                      f"good checkpoint (step {last_saved}) is kept in {self.out_dir}; "
                                      f"try a lower --lr or --grad-clip")
            model.backward()
            if cfg.grad_clip > 0:
                if cfg.clip_mode == "norm":
                    clip_grad_norm(model.grads, cfg.grad_clip)
                else:
                    clip_grad_value(model.grads, cfg.grad_clip)
            opt.step(model.grads, decayed_lr(cfg.effective_lr, self.step, cfg.lr_decay, cfg.lr_decay_every))
            self.carry = (carry[0].copy(), carry[1].copy())
            self.step += 1
            self.history["step"].append(self.step)
            self.history["loss"].append(round(loss, 6))
            dt = time.perf_counter() - t0
            self.elapsed += dt
            r = tok_per_step / dt
            rate = r if rate is None else 0.9 * rate + 0.1 * r

            if self.step % cfg.eval_every == 0 or self._done():
                t1 = time.perf_counter()
                self.last_val = self.validate()
                if self.last_val is not None:
                    self.history["val_step"].append(self.step)
                    self.history["val_bpc"].append(round(self.last_val, 6))
                    self.history.setdefault("val_minutes", []).append(round(self.elapsed / 60, 4))
                self.save()
                last_saved = self.step
                self.elapsed += time.perf_counter() - t1
                val = f"{self.last_val:.3f}" if self.last_val is not None else "-"
                self._write(f"step {self.step:6d}  epoch {self.stream.epochs_done:6.2f}  loss {loss:.4f} nats  "
                            f"val {val} {self.metric}  {rate:,.0f} tokens/s  {self.elapsed / 60:.1f} min")
            if cfg.sample_every and self.step % cfg.sample_every == 0 and not self._done():
                t1 = time.perf_counter()
                self._write(f"----- sample at step {self.step} ({self.elapsed / 60:.1f} min) -----\n{self.sample_text()}\n-----")
                self.elapsed += time.perf_counter() - t1
            bar.set_postfix_str(f"step {self.step} loss {loss:.3f} val {self.last_val or float('nan'):.3f} "
                                f"{rate:,.0f} tok/s", refresh=False)
            bar.update((int(self.elapsed) - bar.n) if time_mode else 1)
        bar.close()
        if self.step != last_saved or status == "interrupted":
            self.save()
        if status == "interrupted":
            name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(self.stop_signal, "a signal")
            self._write(f"stopped by {name} at step {self.step}; saved {self.out_dir}; "
                        f"continue with: lstmkit train --resume {self.out_dir}")
            return {"status": status, "step": self.step, "signal": self.stop_signal, "val": self.last_val,
                    "loss": self.history["loss"][-1] if self.history["loss"] else None}
        if cfg.sample_length:
            self._write(f"----- final sample (step {self.step}) -----")
            Sampler(model, self.tok).generate(cfg.sample_length, temperature=cfg.sample_temperature,
                                              seed=np.random.SeedSequence([cfg.seed, self.step]),
                                              on_text=lambda s: (self.out.write(s), self.out.flush()))
            self.out.write("\n-----\n")
        val = f"{self.last_val:.4f} {self.metric}" if self.last_val is not None else "no validation"
        self._write(f"done: step {self.step}, validation {val}; checkpoint in {self.out_dir} "
                    f"(lstmkit sample {self.out_dir})")
        return {"status": status, "step": self.step, "signal": None, "val": self.last_val,
                "loss": self.history["loss"][-1] if self.history["loss"] else None}
