"""The language model's trainer: truncated BPTT over B streams (the loop itself is trainer.py's).

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

Under MPI (distributed.py), rank r of N trains on streams [r b, (r+1) b) of the B streams, b = B / N
(the same streams one process would cut), carrying its own h and c (L, b, H); a checkpoint holds
all B (gathered to rank 0), so it resumes on any N that divides B, or on one process. Each rank
draws the global dropout mask and keeps its rows, so N ranks train as one process does. Validation
cuts the text into N contiguous pieces, each read as one stream from a zero state, and sums their
losses: every token is still predicted once, but the first tokens of pieces 2..N with less
context than one process gives them (N - 1 fresh starts in the whole text: a small difference on
a long text, none with N = 1).

Shape letters: T sequence length, B batch size, L layers, H hidden size, V vocabulary size.
"""

from __future__ import annotations

import math
import os
import time
import uuid

import numpy as np

from . import __version__
from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .config import LMError, TrainConfig, validate
from .data import BatchStream, read_text, split_train_val, text_digest
from .distributed import SlicedRNG, share, split
from .evaluate import LN2, evaluate
from .model import LanguageModel
from .sample import Sampler
from .tokenizers import build_tokenizer
from .train_state import check_carry, check_training_state
from .trainer import TrainerBase, TrainingStopped, resumed_config

# hyperparameters a resumed run may change; every other one must stay as the checkpoint has it
RESUMABLE = {"eval_every", "sample_every", "sample_length", "sample_temperature"}
# what --init-from takes from the checkpoint it starts from: the model's shape and its vocabulary
MODEL_SHAPE = ("tokenizer", "hidden_size", "num_layers", "embed_size")


__all__ = ["Trainer", "TrainingStopped", "init_config"]


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


