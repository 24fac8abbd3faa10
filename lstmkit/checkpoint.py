"""Checkpoints: safetensors for arrays, JSON for everything else; nothing pickled; atomic writes;
nothing read is believed before it is checked (run_files.py).

A checkpoint is a run directory (the trainer's --out):

    RUN/checkpoint.json            the pointer: {"format", "format_version", "run_id", "step",
                                   "current": "step-...", and once a state was saved with best=True
                                   "best": "step-...", "best_step": int, "best_val": float}
    RUN/step-00000500-<id>/        a complete state, named by the pointer:
        lstm.safetensors           the LSTM's tensors under torch.nn.LSTM.state_dict()'s own keys
                                   ("weight_ih_l0", "bias_hh_l1", ...): torch loads them directly,
                                   torch.nn.LSTM(E, H, L).load_state_dict(safetensors.torch.load_file(p))
        model.safetensors          "embedding.weight" (V, E), "decoder.weight" (V, H), "decoder.bias" (V,)
                                   (torch.nn.Embedding / torch.nn.Linear keys)
        config.json                format version, model shape, training hyperparameters, data identity
        vocab.json                 {"kind": "char"|"jamo"|"word", "vocab": [sorted tokens]}
        optimizer.safetensors      optimizer slots ("exp_avg.lstm.weight_ih_l0", ...)   [training only]
        carry.safetensors          h and c carried between chunks, (L, B, H) each       [training only]
        state.json                 step, data position, RNG states, optimizer step, loss history
    RUN/loss.png                   the loss curve
    RUN/.lock                      while a process writes the run (run_files.run_lock)

Atomicity: a new state is written into a temporary folder (each file fsync'ed, then the folder),
which is renamed into place and the run directory fsync'ed; only then is checkpoint.json replaced
(atomic_write: fsync'ed temporary, os.replace, folder fsync'ed) to point at it, and only after that
are older states removed.  A crash or power cut at any moment leaves checkpoint.json naming a
complete state.  Which states stay: the new one, the one the pointer named before (a reader that
resolved the old pointer a moment ago still finds its files) and the best one; older ones go.

One writer: save_checkpoint holds RUN/.lock while it writes, and a trainer holds it for its whole run.

Reading trusts nothing: the pointer may name only a step-* folder directly inside the run (not a
symlink); every file must be a regular file within a size bound; config.json's model sizes must be
within MODEL_LIMITS and agree with the safetensors headers before the model is allocated; arrays must
be float32 or float64 (the model's dtype, config "dtype", float32 by default) and finite; vocab.json
is checked by tokenizers.tokenizer_from_dict.  Every failure is one CheckpointError.

Python:
    model, tokenizer, config = load_checkpoint("runs/mujeong")   # model: lstmkit.model.LanguageModel
    model, tokenizer, config = load_checkpoint("runs/mujeong", which="best")   # best validation
    model.lstm                                  # the lstmkit.LSTM
    logits, (h, c), cache = model.forward(ids)  # ids (T, B); cache["lstm"][layer][0]["gates"|"c"]

Shape letters: V vocabulary, E embedding size, H hidden size, L layers, B batch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid

import numpy as np
from safetensors.numpy import save as save_st

from .config import FORMAT_VERSION
from .model import LanguageModel
from .run_files import (JSON_LIMIT, LOCK, MODE_DIR, MODE_FILE, SMALL_JSON_LIMIT, CheckpointError,  # noqa: F401
                        MissingFile, _write_synced, atomic_write, check_output, fsync_dir, read_json,
                        read_safetensors, run_lock)
from .tokenizers import tokenizer_from_dict

__all__ = ["CheckpointError", "POINTER", "atomic_write", "check_output", "checkpoint_info", "fsync_dir",
           "load_checkpoint", "nonfinite_parameters", "read_checkpoint", "read_pointer", "resolve", "run_lock",
           "run_state", "save_checkpoint"]

FORMAT = LanguageModel.FORMAT          # "lstmkit-language-model"; a classifier's is "lstmkit-classifier"
POINTER = "checkpoint.json"
# the only names in a run directory that save_checkpoint ever removes: its own state folders and the
# temporaries of its own interrupted writes (tempfile's 8 random characters after ".tmp-")
STATE_NAME = re.compile(r"step-\d{8}-[0-9a-f]{6}")
TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}(\.json|\.png)?")
# model sizes a checkpoint may claim; far above what lstmkit trains, low enough that a claim is refused
# before it becomes an allocation (the arrays must also match, and they are bounded by TENSOR_LIMIT)
MODEL_LIMITS = {"vocab_size": 1 << 22, "embed_size": 1 << 16, "hidden_size": 1 << 16, "num_layers": 256,
                "num_classes": 1 << 16}
MODEL_DTYPES = ("float32", "float64")


def model_kinds() -> dict:
    """format name -> model class: what a checkpoint can hold. Each class gives FORMAT, ARRAY_FILES
    ({file: key prefix}), checkpoint_arrays(), expected_shapes(cfg) ({file: {key: shape}}),
    check_config(cfg) (ValueError for a bad value), from_config(cfg) and load_params(arrays)."""
    from .classifier import SequenceClassifier
    return {LanguageModel.FORMAT: LanguageModel, SequenceClassifier.FORMAT: SequenceClassifier}
READ_ATTEMPTS = 20          # a state replaced while being read is read again from the new pointer (a busy
                            # machine can let a writer save several times during one read)


# ---- writing ---------------------------------------------------------------------------------

def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")


def _write_json(path, obj):
    data = _json_bytes(obj)
    _write_synced(path, lambda f: f.write(data))


def atomic_write_json(path, obj):
    """Write JSON to path through atomic_write (readers see old or new, never half)."""
    data = _json_bytes(obj)
    atomic_write(path, lambda f: f.write(data))


def _save_st(path, arrays):
    data = save_st({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    _write_synced(path, lambda f: f.write(data))


# ---- the pointer -------------------------------------------------------------------------------

def _check_pointer(d: dict, p) -> dict:
    """The pointer's names are the only paths a checkpoint chooses: each must be a step-* folder name."""
    for key in ("current", "best"):
        name = d.get(key)
        if (key == "current" or name is not None) and not (isinstance(name, str) and STATE_NAME.fullmatch(name)):
            raise CheckpointError(f"{p!r} is corrupt: {key!r} is {name!r}; expected the name of a step-* "
                                  f"folder of this run (step-NNNNNNNN-xxxxxx)")
    for key in ("step", "best_step"):
        v = d.get(key)
        if (key == "step" or "best" in d) and not (type(v) is int and v >= 0):
            raise CheckpointError(f"{p!r} is corrupt: {key!r} is {v!r}; expected an integer >= 0")
    v = d.get("best_val")
    if v is not None and not (type(v) in (int, float) and math.isfinite(v)):
        raise CheckpointError(f"{p!r} is corrupt: 'best_val' is {v!r}; expected a finite number or null")
    return d


