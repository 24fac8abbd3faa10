"""Every default of the language-model tool in one visible place, and the checks on its values.

`lstmkit train` with no arguments is the main job: a character-level LSTM on the built-in 무정 for
MAIN_JOB_MINUTES minutes on a 2-core machine.  The model defaults below were chosen by measuring
(benchmarks/lm_defaults.py, BENCHMARKS.md): 무정 has ~1,700 distinct characters, so the output
softmax (N x H x V multiply-adds forward, twice that backward) costs about as much as the LSTM
itself.  A 1x256 LSTM trains at ~18k tokens/s on an idle 2-core machine (1x512: ~7k), but the
novel is only 325k characters: 1x256 passes its best validation (3.82 bits/char) after ~2.5 minutes
and then overfits (3.97 at 8 minutes).  2x256 with dropout 0.3 between the layers trains at ~12k
tokens/s and was still improving at 8 minutes (3.77 bits/char), so it is the default; its samples
have the novel's names (형식, 영채, 선형), quoted dialogue and sentence endings.

Shape letters used across the language-model files:
    V vocabulary size, E embedding size, H hidden size, L num_layers,
    T sequence length (truncated-BPTT chunk), B batch size (parallel streams), N = T * B.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

FORMAT_VERSION = 1          # checkpoint layout version; bumped on any incompatible change
MAIN_JOB_MINUTES = 8.0      # time budget of `lstmkit train` when no --steps/--epochs/--minutes is given

TOKENIZERS = ("char", "jamo", "word")
OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam")
CLIP_MODES = ("norm", "value")
LR_SCHEDULES = ("constant", "step", "cosine")
UNKNOWN_MODES = ("skip", "error")
BUILTIN_CORPORA = {"mujeong": "mujeong.txt.gz", "shakespeare": "tinyshakespeare.txt.gz"}

# Learning rate used when --lr is not given, per optimizer.  Adagrad's 0.1 is the original 무정
# experiment's; the others are the usual values for character-level LSTMs.
DEFAULT_DROPOUT = 0.3      # between layers, when --dropout is not given and there are 2+ layers

DEFAULT_LR = {"sgd": 1.0, "adagrad": 0.1, "rmsprop": 2e-3, "adam": 3e-3}


@dataclass
class RunConfig:
    """What every training run has, the language model's and the classifier's: the optimizer, its
    schedule, clipping, the budget, validation and the seed (stored as JSON in every checkpoint)."""

    optimizer: str = "adam"
    lr: float = 0.0                 # 0 = DEFAULT_LR[optimizer]
    momentum: float = 0.9           # SGD only
    beta1: float = 0.9              # Adam's betas (torch.optim.Adam's defaults)
    beta2: float = 0.999
    weight_decay: float = 0.0       # on weight matrices and the embedding, not biases; Adam becomes AdamW
    lr_schedule: str = "constant"   # "step": lr * lr_decay^(step // lr_decay_every); "cosine": down to min_lr
    lr_decay: float = 1.0           # the "step" schedule's factor
    lr_decay_every: int = 1000
    warmup_steps: int = 0           # linear warm-up from lr/warmup_steps to lr, before any schedule
    min_lr: float = 0.0             # where "cosine" ends (0 = lr / 10, as nanoGPT)
    grad_clip: float = 5.0          # 0 = no clipping
    clip_mode: str = "norm"         # "norm": rescale so the global L2 norm <= grad_clip; "value": elementwise
    steps: int = 0                  # the run's budget, in total over resumes: optimizer steps (0 = no limit)
    epochs: float = 0.0             # ... or passes over the training data
    minutes: float = 0.0            # ... or minutes of training time (a resume's flags add to these)
    val_frac: float = 0.05          # held-out share of the training data used for validation
    eval_every: int = 100           # validate (and checkpoint) every N steps
    seed: int = 1234

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "lr_schedule" not in d and d.get("lr_decay", 1.0) != 1.0:   # saved before schedules had names
            d["lr_schedule"] = "step"
        return cls(**d)

    @classmethod
    def check_types(cls, d) -> None:
        """Raise TypeError unless d is a dict whose known keys have the types of the defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict of hyperparameters, got {type(d).__name__}")
        defaults = cls()        # resolved defaults: a None default (dropout) has its real type here
        for f in fields(cls):
            if f.name in d:
                v, default = d[f.name], getattr(defaults, f.name)
                ok = (isinstance(v, (int, float)) if isinstance(default, float) else isinstance(v, type(default)))
                if not ok or isinstance(v, bool) != isinstance(default, bool):
                    raise TypeError(f"{f.name} is {v!r}, expected {type(default).__name__}")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr > 0 else DEFAULT_LR[self.optimizer]

    @property
    def effective_min_lr(self) -> float:
        return self.min_lr if self.min_lr > 0 else self.effective_lr / 10