class Trainer(TrainerBase):
    """Trains a LanguageModel on a text.

        cfg = TrainConfig(data="shakespeare", hidden_size=128, steps=500)
        result = Trainer(cfg, out_dir="runs/shakespeare").run()     # -> dict with the final losses
        Trainer(cfg, out_dir="runs/shakespeare", resume="runs/shakespeare",
                overrides={"steps": 100}).run()                     # 100 more steps of a saved run
        Trainer(cfg, out_dir="runs/ft", init_from="runs/shakespeare").run()  # fine-tune on cfg.data

    Budgets (--steps, --epochs, --minutes) count from the start of the run; on a resume, a budget
    flag means that much MORE training, and with none the resumed run finishes the budget it had.
    """

    val_key = "val_bpc"
    rate_unit = "tokens/s"

    def __init__(self, cfg: TrainConfig, out_dir: str, resume: str | None = None, overrides=None,
                 progress: bool = True, out=None, err=None, init_from: str | None = None):
        super().__init__(out_dir, progress, out, err)
        overrides = overrides or {}
        ck = read_checkpoint(resume, training=True) if resume is not None else None
        start = read_checkpoint(init_from, which="best") if init_from is not None else None
        if ck is not None:
            cfg = resumed_config(TrainConfig, RESUMABLE, ck, resume, overrides)
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
        self.metric = "perplexity" if self.tok.kind == "word" else "bits/char"
        self.items_per_step = cfg.batch_size * cfg.seq_len

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
        self.rows = share(cfg.batch_size, self.world)     # this rank's streams [lo, hi)
        self.stream = BatchStream(train_ids, cfg.batch_size, cfg.seq_len, "training text", rows=self.rows)
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

    def _fresh(self, start, init_from):
        cfg = self.cfg
        self.model = LanguageModel(self.tok.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.dropout,
                                   cfg.embed_size, seed=cfg.seed)
        if start is not None:
            self.model.load_params(start["model"].params)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.history = self._new_history()
        self.elapsed = 0.0
        self.first_loss = None
        self.carry = self.model.initial_state(self.stream.b)
        self._share_dropout()

    def _share_dropout(self):
        """Under MPI the LSTM draws the global batch's dropout mask and keeps this rank's streams."""
        if self.world.size > 1:
            self.model.lstm.dropout_rng = SlicedRNG(self.model.lstm.dropout_rng, axis=1)
            self.model.lstm.dropout_rng.set(self.cfg.batch_size, *self.rows)

    def _restore(self, ck, resume):
        """Model, optimizer, data position, RNG, history and carried state of a saved run, each value
        checked first (train_state.py)."""
        cfg = self.cfg
        self.model = ck["model"]
        st = check_training_state(ck["state"], self.stream.chunks_per_epoch, resume, self.val_key)
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
        carry = check_carry(ck["carry"], (cfg.num_layers, cfg.batch_size, cfg.hidden_size),
                            self.model.dtype, resume)
        lo, hi = self.rows
        self.carry = tuple(np.array(a[:, lo:hi]) for a in carry)   # this rank's streams of all B
        self._share_dropout()

    def _chunks_per_epoch(self):
        return self.stream.chunks_per_epoch

    def _epochs_done(self):
        return self.stream.epochs_done

    # -- the hooks of trainer.py's loop ------------------------------------------------------
    def _bpc(self, nats):
        if self.tok.kind == "word":
            return math.exp(nats)
        return nats / LN2 * self.val_tokens_per_char

    def validate(self):
        """The validation text's score, read as one stream like `lstmkit eval` (evaluate.py); under
        MPI each rank reads one of N contiguous pieces (see the module docstring) and the nats are
        summed over ranks."""
        if self.val_ids is None:
            return None
        if self.world.size == 1:
            return self._bpc(evaluate(self.model, self.val_ids)[0])
        lo, hi = split(len(self.val_ids) - 1, self.world.size, self.world.rank)   # targets lo+1..hi
        nats, count = evaluate(self.model, self.val_ids[lo:hi + 1]) if hi > lo else (0.0, 0)
        total, count = self.world.sum([nats * count, count])
        return self._bpc(total / count)

    def _collect(self):
        """Rank 0 gets all B streams' h and c for the checkpoint (self.global_carry; with one process,
        self.carry itself). DataParallel._checkpoint calls it before every save."""
        self.global_carry = tuple(self.world.gather_rows(a, axis=1) for a in self.carry)

    def _batch_loss(self):
        x, y, epoch_start = self.stream.next()
        if epoch_start:
            self.carry = self.model.initial_state(self.stream.b)
        loss, self._next_carry = self.model.loss(x, y, self.carry)
        return loss

    def _after_step(self):
        self.carry = (self._next_carry[0].copy(), self._next_carry[1].copy())

    def _train_curve(self):
        loss = np.asarray(self.history["loss"])
        if self.tok.kind == "word":
            return np.exp(loss), "perplexity"
        return loss / LN2 * self.val_tokens_per_char, "bits/char"

    def _plot_title(self):
        return (f"{os.path.basename(os.path.abspath(self.out_dir))}: {self.tok.kind} LSTM "
                f"{self.cfg.num_layers}x{self.cfg.hidden_size}")

    def sample_text(self, length=None, seed=None) -> str:
        cfg = self.cfg
        seed = (cfg.seed, self.step) if seed is None else seed
        return Sampler(self.model, self.tok).generate(cfg.sample_length if length is None else length,
                                                      temperature=cfg.sample_temperature,
                                                      seed=np.random.SeedSequence(list(seed)))

    def _between_steps(self):
        cfg = self.cfg
        if self.rank0 and cfg.sample_every and self.step % cfg.sample_every == 0 and not self._done():
            t1 = time.perf_counter()
            self._write(f"----- sample at step {self.step} ({self.elapsed / 60:.1f} min) -----\n"
                        f"{self.sample_text()}\n-----")
            self._add_time(time.perf_counter() - t1)

    def save(self, best=False):
        state = {"step": self.step, "data_position": self.stream.state(),
                 "rng": {"dropout": self.model.lstm.dropout_rng.bit_generator.state},
                 "history": self.history, "elapsed_s": self.elapsed, "first_loss": self.first_loss,
                 "lstmkit_version": __version__}
        config = {"train": self.cfg.to_dict(), "data": self.data_info, "lstmkit_version": __version__}
        save_checkpoint(self.out_dir, model=self.model, tokenizer=self.tok, config=config, run_id=self.run_id,
                        step=self.step, state=state, optimizer=self.optimizer, carry=self.global_carry,
                        best=best, val=self.last_val)
        self.plot()

    def _announce(self, resumed):
        cfg, model = self.cfg, self.model
        self._write(f"lstmkit: {'resuming' if resumed else 'training'} a {cfg.tokenizer} LSTM "
                    f"{cfg.num_layers}x{cfg.hidden_size} ({model.num_parameters():,} parameters, vocabulary "
                    f"{self.tok.vocab_size}) on {cfg.data} ({self.data_info['characters']:,} characters), "
                    f"{cfg.optimizer} lr {cfg.effective_lr:g}, batch {cfg.batch_size}x{cfg.seq_len}; "
                    + (f"step {self.step} of " if resumed else "") + self._budget_text()
                    + f"; saving to {self.out_dir}")

    def _final(self):
        cfg = self.cfg
        if not cfg.sample_length:
            return
        self._write(f"----- final sample (step {self.step}) -----")
        Sampler(self.model, self.tok).generate(cfg.sample_length, temperature=cfg.sample_temperature,
                                               seed=np.random.SeedSequence([cfg.seed, self.step]),
                                               on_text=lambda s: (self.out.write(s), self.out.flush()))
        self.out.write("\n-----\n")

    def _done_hint(self):
        return f" (lstmkit sample {self.out_dir})"