def read_pointer(run_dir) -> dict | None:
    """checkpoint.json of a run directory, checked, or None when there is none."""
    try:
        d = read_json(run_dir, POINTER, SMALL_JSON_LIMIT)
    except MissingFile:
        return None
    p = os.path.join(run_dir, POINTER)
    if not isinstance(d, dict) or d.get("format") not in model_kinds():
        raise CheckpointError(f"{p!r} is not an lstmkit checkpoint")
    if d.get("format_version") != FORMAT_VERSION:       # before its fields, which another version may change
        raise CheckpointError(f"checkpoint {run_dir!r} has format version {d.get('format_version')!r}; "
                              f"this lstmkit reads version {FORMAT_VERSION}")
    return _check_pointer(d, p)


def _state_dir(run_dir, name):
    """run_dir/name if it is a real folder directly in run_dir (lstat: a symlink is not followed), else None."""
    try:
        st = os.lstat(os.path.join(run_dir, name))
    except OSError:
        return None
    return os.path.join(run_dir, name) if stat.S_ISDIR(st.st_mode) else None


def run_state(run_dir) -> str:
    """What a trainer's --out holds, for deciding whether it may write there:
        "run"      checkpoint.json names an existing state (resume it, or refuse it if another run's);
        "empty"    nothing, or only what lstmkit's own writes leave: .lock, .tmp-* temporaries, step-*
                   folders, and with a checkpoint.json that names no existing state, that pointer and
                   loss.png.  A run whose first save was interrupted is "empty": train into it again
                   (save_checkpoint then removes the leftovers);
        "foreign"  anything else (not a folder, or holding files of the user's): never written into.
    A checkpoint.json that cannot be read raises CheckpointError."""
    if not os.path.lexists(run_dir):
        return "empty"
    if not os.path.isdir(run_dir):
        return "foreign"
    ptr = read_pointer(run_dir)
    if ptr is not None and _state_dir(run_dir, ptr["current"]):
        return "run"
    ours = {LOCK} | ({POINTER, "loss.png"} if ptr is not None else set())
    for entry in os.listdir(run_dir):
        if not (entry in ours or TEMP_NAME.fullmatch(entry)
                or (STATE_NAME.fullmatch(entry) and _state_dir(run_dir, entry))):
            return "foreign"
    return "empty"


