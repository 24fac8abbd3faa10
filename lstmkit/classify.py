"""`lstmkit classify train | eval | predict`: sequence classification of labelled text.

    lstmkit classify train                                   the built-in Korean movie reviews (NSMC), 10 minutes
    lstmkit classify train --data reviews.tsv --val-data dev.tsv --cell gru --pool last --out runs/reviews
    lstmkit classify train --resume runs/reviews --minutes 5  5 more minutes, exactly where it stopped
    lstmkit classify eval runs/reviews --data nsmc-test [--json]
                                                             accuracy, per-class precision/recall/F1, confusion
    lstmkit classify predict runs/reviews [FILE|-] [--json]  one text per line in, "label<TAB>probability" out

The file format, columns and built-in data are labelled.py's; the model is classifier.py's; the
training loop is trainer.py's, shared with `lstmkit train`. Bad input is one line on stderr and exit
status 2, and nothing is written.

Metrics, for class k with TP_k, FP_k, FN_k counted from the confusion matrix M (rows: true class,
columns: predicted class):  precision_k = TP_k / (TP_k + FP_k), recall_k = TP_k / (TP_k + FN_k),
F1_k = 2 precision_k recall_k / (precision_k + recall_k) (0 when undefined), accuracy = trace(M) / N.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import config as C
from .cli import (Parser, UsageError, _add_which, _default_out, add_run_flags, config_overrides, dispatch,
                  run_trainer)


def _add_train(sub):
    d = C.ClassifyConfig()
    p = sub.add_parser("train", help="train a classifier on labelled text",
                       description="Train a sequence classifier. With no arguments: a bidirectional LSTM on "
                                   f"the built-in Korean movie reviews for {C.CLASSIFY_MINUTES:g} minutes.")
    a = p.add_argument
    a("--data", help=f"a .tsv or .csv file with a header, or a built-in set: nsmc (default {d.data})")
    a("--val-data", help="a labelled file to validate on (default: hold out --val-frac of --data)")
    a("--val-frac", type=float, help=f"random share of --data held out for validation, default {d.val_frac}")
    a("--text-column", help="the text column (default: document, else text)")
    a("--label-column", help=f"the label column, default {d.label_column}")
    a("--out", help="checkpoint directory (default: a new folder under runs/)")
    a("--tokenizer", choices=C.TOKENIZERS, help=f"default {d.tokenizer}")
    a("--min-count", type=int, help=f"symbols seen fewer times become the unknown symbol, default {d.min_count}")
    a("--max-len", type=int, help=f"tokens kept per text (its first), default {d.max_len}")
    a("--cell", choices=C.CELLS, help=f"default {d.cell}")
    a("--embed-size", type=int, help=f"default {d.embed_size}")
    a("--hidden-size", type=int, help=f"default {d.hidden_size}")
    a("--num-layers", type=int, help=f"default {d.num_layers}")
    a("--bidirectional", action=argparse.BooleanOptionalAction, help=f"read both ways (default {d.bidirectional})")
    a("--dropout", type=float, help=f"on the pooled features and between layers, default {d.dropout}")
    a("--pool", choices=C.POOLS, help=f"over time: each text's last step, max or mean, default {d.pool}")
    a("--batch-size", type=int, help=f"texts per step, default {d.batch_size}")
    a("--show", type=int, help=f"validation texts printed with their prediction at the end, default {d.show}")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (its hyperparameters are kept); "
                                      "--out defaults to DIR")
    add_run_flags(p, d, C.CLASSIFY_MINUTES, what="data")


def _add_eval(sub):
    p = sub.add_parser("eval", help="score a classifier on labelled text")
    p.add_argument("ckpt", metavar="CKPT", help="a classifier's checkpoint directory")
    _add_which(p)
    p.add_argument("--data", required=True, help="a labelled .tsv/.csv file, or nsmc-test")
    p.add_argument("--text-column", help="default: the run's")
    p.add_argument("--label-column", help="default: the run's")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_predict(sub):
    p = sub.add_parser("predict", help="label texts, one per line")
    p.add_argument("ckpt", metavar="CKPT", help="a classifier's checkpoint directory")
    p.add_argument("input", metavar="FILE", nargs="?", default="-", help="UTF-8 text, one text per line "
                                                                         "(default -, standard input)")
    _add_which(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line with every class's probability")


def build_parser():
    p = Parser(prog="lstmkit classify", description="Sequence classification: train, eval, predict.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,predict}")
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    return p


def cmd_train(args, out, err) -> int:
    from .classify_train import ClassifierTrainer
    overrides = config_overrides(args, C.ClassifyConfig)
    if args.resume is not None:
        cfg, out_dir = C.ClassifyConfig(), args.out or args.resume
    else:
        cfg = C.ClassifyConfig(**overrides)
        out_dir = args.out or _default_out(cfg.data)
    trainer = ClassifierTrainer(cfg, out_dir, resume=args.resume, overrides=overrides,
                                progress=not args.no_progress, out=out, err=err)
    return run_trainer(trainer, err)


def _load(args):
    from .checkpoint import load_checkpoint
    from .classifier import SequenceClassifier
    return load_checkpoint(args.ckpt, which=args.which, format=SequenceClassifier.FORMAT)


def scores(confusion) -> dict:
    """accuracy and per-class precision, recall, F1 from a (C, C) confusion matrix (true x predicted)."""
    import numpy as np
    m = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / m.sum(axis=0))
        recall = np.nan_to_num(tp / m.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"accuracy": float(tp.sum() / m.sum()), "precision": precision.tolist(), "recall": recall.tolist(),
            "f1": f1.tolist()}


def cmd_eval(args, out, err) -> int:
    import numpy as np

    from .classify_train import encode_texts, predict_proba
    from .labelled import read_labelled
    model, tok, config = _load(args)
    train = config["train"]
    data = read_labelled(args.data, args.text_column or train.get("text_column") or None,
                         args.label_column or train.get("label_column", "label"), config["classes"])
    pred = predict_proba(model, encode_texts(tok, data.texts, train.get("max_len", 512))).argmax(axis=1)
    C_ = len(config["classes"])
    confusion = np.zeros((C_, C_), dtype=np.int64)
    np.add.at(confusion, (data.labels, pred), 1)
    res = {"data": args.data, "rows": len(data.texts), "classes": config["classes"], **scores(confusion),
           "confusion": confusion.tolist()}
    if args.json:
        out.write(json.dumps(res, ensure_ascii=False) + "\n")
        return 0
    out.write(f"{args.data}: accuracy {res['accuracy']:.4f} on {res['rows']:,} rows\n")
    out.write("class      precision  recall  F1      support\n")
    for k, name in enumerate(config["classes"]):
        out.write(f"{name:<10} {res['precision'][k]:9.4f}  {res['recall'][k]:6.4f}  {res['f1'][k]:6.4f}  "
                  f"{confusion[k].sum():7d}\n")
    out.write("confusion (rows: true, columns: predicted, in the class order above)\n")
    for k in range(C_):
        out.write("  " + " ".join(f"{v:7d}" for v in confusion[k]) + "\n")
    return 0


def _read_lines(path):
    from .data import decode_utf8, normalize_text
    if path == "-":
        raw, name = sys.stdin.buffer.read(), "standard input"
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UsageError(f"cannot read {path!r}: {e.strerror}") from None
        name = repr(path)
    lines = normalize_text(decode_utf8(raw, name)).split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                            # the newline that ends the last line
    empty = [i + 1 for i, t in enumerate(lines) if not t.strip()]
    if empty:
        raise UsageError(f"{name} line {empty[0]} is empty; give one text per line")
    return lines


def cmd_predict(args, out, err) -> int:
    from .classify_train import encode_texts, predict_proba
    model, tok, config = _load(args)
    texts = _read_lines(args.input)                             # all checked before anything is printed
    classes = config["classes"]
    probs = predict_proba(model, encode_texts(tok, [t.strip() for t in texts], config["train"].get("max_len", 512)))
    for p in probs:
        k = int(p.argmax())
        if args.json:
            out.write(json.dumps({"label": classes[k], "probabilities": dict(zip(classes, map(float, p)))},
                                 ensure_ascii=False) + "\n")
        else:
            out.write(f"{classes[k]}\t{p[k]:.4f}\n")
    return 0


def main(argv, out=None, err=None) -> int:
    """`lstmkit classify ...` (cli.main hands it the arguments after "classify")."""
    return dispatch(build_parser(), argv, {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict},
                    out or sys.stdout, err or sys.stderr)
