"""The classifier's trainer: labelled texts -> vocabulary -> bucketed batches -> SequenceClassifier,
on trainer.py's loop (budget, schedule, signals, lock, best state, NaN guard are all there).

Data: the training file's texts are tokenized (the vocabulary is built from them, with the unknown
symbol and --min-count) and cut to --max-len tokens; validation is --val-data, or a random
--val-frac of the training rows held out (seeded, so a resumed run holds out the same rows).
Epoch e visits the training rows in batches of similar length (labelled.bucket_batches), in an
order drawn from (seed, e): a resumed run continues at (epoch, batch) exactly.
Validation reports accuracy; the best state by validation accuracy is kept beside the last.

Under MPI (distributed.py) every rank draws the same batches and rank r takes rows [lo, hi) of each
(np.array_split's shares, so a short last batch splits unevenly; the gradient of each share is
weighted by its rows, so the step is the global batch's mean). A rank whose share of a tiny last
batch is empty runs the batch's first row with weight 0, which keeps its dropout generator in step.
Each rank draws the global batch's dropout masks and keeps its rows (batches are longest first,
so a rank's rows are rows lo..hi-1 of the packed batch's sorted grid too), so N ranks train as one
process does. Validation: each rank predicts a contiguous 1/N of the rows; the correct counts are
summed (exactly one process's accuracy).

Shape letters: N rows, B batch size, C classes.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid

import numpy as np

from . import __version__
from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .classifier import SequenceClassifier
from .config import CLASSIFY_MINUTES, ClassifyConfig, validate_classify
from .distributed import SlicedRNG, share, split
from .labelled import bucket_batches, read_labelled, split_validation
from .tokenizers import build_tokenizer
from .train_state import check_training_state
from .trainer import TrainerBase, resumed_config

RESUMABLE = {"eval_every", "show"}
PREDICT_BATCH = 256         # rows per forward when predicting


def encode_texts(tok, texts, max_len) -> list:
    """Each text's ids, cut to its first max_len tokens."""
    return [tok.encode(t)[:max_len] for t in texts]