@dataclass
class TrainConfig(RunConfig):
    """Hyperparameters of one language-model run (`lstmkit train`)."""

    data: str = "mujeong"           # a file path, or "mujeong" / "shakespeare" (built in)
    tokenizer: str = "char"
    embed_size: int = 0             # 0 = same as hidden_size
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float | None = None    # between LSTM layers (torch.nn.LSTM's meaning); None = DEFAULT_DROPOUT
                                    # with 2 or more layers, 0 with one (where it would do nothing)
    seq_len: int = 64               # T: steps of backpropagation through time per chunk
    batch_size: int = 32            # B: parallel contiguous streams
    sample_every: int = 500         # print a sample every N steps (0 = only at the end)
    sample_length: int = 300
    sample_temperature: float = 0.8

    def __post_init__(self):
        if self.dropout is None:
            self.dropout = DEFAULT_DROPOUT if self.num_layers >= 2 else 0.0


CELLS = ("lstm", "gru", "rnn")
POOLS = ("last", "max", "mean")
CLASSIFY_MINUTES = 10.0     # budget of `lstmkit classify train` when no --steps/--epochs/--minutes is given


@dataclass
class ClassifyConfig(RunConfig):
    """Hyperparameters of one classifier run (`lstmkit classify train`). The defaults are the
    built-in reviews' recipe (BENCHMARKS.md, "Sequence classification"): a bidirectional LSTM over
    characters, max-pooled, trained for CLASSIFY_MINUTES."""

    data: str = "nsmc"              # a .tsv/.csv file with a header, or "nsmc" (built in)
    val_data: str = ""              # a labelled file to validate on; "" = hold out val_frac of --data
    text_column: str = ""           # "" = "document" if the file has it, else "text"
    label_column: str = "label"
    tokenizer: str = "char"
    min_count: int = 2              # symbols seen fewer times become the unknown symbol
    max_len: int = 512              # longer texts keep their first max_len tokens
    cell: str = "lstm"
    embed_size: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.0            # on the pooled features, and between layers when there are 2+
    pool: str = "max"
    batch_size: int = 128
    lr: float = 2e-3
    val_frac: float = 0.02
    eval_every: int = 200
    show: int = 5                   # validation reviews printed with their predicted label at the end


# `lstmkit sample` defaults
SAMPLE_LENGTH = 500
SAMPLE_TEMPERATURE = TrainConfig.sample_temperature     # the same as the samples printed in training
NUM_SAMPLES = 1
SAMPLE_TOP_K = 0            # 0 = off
SAMPLE_TOP_P = 1.0          # 1.0 = off

EVAL_SEQ_LEN = 512          # tokens per forward call when scoring a text as one stream (any value
                            # gives the same number: the state is carried; longer calls are faster)
EXPLODE_FACTOR = 3.0        # stop when the training loss exceeds this times the first step's loss


class LMError(Exception):
    """A problem with the user's input (data, arguments, checkpoint): reported as one line, no traceback."""


class ConfigError(LMError, ValueError):
    """A hyperparameter out of range."""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _model_checks(cfg) -> list:
    return [
        (cfg.tokenizer in TOKENIZERS, "--tokenizer", f"one of {', '.join(TOKENIZERS)}", cfg.tokenizer),
        (cfg.hidden_size >= 1, "--hidden-size", "an integer >= 1", cfg.hidden_size),
        (cfg.embed_size >= 0, "--embed-size", "an integer >= 0", cfg.embed_size),
        (cfg.num_layers >= 1, "--num-layers", "an integer >= 1", cfg.num_layers),
        (_finite(cfg.dropout) and 0.0 <= cfg.dropout < 1.0, "--dropout", "a number in [0, 1)", cfg.dropout),
        (cfg.batch_size >= 1, "--batch-size", "an integer >= 1", cfg.batch_size),
    ]


