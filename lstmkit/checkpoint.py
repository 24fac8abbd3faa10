"""Checkpoints: safetensors for arrays, JSON for everything else; nothing pickled; atomic writes.

A checkpoint is a run directory (the trainer's --out):

    RUN/checkpoint.json            {"format", "format_version", "run_id", "step", "current": "step-..."}
    RUN/step-00000500-<id>/        the latest complete state, named by checkpoint.json:
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

Atomicity: a new state is written into a temporary folder (each file fsync'ed, then the folder),
which is renamed into place and the run directory fsync'ed; only then is checkpoint.json replaced
(atomic_write: fsync'ed temporary, os.replace, folder fsync'ed) to point at it, and only after that
are older states removed.  A crash or power cut at any moment leaves checkpoint.json naming a
complete state.

Python:
    model, tokenizer, config = load_checkpoint("runs/mujeong")   # model: lstmkit.model.LanguageModel
    model.lstm                                  # the lstmkit.LSTM
    logits, (h, c), cache = model.forward(ids)  # ids (T, B); cache["lstm"][layer][0]["gates"|"c"]

Shape letters: V vocabulary, E embedding size, H hidden size, L layers, B batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file
from safetensors.numpy import save as save_st

from .config import FORMAT_VERSION, LMError
from .model import LanguageModel
from .tokenizers import tokenizer_from_dict

FORMAT = "lstmkit-language-model"
POINTER = "checkpoint.json"
REQUIRED = ("lstm.safetensors", "model.safetensors", "config.json", "vocab.json")
TRAINING = ("optimizer.safetensors", "carry.safetensors", "state.json")
# the only names in a run directory that save_checkpoint ever removes: its own state folders and the
# temporaries of its own interrupted writes (tempfile's 8 random characters after ".tmp-")
STATE_NAME = re.compile(r"step-\d{8}-[0-9a-f]{6}")
TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}(\.json|\.png)?")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


MODE_DIR = 0o777 & ~_umask()
MODE_FILE = 0o666 & ~_umask()      # what open() would give; mkstemp's 0600 is changed to it


class CheckpointError(LMError, ValueError):
    """A checkpoint that is missing, incomplete, corrupt or of another version."""


# ---- writing ---------------------------------------------------------------------------------
# Durability: data reaches the disk only when fsync'ed, and a rename only when its folder is.

def fsync_dir(path) -> None:
    """fsync a folder, so that the names created, renamed or removed in it survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:         # a platform that cannot open folders (Windows): nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:         # some file systems do not support it on folders
        pass
    finally:
        os.close(fd)


def _write_synced(path, write_fn) -> None:
    """Create path, write_fn(binary file), flush and fsync it."""
    with open(path, "wb") as f:
        write_fn(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path, write_fn) -> None:
    """Replace path durably and atomically: write_fn(f) writes a temporary file (binary) in the same
    folder, which is flushed, fsync'ed and os.replace'd over path, and the folder is fsync'ed.
    Readers see the old file or the new one, never half; after a failure no temporary is left."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
    os.close(fd)
    try:
        os.chmod(tmp, MODE_FILE)
        _write_synced(tmp, write_fn)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")


def _write_json(path, obj):
    data = _json_bytes(obj)
    _write_synced(path, lambda f: f.write(data))


def check_output(path, signature: bytes, what: str) -> None:
    """Refuse an output file we may not replace: its folder must exist, and an existing file must
    start with signature (an earlier output of ours), so nothing else of the user's is overwritten."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise LMError(f"output folder {d!r} does not exist")
    if os.path.isdir(path):
        raise LMError(f"--out {path!r} is a directory; give a file name")
    if os.path.exists(path):
        with open(path, "rb") as f:
            head = f.read(4096)
        if signature not in head:
            raise LMError(f"refusing to overwrite {path!r}: it is not {what} (remove it or choose another --out)")


def atomic_write_json(path, obj):
    """Write JSON to path through atomic_write (readers see old or new, never half)."""
    data = _json_bytes(obj)
    atomic_write(path, lambda f: f.write(data))