def checkpoint_info(path) -> dict:
    """{"step", "current", "best", "best_step", "best_val"} of a run's pointer (best* None until a state
    was saved with best=True)."""
    ptr = read_pointer(path) if os.path.isdir(path) else None
    if ptr is None:
        raise CheckpointError(f"{path!r} is not an lstmkit run directory: it has no {POINTER}")
    return {"step": ptr["step"], "current": ptr["current"], "best": ptr.get("best"),
            "best_step": ptr.get("best_step"), "best_val": ptr.get("best_val")}


# ---- saving ------------------------------------------------------------------------------------

def _write_state(tmp, *, model, tokenizer, config, run_id, state, optimizer, carry):
    """The files of one state, each written and fsync'ed, into the temporary folder tmp."""
    for name, arrays in model.checkpoint_arrays().items():
        _save_st(os.path.join(tmp, name), arrays)
    _write_json(os.path.join(tmp, "config.json"),
                {"format": model.FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id,
                 "model": model.config(), **config})
    _write_json(os.path.join(tmp, "vocab.json"), tokenizer.to_dict())
    if optimizer is not None:
        arrays = optimizer.state_arrays()
        _save_st(os.path.join(tmp, "optimizer.safetensors"),
                 arrays if arrays else {"_empty": np.zeros(0, np.float32)})
    if carry is not None:
        _save_st(os.path.join(tmp, "carry.safetensors"), {"h": carry[0], "c": carry[1]})
    if state is not None:
        _write_json(os.path.join(tmp, "state.json"),
                    {**state, "optimizer": optimizer.state_meta() if optimizer is not None else None})
    for f in os.listdir(tmp):
        os.chmod(os.path.join(tmp, f), MODE_FILE)
    os.chmod(tmp, MODE_DIR)


def _new_pointer(run_dir, prev, name, run_id, step, best, val, fmt) -> dict:
    ptr = {"format": fmt, "format_version": FORMAT_VERSION, "run_id": run_id, "step": step, "current": name}
    if best:
        ptr.update(best=name, best_step=step, best_val=None if val is None else float(val))
    elif (prev is not None and prev.get("run_id") == run_id and prev.get("best")
          and _state_dir(run_dir, prev["best"])):
        ptr.update({k: prev[k] for k in ("best", "best_step", "best_val")})
    return ptr


def save_checkpoint(run_dir, *, model, tokenizer, config: dict, run_id: str, step: int,
                    state: dict | None = None, optimizer=None, carry=None, best: bool = False,
                    val: float | None = None) -> str:
    """Write a complete state into run_dir atomically, holding the run's lock; returns its folder.

    model: a LanguageModel or a SequenceClassifier (model_kinds());
    config: JSON-able dict (the trainer stores its TrainConfig and the data's identity in it);
    state: JSON-able training state; optimizer: an lstmkit.optim.Optimizer; carry: (h, c).
    best=True records this state as the run's best too, with val (its validation score) as best_val;
    otherwise the pointer keeps the best it had.  Raises CheckpointError if another process holds
    the run's lock."""
    with run_lock(run_dir):
        prev = read_pointer(run_dir)
        name = f"step-{step:08d}-{uuid.uuid4().hex[:6]}"
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=run_dir)
        try:
            _write_state(tmp, model=model, tokenizer=tokenizer, config=config, run_id=run_id, state=state,
                         optimizer=optimizer, carry=carry)
            fsync_dir(tmp)                  # the files' names are on disk before the folder is renamed
            final = os.path.join(run_dir, name)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(run_dir)                  # the complete state is on disk under its name ...
        ptr = _new_pointer(run_dir, prev, name, run_id, step, best, val, model.FORMAT)
        atomic_write_json(os.path.join(run_dir, POINTER), ptr)      # ... before the pointer names it
        # only now that the pointer is durable; the previous state stays for readers that resolved it
        _remove_stale(run_dir, keep={name, ptr.get("best"), prev and prev["current"]})
        return final


