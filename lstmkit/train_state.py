"""The training state a checkpoint carries besides the weights (state.json, carry.safetensors), and
the checks every value passes before a resumed run uses it.

A checkpoint may come from anywhere (users download and share run folders), so nothing in it is
believed: a step of -5 or inf, an elapsed time of NaN (that would train forever under --minutes), a
first loss of NaN (that would switch the explosion check off), a data position outside the text, a
carried state of the wrong shape, dtype or with non-finite values, or an optimizer step count below
zero is a CheckpointError naming the value, never a traceback or a run that misbehaves.

state.json:
    step            int >= 0            optimizer steps done
    data_position   {"epoch": int >= 0, "chunk": 0 <= int <= K}   where the stream continues (data.py)
    rng             {"dropout": NumPy PCG64 state}
    history         {"step": [...], "loss": [...], "val_step": [...], and the validation scores under
                    the trainer's key ("val_bpc" for the LM)}: numbers, the pairs of equal length
    elapsed_s       finite float >= 0   training time so far (counts towards --minutes)
    first_loss      None or finite > 0  the first step's loss (the explosion check's reference)
    optimizer       {"name", "t": int >= 0, "lr"}   (optim.Optimizer.state_meta)
carry.safetensors:  h, c  (L, B, H) each, the model's dtype, finite

Shape letters: L layers, B batch size, H hidden size, K chunks per epoch.
"""

from __future__ import annotations

import math

import numpy as np

from .checkpoint import CheckpointError


def _int(v, what, low=0, high=None):
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        bound = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{what} must be {bound}, got {v!r}")
    return v


def _finite(v, what, low=0.0, allow_none=False, positive=False):
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low
    if not ok or (positive and v <= 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else f'>= {low:g}'}, got {v!r}")
    return float(v)


def _history(h, val_key):
    if not isinstance(h, dict):
        raise ValueError(f"history must be a dict of lists, got {type(h).__name__}")
    for pair in (("step", "loss"), ("val_step", val_key)):
        cols = [h.get(k) for k in pair]
        if not all(isinstance(c, list) for c in cols) or len(cols[0]) != len(cols[1]):
            raise ValueError(f"history {pair[0]!r} and {pair[1]!r} must be lists of equal length")
        for k, col in zip(pair, cols):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in col):
                raise ValueError(f"history {k!r} must hold numbers only")
    return h


def check_training_state(st, chunks_per_epoch, where, val_key="val_bpc") -> dict:
    """The checked values of state.json: {"step", "epoch", "chunk", "history", "elapsed_s",
    "first_loss", "rng", "optimizer"}; raises CheckpointError naming the first bad value."""
    try:
        if not isinstance(st, dict):
            raise ValueError(f"state.json must hold an object, got {type(st).__name__}")
        pos = st["data_position"]
        if not isinstance(pos, dict):
            raise ValueError(f"data_position must be an object, got {pos!r}")
        meta = st["optimizer"]
        if not isinstance(meta, dict):
            raise ValueError(f"optimizer must be an object, got {meta!r}")
        _int(meta.get("t"), "optimizer t")
        rng = st["rng"]
        if not isinstance(rng, dict) or not isinstance(rng.get("dropout"), dict):
            raise ValueError("rng.dropout must be a NumPy bit generator state")
        return {"step": _int(st["step"], "step"),
                "epoch": _int(pos.get("epoch"), "data_position.epoch"),
                "chunk": _int(pos.get("chunk"), "data_position.chunk", 0, chunks_per_epoch),
                "history": _history(st["history"], val_key),
                "elapsed_s": _finite(st["elapsed_s"], "elapsed_s"),
                "first_loss": _finite(st["first_loss"], "first_loss", allow_none=True, positive=True),
                "rng": rng["dropout"], "optimizer": meta}
    except KeyError as e:
        raise CheckpointError(f"checkpoint {where!r} is corrupt: state.json lacks {e}") from None
    except ValueError as e:
        raise CheckpointError(f"checkpoint {where!r} is corrupt: state.json: {e}") from None


def check_carry(carry, shape, dtype, where) -> tuple:
    """h and c as the model carries them: (L, B, H) each, its dtype, finite."""
    for name, a in zip("hc", carry):
        if a.shape != shape or a.dtype != dtype:
            raise CheckpointError(f"checkpoint {where!r} is corrupt: carried {name} is {a.dtype}{a.shape}, "
                                  f"expected {np.dtype(dtype)}{shape}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {where!r} is corrupt: carried {name} holds non-finite values")
    return tuple(np.array(a) for a in carry)