def _run_checks(cfg: RunConfig) -> list:
    return [
        (cfg.optimizer in OPTIMIZERS, "--optimizer", f"one of {', '.join(OPTIMIZERS)}", cfg.optimizer),
        (cfg.clip_mode in CLIP_MODES, "--clip-mode", f"one of {', '.join(CLIP_MODES)}", cfg.clip_mode),
        (_finite(cfg.lr) and cfg.lr >= 0.0, "--lr", "a number > 0", cfg.lr),
        (_finite(cfg.momentum) and 0.0 <= cfg.momentum < 1.0, "--momentum", "a number in [0, 1)", cfg.momentum),
        (cfg.lr_schedule in LR_SCHEDULES, "--lr-schedule", f"one of {', '.join(LR_SCHEDULES)}", cfg.lr_schedule),
        (_finite(cfg.lr_decay) and 0.0 < cfg.lr_decay <= 1.0, "--lr-decay", "a number in (0, 1]", cfg.lr_decay),
        (_finite(cfg.beta1) and 0.0 <= cfg.beta1 < 1.0, "--beta1", "a number in [0, 1)", cfg.beta1),
        (_finite(cfg.beta2) and 0.0 <= cfg.beta2 < 1.0, "--beta2", "a number in [0, 1)", cfg.beta2),
        (_finite(cfg.weight_decay) and cfg.weight_decay >= 0.0, "--weight-decay", "a number >= 0",
         cfg.weight_decay),
        (cfg.warmup_steps >= 0, "--warmup-steps", "an integer >= 0", cfg.warmup_steps),
        (_finite(cfg.min_lr) and cfg.min_lr >= 0.0, "--min-lr", "a number >= 0", cfg.min_lr),
        (cfg.lr_decay_every >= 1, "--lr-decay-every", "an integer >= 1", cfg.lr_decay_every),
        (_finite(cfg.grad_clip) and cfg.grad_clip >= 0.0, "--grad-clip", "a number >= 0", cfg.grad_clip),
        (cfg.steps >= 0, "--steps", "an integer >= 1", cfg.steps),
        (_finite(cfg.epochs) and cfg.epochs >= 0.0, "--epochs", "a number > 0", cfg.epochs),
        (_finite(cfg.minutes) and cfg.minutes >= 0.0, "--minutes", "a number > 0", cfg.minutes),
        (_finite(cfg.val_frac) and 0.0 <= cfg.val_frac < 0.5, "--val-frac", "a number in [0, 0.5)", cfg.val_frac),
        (cfg.eval_every >= 1, "--eval-every", "an integer >= 1", cfg.eval_every),
        (0 <= cfg.seed < 2**63, "--seed", "an integer in [0, 2**63)", cfg.seed),
    ]


def _check(checks) -> None:
    for ok, flag, expected, given in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {expected}, got {given!r}")


def _check_schedule(cfg: RunConfig) -> None:
    if cfg.lr_decay != 1.0 and cfg.lr_schedule != "step":
        raise ConfigError(f"--lr-decay {cfg.lr_decay:g} needs --lr-schedule step (it is {cfg.lr_schedule})")
    if cfg.lr_schedule == "cosine" and cfg.effective_min_lr > cfg.effective_lr:
        raise ConfigError(f"--min-lr must be at most the learning rate {cfg.effective_lr:g}, got {cfg.min_lr:g}")


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first out-of-range hyperparameter (as its command-line flag)."""
    _check(_model_checks(cfg) + [
        (cfg.seq_len >= 1, "--seq-len", "an integer >= 1", cfg.seq_len),
        (cfg.sample_every >= 0, "--sample-every", "an integer >= 0", cfg.sample_every),
        (cfg.sample_length >= 0, "--sample-length", "an integer >= 0", cfg.sample_length),
        (_finite(cfg.sample_temperature) and cfg.sample_temperature > 0, "--sample-temperature",
         "a number > 0", cfg.sample_temperature),
    ] + _run_checks(cfg))
    _check_schedule(cfg)
    if cfg.dropout > 0 and cfg.num_layers < 2:
        raise ConfigError(f"--dropout {cfg.dropout:g} needs --num-layers >= 2: dropout acts between LSTM layers "
                          f"(as in torch.nn.LSTM), and --num-layers is {cfg.num_layers}")


def validate_classify(cfg: ClassifyConfig) -> None:
    """validate()'s counterpart for `lstmkit classify train`."""
    _check(_model_checks(cfg) + [
        (cfg.cell in CELLS, "--cell", f"one of {', '.join(CELLS)}", cfg.cell),
        (cfg.pool in POOLS, "--pool", f"one of {', '.join(POOLS)}", cfg.pool),
        (cfg.min_count >= 1, "--min-count", "an integer >= 1", cfg.min_count),
        (cfg.max_len >= 1, "--max-len", "an integer >= 1", cfg.max_len),
        (cfg.show >= 0, "--show", "an integer >= 0", cfg.show),
    ] + _run_checks(cfg))
    _check_schedule(cfg)


def validate_sampling(length: int, temperature: float, top_k: int, top_p: float, seed: int | None = None) -> None:
    if length < 0:
        raise ConfigError(f"--length must be an integer >= 0, got {length}")
    if not (_finite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be a number > 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be an integer >= 0 (0 = off), got {top_k}")
    if not (_finite(top_p) and 0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p must be a number in (0, 1], got {top_p}")
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed}")