def _remove_stale(run_dir, keep):
    """Remove states not in keep and temporaries of interrupted writes: only names this module creates.
    Safe only under the run's lock: another writer's temporaries would be in-flight states."""
    keep = {keep} if isinstance(keep, str) else set(keep)
    for entry in os.listdir(run_dir):
        full = os.path.join(run_dir, entry)
        if entry in keep or os.path.islink(full):
            continue
        if STATE_NAME.fullmatch(entry) or TEMP_NAME.fullmatch(entry):
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            elif os.path.isfile(full) and TEMP_NAME.fullmatch(entry):
                try:
                    os.remove(full)
                except OSError:
                    pass


def nonfinite_parameters(params: dict) -> list:
    """Names of the arrays in params (e.g. model.params) holding NaN or infinity: [] when all are finite."""
    return [k for k, a in params.items() if not np.isfinite(a).all()]


# ---- reading -----------------------------------------------------------------------------------

def resolve(path, which: str = "last") -> str:
    """The state folder of a checkpoint: RUN (through checkpoint.json) or a step-* folder itself.
    which="best": the state saved with best=True; a run that has none yet gives its last state."""
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a directory (give the run directory)")
    ptr = read_pointer(path)
    if ptr is None:
        if os.path.lexists(os.path.join(path, "config.json")):
            return path
        if os.listdir(path) and run_state(path) == "empty":
            raise CheckpointError(f"checkpoint {path!r} holds no complete state: its first save did not "
                                  f"finish; train into it again (without --resume)")
        raise CheckpointError(f"{path!r} is not an lstmkit checkpoint: it has no {POINTER}")
    name = ptr.get("best") if which == "best" and ptr.get("best") else ptr["current"]
    d = _state_dir(path, name)
    if d is None:
        raise MissingFile(f"checkpoint {path!r} is incomplete: {name!r} is missing or not a folder")
    return d


