"""Runs that cannot hurt (issue 17, the trainer's side): the NaN guard keeps the last good state,
crafted training state is refused in one line, the output folder is checked before training, and
sampling at any temperature stays finite."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lstmkit.checkpoint import load_checkpoint, resolve
from lstmkit.cli import main

TEXT = "All the world's a stage, and all the men and women merely players.\n" * 12
SMALL = ["--hidden-size", "8", "--batch-size", "2", "--seq-len", "8", "--sample-length", "0", "--no-progress"]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT, encoding="utf-8")
    return str(p)


@pytest.fixture
def trained(tmp_path, text_file, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", text_file, "--out", out, *SMALL, "--steps", "3", "--eval-every", "1"]) == 0
    capsys.readouterr()
    return out


def one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lstmkit: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_the_nan_guard_keeps_the_last_good_state(capsys, tmp_path, text_file):
    out = str(tmp_path / "boom")
    rc = main(["train", "--data", text_file, "--out", out, "--steps", "20", "--hidden-size", "32", "--num-layers",
               "1", "--optimizer", "sgd", "--lr", "1e300", "--eval-every", "1", "--sample-length", "0",
               "--batch-size", "4", "--seq-len", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "(step 0) is kept" in err, err
    model, _, _ = load_checkpoint(out, which="last")
    assert json.loads(Path(resolve(out), "state.json").read_text())["step"] == 0
    assert all(np.isfinite(p).all() for p in model.params.values())
    assert main(["sample", out, "--length", "10", "--seed", "0"]) == 0


def _edit_state(run, edit):
    p = Path(resolve(run)) / "state.json"
    st = json.loads(p.read_text())
    edit(st)
    p.write_text(json.dumps(st))


@pytest.mark.parametrize("edit,words", [
    (lambda s: s["data_position"].update(chunk=-1), ["data_position.chunk"]),
    (lambda s: s["data_position"].update(chunk=10 ** 6), ["data_position.chunk"]),
    (lambda s: s["optimizer"].update(t=-1), ["optimizer t"]),
    (lambda s: s["history"].update(loss=["x"] * len(s["history"]["loss"])), ["history 'loss'"]),
    (lambda s: s["history"].update(step=[1]), ["history 'step'"]),
    (lambda s: s.update(step=math.inf), ["step must be"]),
    (lambda s: s.update(step=-5), ["step must be"]),
    (lambda s: s.update(elapsed_s=math.nan), ["elapsed_s"]),
    (lambda s: s.update(elapsed_s=-1e9), ["elapsed_s"]),
    (lambda s: s.update(first_loss=math.nan), ["first_loss"]),
    (lambda s: s.update(rng={"dropout": "x"}), ["rng"]),
    (lambda s: s.pop("history"), ["lacks 'history'"]),
], ids=["chunk-1", "chunk-huge", "t-1", "history-text", "history-lengths", "step-inf", "step-5",
        "elapsed-nan", "elapsed-neg", "first-loss-nan", "rng", "no-history"])
def test_crafted_training_state_is_refused_in_one_line(capsys, trained, edit, words):
    _edit_state(trained, edit)
    one_line_error(capsys, main(["train", "--resume", trained, "--steps", "1", "--no-progress"]), *words)


@pytest.mark.parametrize("h,words", [
    (lambda h: h[:, :1], ["carry.safetensors", "(2, 1, 8)"]),
    (lambda h: h.astype(np.float64), ["carried h", "float64"]),
    (lambda h: np.full_like(h, np.nan), ["carry.safetensors", "NaN or infinite"]),
])
def test_crafted_carried_state_is_refused(capsys, trained, h, words):
    p = Path(resolve(trained)) / "carry.safetensors"
    carry = load_file(str(p))
    carry["h"] = np.ascontiguousarray(h(carry["h"]))
    save_file(carry, str(p))
    one_line_error(capsys, main(["train", "--resume", trained, "--steps", "1", "--no-progress"]), *words)


def test_non_finite_optimizer_state_is_refused(capsys, trained):
    p = Path(resolve(trained)) / "optimizer.safetensors"
    arrays = load_file(str(p))
    k = next(iter(arrays))
    arrays[k] = np.full_like(arrays[k], np.inf)
    save_file(arrays, str(p))
    one_line_error(capsys, main(["train", "--resume", trained, "--steps", "1", "--no-progress"]),
                   "optimizer.safetensors", "NaN or infinite")


def test_an_unwritable_out_is_found_before_training(capsys, trained, monkeypatch):
    import lstmkit.trainer as T

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(T.tempfile, "mkstemp", refuse)
    before = json.loads(Path(resolve(trained), "state.json").read_text())["step"]
    one_line_error(capsys, main(["train", "--resume", trained, "--steps", "5", "--no-progress"]),
                   "cannot write", "Permission denied")
    assert json.loads(Path(resolve(trained), "state.json").read_text())["step"] == before


def test_a_tiny_temperature_is_greedy_and_finite(capsys, trained):
    assert main(["sample", trained, "--temperature", "1e-320", "--length", "30", "--seed", "1"]) == 0
    tiny = capsys.readouterr().out
    assert main(["sample", trained, "--greedy", "--length", "30"]) == 0
    assert tiny == capsys.readouterr().out


def test_a_second_trainer_on_a_run_in_training_is_refused(tmp_path, text_file):
    import os
    import signal
    import subprocess
    import sys
    import time
    out = str(tmp_path / "busy")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "lstmkit.cli", "train", "--data", text_file, "--out", out,
                              *SMALL, "--steps", "1000000", "--eval-every", "5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        for line in first.stdout:                 # wait until training is under way and a state exists
            if line.startswith("step") or time.time() > deadline:
                break
        for argv in (["--resume", out, "--steps", "1"], ["--data", text_file, "--out", out, "--steps", "1"]):
            second = subprocess.run([sys.executable, "-m", "lstmkit.cli", "train", *argv, *SMALL], env=env,
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
            assert (f"pid {first.pid}" in second.stderr or "already holds the checkpoint of another run"
                    in second.stderr), second.stderr
        # readers are never refused: they read the state the pointer names while the writer goes on
        assert main(["sample", out, "--last", "--length", "5", "--seed", "0"]) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM
    assert main(["train", "--resume", out, "--steps", "1", "--no-progress"]) == 0   # the lock went with it


def test_a_folder_whose_first_save_was_interrupted_can_be_trained_into(capsys, tmp_path, text_file):
    out = tmp_path / "half"
    (out / ".tmp-abcd1234").mkdir(parents=True)               # what a crash inside the first save leaves
    (out / ".tmp-abcd1234" / "lstm.safetensors").write_bytes(b"partial")
    assert main(["train", "--data", text_file, "--out", str(out), *SMALL, "--steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-")) == []
    assert load_checkpoint(str(out))[2]["train"]["steps"] == 2