def _save_st(path, arrays):
    data = save_st({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    _write_synced(path, lambda f: f.write(data))


def read_pointer(run_dir) -> dict | None:
    """checkpoint.json of a run directory, or None when there is none."""
    p = os.path.join(run_dir, POINTER)
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {run_dir!r} is corrupt: cannot read {POINTER} ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{p!r} is not an lstmkit checkpoint")
    return d


def save_checkpoint(run_dir, *, model: LanguageModel, tokenizer, config: dict, run_id: str, step: int,
                    state: dict | None = None, optimizer=None, carry=None) -> str:
    """Write a complete state into run_dir atomically; returns the path of the state folder.

    config: JSON-able dict (the trainer stores its TrainConfig and the data's identity in it);
    state: JSON-able training state; optimizer: an lstmkit.optim.Optimizer; carry: (h, c)."""
    os.makedirs(run_dir, exist_ok=True)
    name = f"step-{step:08d}-{uuid.uuid4().hex[:6]}"
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=run_dir)
    try:
        lstm_sd = model.lstm.state_dict()
        _save_st(os.path.join(tmp, "lstm.safetensors"), lstm_sd)
        _save_st(os.path.join(tmp, "model.safetensors"),
                 {k: v for k, v in model.params.items() if not k.startswith("lstm.")})
        _write_json(os.path.join(tmp, "config.json"),
                    {"format": FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id,
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
        fsync_dir(tmp)                  # the files' names are on disk before the folder is renamed
        final = os.path.join(run_dir, name)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(run_dir)                  # the complete state is on disk under its name ...
    atomic_write_json(os.path.join(run_dir, POINTER),      # ... before the pointer names it (fsync'ed too)
                      {"format": FORMAT, "format_version": FORMAT_VERSION, "run_id": run_id,
                       "step": step, "current": name})
    _remove_stale(run_dir, keep=name)   # only now that the pointer is durable
    return final


def _remove_stale(run_dir, keep):
    """Remove older states and temporaries of interrupted writes: only names this module creates."""
    for entry in os.listdir(run_dir):
        full = os.path.join(run_dir, entry)
        if entry == keep or os.path.islink(full):
            continue
        if STATE_NAME.fullmatch(entry) or TEMP_NAME.fullmatch(entry):
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            elif os.path.isfile(full) and TEMP_NAME.fullmatch(entry):
                try:
                    os.remove(full)
                except OSError:
                    pass


# ---- reading ---------------------------------------------------------------------------------

def resolve(path) -> str:
    """The state folder of a checkpoint: RUN (through checkpoint.json) or a step-* folder itself."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a directory (give the run directory)")
    ptr = read_pointer(path)
    if ptr is None:
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        raise CheckpointError(f"{path!r} is not an lstmkit checkpoint: it has no {POINTER}")
    if ptr.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {ptr.get('format_version')!r}; "
                              f"this lstmkit reads version {FORMAT_VERSION}")
    state_dir = os.path.join(path, str(ptr.get("current", "")))
    if not ptr.get("current") or not os.path.isdir(state_dir):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {ptr.get('current')!r} is missing")
    return state_dir


def _load_json(d, name):
    try:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d!r} is incomplete: {name} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d!r} is corrupt: cannot read {name} ({e})") from None


def _load_st(d, name):
    p = os.path.join(d, name)
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {d!r} is incomplete: {name} is missing")
    try:
        return load_file(p)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d!r} is corrupt: cannot read {name} ({e})") from None


def read_checkpoint(path, training: bool = False) -> dict:
    """Everything in a checkpoint, checked: {"dir", "config", "model", "tokenizer", and with
    training=True "state", "optimizer_arrays", "carry"}.  Raises CheckpointError."""
    d = resolve(path)
    config = _load_json(d, "config.json")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: config.json is not an lstmkit config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {config.get('format_version')!r}; "
                              f"this lstmkit reads version {FORMAT_VERSION}")
    try:
        tokenizer = tokenizer_from_dict(_load_json(d, "vocab.json"))
        model = LanguageModel.from_config(config["model"], seed=0)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: bad config or vocabulary ({e})") from None
    if tokenizer.vocab_size != model.vocab_size:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: vocab.json has {tokenizer.vocab_size} "
                              f"tokens, the model {model.vocab_size}")
    arrays = {"lstm." + k: v for k, v in _load_st(d, "lstm.safetensors").items()}
    arrays.update(_load_st(d, "model.safetensors"))
    try:
        model.load_params(arrays)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {e}") from None
    out = {"dir": d, "config": config, "model": model, "tokenizer": tokenizer}
    if training:
        out["state"] = _load_json(d, "state.json")
        opt = _load_st(d, "optimizer.safetensors")
        opt.pop("_empty", None)
        out["optimizer_arrays"] = opt
        carry = _load_st(d, "carry.safetensors")
        if set(carry) != {"h", "c"}:
            raise CheckpointError(f"checkpoint {path!r} is corrupt: carry.safetensors lacks h or c")
        out["carry"] = (carry["h"], carry["c"])
    return out


def load_checkpoint(path):
    """(model, tokenizer, config_dict) of a checkpoint (a run directory or one of its step-* folders).

    model is a lstmkit.model.LanguageModel (model.lstm is the lstmkit.LSTM), in eval mode."""
    ck = read_checkpoint(path)
    ck["model"].eval()
    return ck["model"], ck["tokenizer"], ck["config"]
