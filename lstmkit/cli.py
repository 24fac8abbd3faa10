"""The command line: `lstmkit train | sample | eval | classify | gradient-flow | visualize`.

    lstmkit train                                  the main job: a char LSTM on the built-in 무정
    lstmkit train --data FILE --out DIR ...        any UTF-8 text (see `lstmkit train -h`)
    lstmkit train --resume DIR [--steps N]         continue a saved run exactly where it stopped (N more steps)
    lstmkit train --init-from DIR --data FILE      start from a trained model on new text (fine-tuning)
    lstmkit sample DIR [--length N --temperature T --top-k K --top-p P --greedy --prime TEXT --seed S
                        -n N --out FILE --last]
    lstmkit eval DIR --data FILE [--json --unknown skip|error --last]
                                                   bits per character (char, jamo) or perplexity (word)

Bad input (a missing or undecodable file, a bad hyperparameter, a broken checkpoint, ...) prints one
line `lstmkit: error: ...` on stderr and exits with status 2, writing nothing; a training run that
diverges exits with status 1; Ctrl-C / SIGTERM save the run and exit with 130 / 143.

`mpiexec -n N lstmkit train ...` (and `classify train`) trains one model with N processes
(distributed.py); an error is still one line, printed once for the whole job: by rank 0, or by the
rank it happened on (named), which then ends the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from . import config as C

EXIT_USAGE = 2


class UsageError(C.LMError):
    """A command-line mistake: reported as one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage block) and never exits by itself."""

    def error(self, message):
        raise UsageError(message)


def write_output(prog, path, write) -> bool:
    """Call write(), which writes the file `path`; if that fails, report it as one line on stderr
    (`prog: error: cannot write 'path': reason`) and return False. For the lessons' outputs."""
    try:
        write()
    except OSError as e:
        print(f"{prog}: error: cannot write {path!r}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return v


def _nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _positive_float(s):
    v = float(s)
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {s}")
    return v


def add_run_flags(p, d, default_minutes, what="text"):
    """The flags every trainer has (config.RunConfig): optimizer, schedule, clipping, budget, validation
    cadence and seed; d holds the defaults shown in --help."""
    a = p.add_argument
    a("--optimizer", choices=C.OPTIMIZERS, help=f"default {d.optimizer}")
    a("--lr", type=_positive_float, help="learning rate (default " + (f"{d.lr:g}" if d.lr else "per optimizer: "
      + ", ".join(f"{k} {v:g}" for k, v in C.DEFAULT_LR.items())) + ")")
    a("--momentum", type=float, help=f"SGD momentum, default {d.momentum}")
    a("--beta1", type=float, help=f"Adam's beta1, default {d.beta1}")
    a("--beta2", type=float, help=f"Adam's beta2, default {d.beta2}")
    a("--weight-decay", type=float, help="weight decay on weight matrices and the embedding (not biases); "
                                         f"with adam it is AdamW's decoupled decay, default {d.weight_decay:g}")
    a("--lr-schedule", choices=C.LR_SCHEDULES, help="constant; step (x --lr-decay every --lr-decay-every "
                                                   "steps); cosine (down to --min-lr over the run's budget); "
                                                   f"default {d.lr_schedule}, or step when --lr-decay is given")
    a("--lr-decay", type=float, help=f"the step schedule's factor, default {d.lr_decay}")
    a("--lr-decay-every", type=int, help=f"the step schedule's period in steps, default {d.lr_decay_every}")
    a("--warmup-steps", type=int, help=f"linear learning-rate warm-up, default {d.warmup_steps}")
    a("--min-lr", type=float, help="where the cosine schedule ends, default lr / 10")
    a("--grad-clip", type=float, help=f"0 = off, default {d.grad_clip}")
    a("--clip-mode", choices=C.CLIP_MODES, help=f"global L2 norm or elementwise, default {d.clip_mode}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, help="optimizer steps to train (with --resume: this many more)")
    g.add_argument("--epochs", type=_positive_float, help=f"passes over the training {what} (with --resume: more)")
    g.add_argument("--minutes", type=_positive_float,
                   help=f"minutes of training (with --resume: this many more; the default when none of "
                        f"--steps/--epochs/--minutes is given: {default_minutes:g}, or, on --resume, "
                        f"whatever the run's budget has left)")
    a("--eval-every", type=int, help=f"validate and checkpoint every N steps, default {d.eval_every}")
    a("--seed", type=int, help=f"initialisation seed, default {d.seed}")
    a("--no-progress", action="store_true", help="no progress bar")


def _add_train(sub):
    d = C.TrainConfig()
    p = sub.add_parser("train", help="train a language model on a UTF-8 text",
                       description="Train an LSTM language model. With no arguments: the main job, a "
                                   f"character-level LSTM on the built-in 무정 for {C.MAIN_JOB_MINUTES:g} minutes.")
    a = p.add_argument
    a("--data", help=f"a UTF-8 text file, or a built-in corpus: {', '.join(C.BUILTIN_CORPORA)} "
                     f"(default {d.data})")
    a("--out", help="checkpoint directory (default: a new folder under runs/)")
    a("--tokenizer", choices=C.TOKENIZERS, help=f"default {d.tokenizer}")
    a("--hidden-size", type=int, help=f"default {d.hidden_size}")
    a("--embed-size", type=int, help="default: the hidden size")
    a("--num-layers", type=int, help=f"default {d.num_layers}")
    a("--dropout", type=float, help=f"between LSTM layers, default {C.DEFAULT_DROPOUT} with 2 or more "
                                    "layers, 0 with one")
    a("--seq-len", type=int, help=f"BPTT length T, default {d.seq_len}")
    a("--batch-size", type=int, help=f"parallel streams B, default {d.batch_size}")
    a("--val-frac", type=float, help=f"held-out tail for validation, default {d.val_frac}")
    a("--sample-every", type=int, help=f"print a sample every N steps (0 = only the final one), "
                                       f"default {d.sample_every}")
    a("--sample-length", type=int, help=f"tokens per printed sample, default {d.sample_length}")
    a("--sample-temperature", type=float, help=f"default {d.sample_temperature}")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its hyperparameters are "
                                                       "kept); --out defaults to DIR")
    start.add_argument("--init-from", metavar="DIR", help="start from the weights and vocabulary of the run in DIR "
                                                          "(its best state) and train on --data as a new run: "
                                                          "the model's shape and tokenizer are the checkpoint's, "
                                                          "and a text with symbols outside its vocabulary is refused")
    add_run_flags(p, d, C.MAIN_JOB_MINUTES)
    return p


def _add_which(p):
    p.add_argument("--last", dest="which", action="store_const", const="last", default="best",
                   help="use the run's last state (default: its best by validation, or the last when the "
                        "run has no validation)")


def _add_sample(sub):
    p = sub.add_parser("sample", help="generate text from a checkpoint")
    a = p.add_argument
    a("ckpt", metavar="CKPT", help="a checkpoint directory (a run's --out)")
    _add_which(p)
    a("-n", "--num-samples", type=_positive_int, default=C.NUM_SAMPLES,
      help=f"how many samples, separated by a line '-----', default {C.NUM_SAMPLES}")
    a("--out", metavar="FILE", help="write the samples to FILE (a new file) instead of standard output")
    a("--length", type=int, default=C.SAMPLE_LENGTH, help=f"tokens to generate, default {C.SAMPLE_LENGTH}")
    a("--temperature", type=float, default=C.SAMPLE_TEMPERATURE, help=f"default {C.SAMPLE_TEMPERATURE}")
    a("--top-k", type=int, default=C.SAMPLE_TOP_K, help="keep the k most likely tokens (0 = off)")
    a("--top-p", type=float, default=C.SAMPLE_TOP_P, help="nucleus sampling threshold (1 = off)")
    a("--greedy", action="store_true", help="always take the most likely token")
    a("--prime", default="", help="text to start from")
    a("--seed", type=int, default=None, help="random seed (the same seed gives the same text)")
    return p


def _add_eval(sub):
    p = sub.add_parser("eval", help="score a text with a checkpoint")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint directory")
    _add_which(p)
    p.add_argument("--data", required=True, help="a UTF-8 text file or a built-in corpus name")
    p.add_argument("--unknown", choices=C.UNKNOWN_MODES, default="skip",
                   help="symbols the model's vocabulary lacks: skip (leave them out and count them; words "
                        "become <unk>) or error, default skip")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def build_parser():
    p = Parser(prog="lstmkit", description="LSTM language models in NumPy: train, sample, eval.")
    p.add_argument("--version", action="version", version=f"lstmkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval,classify,gradient-flow,visualize}")
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    sub.add_parser("classify", help="sequence classification: train, eval, predict (see lstmkit classify -h)",
                   add_help=False)
    sub.add_parser("gradient-flow", help="the gradient-flow lesson (see lstmkit gradient-flow -h)", add_help=False)
    sub.add_parser("visualize", help="look inside a trained LSTM (see lstmkit visualize -h)", add_help=False)
    return p


def _default_out(data: str) -> str:
    base = os.path.splitext(os.path.basename(data))[0] or "run"
    stem = os.path.join("runs", f"{base}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, i = stem, 1
    while os.path.exists(out):
        i += 1
        out = f"{stem}-{i}"
    return out


def config_overrides(args, cls) -> dict:
    """{field: value} of the config fields the command line gave (None = not given)."""
    overrides = {f: getattr(args, f) for f in cls.__dataclass_fields__ if getattr(args, f, None) is not None}
    if "lr_decay" in overrides and "lr_schedule" not in overrides:
        overrides["lr_schedule"] = "step"       # --lr-decay alone asks for the step schedule
    return overrides


def run_trainer(trainer, err) -> int:
    """Run a trainer; the exit status: 0 done, 1 stopped by the NaN guard, 128 + signal when stopped,
    2 when under MPI another rank's set-up failed (that rank has said why)."""
    from .distributed import RanksDiffer, report_collective
    from .trainer import TrainingStopped
    try:
        result = trainer.run()
    except (TrainingStopped, RanksDiffer) as e:      # raised alike on every rank: said once
        return report_collective(err, f"lstmkit: error: {e}", 1)
    if result["status"] == "failed elsewhere":
        return EXIT_USAGE
    if result["status"] == "interrupted":
        return 128 + int(result["signal"])
    return 0


def cmd_train(args, out, err) -> int:
    from .train import Trainer
    overrides = config_overrides(args, C.TrainConfig)
    if args.resume is not None:
        cfg = C.TrainConfig()
        out_dir = args.out or args.resume
    else:
        cfg = C.TrainConfig(**overrides)
        if cfg.embed_size == 0 and args.embed_size is not None:
            raise C.ConfigError("--embed-size must be an integer >= 1, got 0")
        out_dir = args.out or _default_out(cfg.data)
    trainer = Trainer(cfg, out_dir, resume=args.resume, init_from=args.init_from, overrides=overrides,
                      progress=not args.no_progress, out=out, err=err)
    return run_trainer(trainer, err)


SAMPLE_SEPARATOR = "-----"


def cmd_sample(args, out, err) -> int:
    import numpy as np

    from .checkpoint import atomic_write, load_checkpoint
    from .data import normalize_text
    from .sample import Sampler
    C.validate_sampling(args.length, args.temperature, args.top_k, args.top_p, args.seed)
    if args.out is not None and os.path.lexists(args.out):
        raise UsageError(f"--out {args.out!r} exists; choose a new file name (nothing is overwritten)")
    model, tok, _ = load_checkpoint(args.ckpt, which=args.which)
    rng = np.random.default_rng(args.seed)       # one stream of draws: sample 1 is the same for any -n
    sampler, prime = Sampler(model, tok), normalize_text(args.prime)
    if args.out is None:
        for i in range(args.num_samples):
            if i:
                out.write(f"{SAMPLE_SEPARATOR}\n")
            sampler.generate(args.length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             greedy=args.greedy, prime=prime, seed=rng, on_text=lambda s: (out.write(s), out.flush()))
            out.write("\n")
        return 0
    texts = [sampler.generate(args.length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              greedy=args.greedy, prime=prime, seed=rng) for _ in range(args.num_samples)]
    data = f"\n{SAMPLE_SEPARATOR}\n".join(texts).encode("utf-8") + b"\n"
    atomic_write(args.out, lambda f: f.write(data))
    err.write(f"lstmkit: wrote {args.num_samples} sample(s) to {args.out}\n")
    return 0


def cmd_eval(args, out, err) -> int:
    from .checkpoint import load_checkpoint
    from .data import read_text
    from .evaluate import score_text, unknown_text
    model, tok, _ = load_checkpoint(args.ckpt, which=args.which)
    text = read_text(args.data)
    res = score_text(model, tok, text, unknown=args.unknown)
    if args.json:
        out.write(json.dumps(res, ensure_ascii=False) + "\n")
        return 0
    score = (f"perplexity {res['perplexity']:.3f}" if "perplexity" in res else
             f"{res['bits_per_char']:.4f} bits/char")
    unknown = ""
    if res["unknown"]:
        what = "read as <unk>" if tok.kind == "word" else "skipped"
        unknown = f"; {res['unknown']} unknown token(s) {what}: {unknown_text(res['unknown_symbols'])}"
    out.write(f"{args.data}: {score} ({res['loss_nats']:.4f} nats/token, {res['tokens']} tokens{unknown})\n")
    return 0


def dispatch(parser, argv, handlers, out, err) -> int:
    """Parse argv and run its command's handler; any LMError or OSError becomes one line on stderr
    and exit status 2, Ctrl-C one line and 130: never a traceback."""
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:    # -h / --help / --version
            return int(e.code or 0)
        if args.command is None:
            parser.print_help(out)
            return 0
        return handlers[args.command](args, out, err)
    except C.LMError as e:
        return _fail(err, f"lstmkit: error: {e}")
    except OSError as e:   # e.g. no permission to write --out
        name = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        return _fail(err, f"lstmkit: error: {e.strerror or e}{name}")
    except KeyboardInterrupt:
        err.write("lstmkit: interrupted\n")
        return 130


def _fail(err, line) -> int:
    """Print an error line and give exit status 2; under MPI once per job (distributed.report_failure)."""
    if "lstmkit.distributed" not in sys.modules and not any(
            k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        err.write(line + "\n")          # the usual case, without importing NumPy for it
        return EXIT_USAGE
    from .distributed import report_failure
    return report_failure(err, line, EXIT_USAGE)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out, err = sys.stdout, sys.stderr
    if argv and argv[0] == "gradient-flow":
        from .gradient_flow import main as gf_main
        return gf_main(argv[1:])
    if argv and argv[0] == "visualize":
        from .visualize import main as vis_main
        return vis_main(argv[1:])
    if argv and argv[0] == "classify":
        from .classify import main as classify_main
        return classify_main(argv[1:], out, err)
    return dispatch(build_parser(), argv, {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval}, out, err)


if __name__ == "__main__":
    sys.exit(main())