def _model_config(cfg, kind, where) -> dict:
    """config.json's "model", every size checked against MODEL_LIMITS before anything is allocated."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: config.json has no \"model\" object")
    for key, limit in MODEL_LIMITS.items():
        if key not in kind.SIZES:
            continue
        v = cfg.get(key)
        low = 0 if key == "embed_size" else 1             # embed_size 0 means "same as hidden_size"
        if not (type(v) is int and low <= v <= limit):
            raise CheckpointError(f"{where}: config.json model {key} is {v!r}; expected an integer "
                                  f"in [{low}, {limit}]")
    d = cfg.get("dropout")
    if not (type(d) in (int, float) and 0 <= d <= 1):
        raise CheckpointError(f"{where}: config.json model dropout is {d!r}; expected a number in [0, 1]")
    if cfg.get("dtype", "float32") not in MODEL_DTYPES:
        raise CheckpointError(f"{where}: config.json model dtype is {cfg.get('dtype')!r}; "
                              f"expected one of {', '.join(MODEL_DTYPES)}")
    try:
        kind.check_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json model: {e}") from None
    return cfg


def _shape_check(where, name, expected: dict, dtype):
    """A read_safetensors check: the header must hold exactly the expected keys, shapes and dtype."""
    def check(header):
        missing = [k for k in expected if k not in header]          # in layer order: the first is telling
        extra = [k for k in header if k not in expected]
        if missing or extra:
            raise CheckpointError(f"{where}: {name} " + (f"lacks {', '.join(missing[:3])}" if missing else
                                                         f"has unexpected {', '.join(extra[:3])}")
                                  + " for the model config.json describes")
        for key, shape in expected.items():
            dt, given = header[key]
            if given != shape:
                raise CheckpointError(f"{where}: {name} {key} has shape {given}, config.json implies {shape}")
            if dt != np.dtype(dtype):
                raise CheckpointError(f"{where}: {name} {key} is {dt.name}; config.json's model is {dtype}")
    return check


def _read_config(path, d, where, want) -> dict:
    config = read_json(d, "config.json", SMALL_JSON_LIMIT)
    kinds = model_kinds()
    if not isinstance(config, dict) or config.get("format") not in kinds:
        raise CheckpointError(f"{where}: config.json is not an lstmkit config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version "
                              f"{config.get('format_version')!r}; this lstmkit reads version {FORMAT_VERSION}")
    if want is not None and config["format"] != want:
        what = {LanguageModel.FORMAT: "a language model (lstmkit sample/eval)"}.get(
            config["format"], "a classifier (lstmkit classify eval/predict)")
        raise CheckpointError(f"checkpoint {path!r} holds {what}, not a {want.split('-', 1)[1].replace('-', ' ')}")
    _model_config(config.get("model"), kinds[config["format"]], where)
    return config


def _read_model(d, config, tokenizer, where):
    """The model of a state folder; sizes agree with the arrays' headers before from_config allocates."""
    cfg = config["model"]
    kind = model_kinds()[config["format"]]
    if tokenizer.vocab_size != cfg["vocab_size"]:
        raise CheckpointError(f"{where}: vocab.json has {tokenizer.vocab_size} tokens, the model "
                              f"{cfg['vocab_size']}")
    dtype = cfg.get("dtype", "float32")
    arrays = {}
    for name, shapes in kind.expected_shapes(cfg).items():
        prefix = kind.ARRAY_FILES[name]
        arrays.update({prefix + k: v for k, v in read_safetensors(
            d, name, check=_shape_check(where, name, shapes, dtype)).items()})
    try:
        model = kind.from_config(cfg, seed=0)
        model.load_params(arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return model


def _read_training(d, config, where) -> dict:
    cfg = config["model"]
    state = read_json(d, "state.json", JSON_LIMIT)
    opt = read_safetensors(d, "optimizer.safetensors")
    opt.pop("_empty", None)
    out = {"state": state, "optimizer_arrays": opt}
    if config["format"] != LanguageModel.FORMAT:        # only the language model carries h and c
        return out
    carry = read_safetensors(d, "carry.safetensors")
    if set(carry) != {"h", "c"}:
        raise CheckpointError(f"{where}: carry.safetensors holds {sorted(carry)}, expected h and c")
    h, c = carry["h"], carry["c"]
    if not (h.shape == c.shape and h.ndim == 3 and h.shape[0] == cfg["num_layers"] and h.shape[2] ==
            cfg["hidden_size"]):
        raise CheckpointError(f"{where}: carry.safetensors h {h.shape} and c {c.shape} are not both "
                              f"(L={cfg['num_layers']}, B, H={cfg['hidden_size']})")
    out["carry"] = (h, c)
    return out


def _read_state(path, d, training, want) -> dict:
    where = f"checkpoint {path!r} is corrupt"
    config = _read_config(path, d, where, want)
    try:
        tokenizer = tokenizer_from_dict(read_json(d, "vocab.json", JSON_LIMIT))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: bad vocabulary in vocab.json ({e})") from None
    out = {"dir": d, "config": config, "model": _read_model(d, config, tokenizer, where), "tokenizer": tokenizer}
    if training:
        out.update(_read_training(d, config, where))
    return out


def read_checkpoint(path, training: bool = False, which: str = "last", format: str | None = FORMAT) -> dict:
    """Everything in a checkpoint, checked: {"dir", "config", "model", "tokenizer", and with
    training=True "state", "optimizer_arrays", and for a language model "carry"}.  which: "last"
    or "best" (see resolve).  format: the kind of model expected (a language model by default;
    None takes any).  Raises CheckpointError."""
    for attempt in range(READ_ATTEMPTS):
        d = None
        try:
            d = resolve(path, which)
            return _read_state(path, d, training, format)
        except MissingFile:
            # a writer replaced the state since it was found (it keeps the previous one, so that takes
            # two saves during one read): read the state the pointer names now, unless nothing moved
            if attempt == READ_ATTEMPTS - 1 or not _moved(path, which, d):
                raise
    raise AssertionError("unreachable")


def _moved(path, which, d) -> bool:
    try:
        return resolve(path, which) != d
    except CheckpointError:
        return False


def load_checkpoint(path, which: str = "last", format: str | None = FORMAT):
    """(model, tokenizer, config_dict) of a checkpoint (a run directory or one of its step-* folders).

    model is a lstmkit.model.LanguageModel (model.lstm is the lstmkit.LSTM), in eval mode.
    which="best": the state of the best validation (a run without one yet gives its last)."""
    ck = read_checkpoint(path, which=which, format=format)
    ck["model"].eval()
    return ck["model"], ck["tokenizer"], ck["config"]