def predict_proba(model, seqs, batch_size=PREDICT_BATCH) -> np.ndarray:
    """(N, C) class probabilities of N sequences, batched by length so little is padded; rows in
    the order given. Eval mode, no_grad (SequenceClassifier.predict_proba)."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    probs = np.empty((len(seqs), model.num_classes), dtype=np.float64)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        probs[idx] = model.predict_proba([seqs[j] for j in idx])
    return probs


def data_digest(data) -> str:
    """sha256 of the texts and labels: identifies what a run was trained on."""
    h = hashlib.sha256()
    for t, y in zip(data.texts, data.labels):
        h.update(t.encode("utf-8") + b"\t" + data.classes[y].encode("utf-8") + b"\n")
    return h.hexdigest()


class ClassifierTrainer(TrainerBase):
    """Trains a SequenceClassifier on labelled text.

        ClassifierTrainer(ClassifyConfig(data="reviews.tsv", minutes=5), out_dir="runs/reviews").run()
        ClassifierTrainer(ClassifyConfig(), "runs/reviews", resume="runs/reviews",
                          overrides={"minutes": 5}).run()          # 5 more minutes
    """

    metric = "accuracy"
    val_key = "val_accuracy"
    higher_is_better = True
    rate_unit = "reviews/s"
    default_minutes = CLASSIFY_MINUTES
    resume_command = "lstmkit classify train"

    def __init__(self, cfg: ClassifyConfig, out_dir: str, resume: str | None = None, overrides=None,
                 progress: bool = True, out=None, err=None):
        super().__init__(out_dir, progress, out, err)
        overrides = overrides or {}
        ck = None
        if resume is not None:
            ck = read_checkpoint(resume, training=True, format=SequenceClassifier.FORMAT)
            cfg = resumed_config(ClassifyConfig, RESUMABLE, ck, resume, overrides)
        validate_classify(cfg)
        self.cfg = cfg
        share(cfg.batch_size, self.world)                # under MPI: B must split evenly over the ranks
        self._load_data(ck, resume)                      # checked before anything is written
        self.run_id = ck["config"]["run_id"] if ck is not None else uuid.uuid4().hex
        self._check_out_dir(out_dir)
        if ck is not None:
            self._restore(ck, resume)
        else:
            self._fresh()
        self._set_budget(overrides if ck is not None else {})
        self.items_per_step = cfg.batch_size
        self._order, self._order_epoch = None, None      # the batches of the epoch being read

    # -- set-up -------------------------------------------------------------------------------
    def _load_data(self, ck, resume):
        cfg = self.cfg
        classes = ck["config"]["classes"] if ck is not None else None
        data = read_labelled(cfg.data, cfg.text_column or None, cfg.label_column, classes)
        digest = data_digest(data)
        if ck is not None and digest != ck["config"]["data"]["sha256"]:
            raise CheckpointError(f"--resume: the data {cfg.data!r} differs from what the run in {resume!r} "
                                  f"was trained on")
        self.classes = data.classes
        if cfg.val_data:
            val = read_labelled(cfg.val_data, cfg.text_column or None, cfg.label_column, data.classes)
            train_rows, val_texts, val_labels = np.arange(len(data.texts)), val.texts, val.labels
        else:
            train_rows, val_rows = split_validation(len(data.texts), cfg.val_frac, cfg.seed)
            val_texts, val_labels = [data.texts[i] for i in val_rows], data.labels[val_rows]
        texts = [data.texts[i] for i in train_rows]
        self.tok = ck["tokenizer"] if ck is not None else \
            build_tokenizer(cfg.tokenizer, "\n".join(texts), cfg.min_count, unknown=True)
        self.train_ids = encode_texts(self.tok, texts, cfg.max_len)
        self.train_labels = data.labels[train_rows]
        self.lengths = np.array([len(s) for s in self.train_ids])
        self.val_texts, self.val_labels = val_texts, val_labels
        self.val_ids = encode_texts(self.tok, val_texts, cfg.max_len) if len(val_texts) else None
        self.batches_per_epoch = math.ceil(len(self.train_ids) / cfg.batch_size)
        if ck is None:
            for k in ("data", "val_data"):
                if getattr(cfg, k) and os.path.isfile(getattr(cfg, k)):
                    setattr(cfg, k, os.path.abspath(getattr(cfg, k)))   # so that --resume finds it
        self.data_info = {"spec": cfg.data, "sha256": digest, "rows": len(data.texts),
                          "train_rows": len(texts), "val_rows": len(val_texts)}

    def _fresh(self):
        cfg = self.cfg
        self.model = SequenceClassifier(self.tok.vocab_size, len(self.classes), cfg.cell, cfg.hidden_size,
                                        cfg.num_layers, cfg.bidirectional, cfg.dropout, cfg.embed_size, cfg.pool,
                                        seed=cfg.seed)
        self.optimizer = self._make_optimizer()
        self.step, self.epoch, self.chunk = 0, 0, 0
        self.history = self._new_history()
        self.elapsed = 0.0
        self.first_loss = None
        self._share_dropout()

    def _share_dropout(self):
        """Under MPI the head's and the RNN's dropout draw the global batch's masks (SlicedRNG)."""
        if self.world.size > 1:
            self.model.dropout_rng = SlicedRNG(self.model.dropout_rng, axis=0)               # (B, D*H)
            self.model.rnn.dropout_rng = SlicedRNG(self.model.rnn.dropout_rng, axis=1)       # (T, B, D*H)

    def _restore(self, ck, resume):
        self.model = ck["model"]
        st = check_training_state(ck["state"], self.batches_per_epoch, resume, self.val_key)
        self.optimizer = self._make_optimizer()
        try:
            self.optimizer.load_state(ck["optimizer_arrays"], st["optimizer"])
            self.model.dropout_rng.bit_generator.state = st["rng"]
            self.model.rnn.dropout_rng.bit_generator.state = ck["state"]["rng"]["rnn_dropout"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {resume!r} is corrupt: bad optimizer or RNG state "
                                  f"({type(e).__name__}: {e})") from None
        self.step, self.epoch, self.chunk = st["step"], st["epoch"], st["chunk"]
        self.history, self.elapsed, self.first_loss = st["history"], st["elapsed_s"], st["first_loss"]
        self._share_dropout()

    # -- the hooks of trainer.py's loop ---------------------------------------------------------
    def _chunks_per_epoch(self):
        return self.batches_per_epoch

    def _epochs_done(self):
        return self.epoch + self.chunk / self.batches_per_epoch

    def _batch_loss(self):
        if self.chunk >= self.batches_per_epoch:
            self.epoch, self.chunk = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = bucket_batches(self.lengths, self.cfg.batch_size,
                                         np.random.default_rng([self.cfg.seed, self.epoch]))
            self._order_epoch = self.epoch
        rows = self._order[self.chunk]          # the global batch, longest first
        self.chunk += 1
        if self.world.size > 1:
            rows = self._my_rows(rows)
        return self.model.loss([self.train_ids[i] for i in rows], self.train_labels[rows])

    def _my_rows(self, rows):
        """This rank's rows of the global batch, its weight (self.share) and its dropout slices."""
        lo, hi = split(len(rows), self.world.size, self.world.rank)
        self.share = (hi - lo) / len(rows)
        if hi == lo:                            # nothing left for this rank: a stand-in row, weight 0
            lo, hi = 0, 1
        steps = int(self.lengths[rows].max())
        self.model.dropout_rng.set(len(rows), lo, hi)
        self.model.rnn.dropout_rng.set(len(rows), lo, hi, steps)
        return rows[lo:hi]

    def validate(self):
        if self.val_ids is None:
            return None
        if self.world.size == 1:
            pred = predict_proba(self.model, self.val_ids).argmax(axis=1)
            return float(np.mean(pred == self.val_labels))
        lo, hi = split(len(self.val_ids), self.world.size, self.world.rank)
        right = 0
        if hi > lo:
            pred = predict_proba(self.model, self.val_ids[lo:hi]).argmax(axis=1)
            right = int(np.sum(pred == self.val_labels[lo:hi]))
        right, count = self.world.sum([right, hi - lo])
        return float(right / count)

    def save(self, best=False):
        state = {"step": self.step, "data_position": {"epoch": self.epoch, "chunk": self.chunk},
                 "rng": {"dropout": self.model.dropout_rng.bit_generator.state,
                         "rnn_dropout": self.model.rnn.dropout_rng.bit_generator.state},
                 "history": self.history, "elapsed_s": self.elapsed, "first_loss": self.first_loss,
                 "lstmkit_version": __version__}
        config = {"train": self.cfg.to_dict(), "data": self.data_info, "classes": self.classes,
                  "lstmkit_version": __version__}
        save_checkpoint(self.out_dir, model=self.model, tokenizer=self.tok, config=config, run_id=self.run_id,
                        step=self.step, state=state, optimizer=self.optimizer, best=best, val=self.last_val)
        self.plot()

    def _plot_title(self):
        cfg = self.cfg
        return (f"{os.path.basename(os.path.abspath(self.out_dir))}: {'bi' if cfg.bidirectional else ''}"
                f"{cfg.cell.upper()} {cfg.num_layers}x{cfg.hidden_size}, {cfg.pool} pool")

    def _announce(self, resumed):
        cfg, model = self.cfg, self.model
        self._write(f"lstmkit: {'resuming' if resumed else 'training'} a {cfg.tokenizer} "
                    f"{'bidirectional ' if cfg.bidirectional else ''}{cfg.cell.upper()} {cfg.num_layers}x"
                    f"{cfg.hidden_size} classifier ({model.num_parameters():,} parameters, vocabulary "
                    f"{self.tok.vocab_size}, classes {', '.join(self.classes)}) on {cfg.data} "
                    f"({self.data_info['train_rows']:,} rows, {self.data_info['val_rows']:,} for validation), "
                    f"{cfg.optimizer} lr {cfg.effective_lr:g}, batch {cfg.batch_size}; "
                    + (f"step {self.step} of " if resumed else "") + self._budget_text()
                    + f"; saving to {self.out_dir}")

    def _final(self):
        n = min(self.cfg.show, len(self.val_texts))
        if not n:
            return
        probs = predict_proba(self.model, self.val_ids[:n])
        self._write(f"----- {n} validation rows: predicted label (probability) | true label | text -----")
        for text, p, y in zip(self.val_texts[:n], probs, self.val_labels[:n]):
            k = int(p.argmax())
            self._write(f"{self.classes[k]} ({p[k]:.2f}) | {self.classes[y]} | {text}")

    def _done_hint(self):
        return f" (lstmkit classify eval {self.out_dir} --data FILE)"
