"""A checkpoint is downloaded and shared, so nothing in it is trusted (issue 17): files that are not
regular files, pointers out of the run, sizes that do not match the arrays, non-finite or integer
weights, bad vocabularies -- each one CheckpointError, fast, without a large allocation; one writer per
run (a lock, two real processes); readers never lose the state they found; an interrupted first save
leaves a reusable folder.  Also the best state next to the last (issue 13)."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lstmkit import checkpoint as ckpt
from lstmkit import run_files
from lstmkit.checkpoint import (CheckpointError, checkpoint_info, load_checkpoint, read_checkpoint, resolve,
                                run_lock, run_state, save_checkpoint)
from lstmkit.model import LanguageModel
from lstmkit.optim import Adam
from lstmkit.tokenizers import build_tokenizer

TEXT = "the quick brown fox\njumps over the lazy dog\n"
REPO = str(Path(__file__).resolve().parent.parent)


def make(tmp_path, step=3, name="run", best=False, seed=0):
    tok = build_tokenizer("char", TEXT)
    m = LanguageModel(tok.vocab_size, hidden_size=8, num_layers=2, embed_size=5, seed=seed)
    opt = Adam(m.params, 0.01)
    run = str(tmp_path / name)
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=step, state={"step": step},
                    optimizer=opt, carry=m.initial_state(1), best=best, val=2.5 if best else None)
    return run, m, tok, opt


def python(code, *args, **kw):
    """A second lstmkit process running code (a real process: its own pid, its own flock)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, **kw)


def cli(*args, timeout=60):
    """`lstmkit ...` in a child process, so that a hang or a runaway allocation fails the test, not the run."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from lstmkit.cli import main; sys.exit(main(sys.argv[1:]))")
    p = python(code, *args)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"lstmkit {' '.join(args)} still running after {timeout} s")
    return p.returncode, out, err


def state_file(run, name):
    return Path(resolve(run), name)


def edit_json(p, fn):
    p.write_text(json.dumps(fn(json.loads(p.read_text(encoding="utf-8")))), encoding="utf-8")


# ---- 4. what a file is -------------------------------------------------------------------------

def test_config_json_symlinked_to_dev_zero_is_refused_in_one_line(tmp_path):
    run, *_ = make(tmp_path)
    p = state_file(run, "config.json")
    p.unlink()
    p.symlink_to("/dev/zero")
    start = time.monotonic()
    rc, out, err = cli("sample", run, "--length", "5")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "config.json is a symbolic link" in err and time.monotonic() - start < 30


def test_vocab_json_as_a_fifo_is_refused_not_waited_on(tmp_path):
    run, *_ = make(tmp_path)
    p = state_file(run, "vocab.json")
    p.unlink()
    os.mkfifo(p)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rc, out, err = cli("eval", run, "--data", str(text), timeout=30)
    assert rc == 2 and err.count("\n") == 1 and "vocab.json is a FIFO" in err, err


@pytest.mark.parametrize("name", ["config.json", "lstm.safetensors"])
def test_a_directory_or_symlink_in_place_of_a_file(tmp_path, name):
    run, *_ = make(tmp_path)
    p = state_file(run, name)
    data = p.read_bytes()
    p.unlink()
    p.mkdir()
    with pytest.raises(CheckpointError, match=f"{name} is a directory"):
        load_checkpoint(run)
    p.rmdir()
    (tmp_path / "elsewhere").write_bytes(data)         # a good file, but outside the state folder
    p.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=f"{name} is a symbolic link"):
        load_checkpoint(run)


def test_a_pointer_that_is_a_symlink_or_a_fifo_is_refused(tmp_path):
    victim, *_ = make(tmp_path, name="victim")
    run, *_ = make(tmp_path)
    p = Path(run, "checkpoint.json")
    p.unlink()
    p.symlink_to(Path(victim, "checkpoint.json"))
    with pytest.raises(CheckpointError, match="checkpoint.json is a symbolic link"):
        load_checkpoint(run)
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(CheckpointError, match="checkpoint.json is a FIFO"):
        run_state(run)


def test_files_over_their_size_bound_are_refused_before_they_are_read(tmp_path, monkeypatch):
    run, *_ = make(tmp_path)
    p = state_file(run, "config.json")
    p.write_bytes(p.read_bytes() + b" " * (1 << 20))
    with pytest.raises(CheckpointError, match=r"config.json has \d+ bytes; at most 1048576 expected"):
        load_checkpoint(run)
    run2, *_ = make(tmp_path, name="run2")
    monkeypatch.setattr(run_files, "TENSOR_LIMIT", 100)
    with pytest.raises(CheckpointError, match=r"lstm.safetensors has \d+ bytes; at most 100 expected"):
        load_checkpoint(run2)


# ---- 5. the pointer names a step-* folder of this run and nothing else -------------------------

@pytest.mark.parametrize("which", ["current", "best"])
def test_a_pointer_out_of_the_run_is_refused(tmp_path, which):
    victim, *_ = make(tmp_path, name="victim")
    run, *_ = make(tmp_path, best=True)
    outside = resolve(victim)
    targets = [os.path.join("..", "victim", os.path.basename(outside)), outside, ".", "", 7]
    for target in targets + ([None] if which == "current" else []):       # "best": null means none yet
        edit_json(Path(run, "checkpoint.json"), lambda d: {**d, which: target})
        for call in (lambda: load_checkpoint(run, which="best"), lambda: read_checkpoint(run, training=True),
                     lambda: resolve(run, "best")):
            with pytest.raises(CheckpointError, match=f"'{which}' is .*expected the name of a step-"):
                call()


def test_a_state_folder_that_is_a_symlink_is_not_followed(tmp_path):
    victim, *_ = make(tmp_path, name="victim")
    run, *_ = make(tmp_path)
    name = "step-00000009-abcdef"
    os.symlink(resolve(victim), os.path.join(run, name))
    edit_json(Path(run, "checkpoint.json"), lambda d: {**d, "current": name})
    with pytest.raises(CheckpointError, match=f"'{name}' is missing or not a folder"):
        load_checkpoint(run)


# ---- 3. sizes are checked against the arrays before anything is allocated ----------------------

@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", 2000, r"weight_ih_l0 has shape \(32, 5\), config.json implies \(8000, 5\)"),
    ("hidden_size", 100000, r"hidden_size is 100000; expected an integer in \[1, 65536\]"),
    ("num_layers", 10**9, r"num_layers is 1000000000; expected an integer in \[1, 256\]"),
    ("num_layers", 200, r"lstm.safetensors lacks weight_ih_l2, weight_hh_l2, bias_ih_l2 for the model"),
    ("vocab_size", 3000, r"vocab.json has \d+ tokens, the model 3000"),
    ("embed_size", 4000, r"weight_ih_l0 has shape \(32, 5\), config.json implies \(32, 4000\)"),
    ("hidden_size", "8", r"hidden_size is '8'"),
    ("hidden_size", True, r"hidden_size is True"),
    ("dtype", "int64", r"dtype is 'int64'"),
])
def test_model_sizes_must_match_the_arrays_before_allocation(tmp_path, key, value, message):
    run, *_ = make(tmp_path)
    edit_json(state_file(run, "config.json"), lambda d: {**d, "model": {**d["model"], key: value}})
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak        # the model of hidden_size 2000 alone would be ~300 MB


# ---- 7. weights: float32/float64 and finite ----------------------------------------------------

@pytest.mark.parametrize("file,key,value", [("model.safetensors", "decoder.bias", np.nan),
                                            ("lstm.safetensors", "weight_hh_l1", np.inf)])
def test_non_finite_weights_are_refused_naming_the_array(tmp_path, file, key, value):
    run, *_ = make(tmp_path)
    p = state_file(run, file)
    arrays = load_file(str(p))
    arrays[key].flat[1] = value
    save_file(arrays, str(p))
    with pytest.raises(CheckpointError, match=f"{file}: {key} holds NaN or infinite values"):
        load_checkpoint(run)


def test_non_finite_optimizer_state_or_carry_is_refused(tmp_path):
    for file, key in (("optimizer.safetensors", "exp_avg.decoder.bias"), ("carry.safetensors", "h")):
        run, *_ = make(tmp_path, name=file)
        p = state_file(run, file)
        arrays = load_file(str(p))
        arrays[key].flat[0] = np.nan
        save_file(arrays, str(p))
        load_checkpoint(run)                                  # sampling does not read them
        with pytest.raises(CheckpointError, match=f"{file}: {key} holds NaN"):
            read_checkpoint(run, training=True)


@pytest.mark.parametrize("dtype,message", [(np.int64, r"decoder.bias is 'I64'; lstmkit reads F32 or F64"),
                                           (np.int32, r"decoder.bias is 'I32'"),
                                           (np.float16, r"decoder.bias is 'F16'"),
                                           (np.float64, r"decoder.bias is float64; config.json's model is float32")])
def test_weights_of_another_dtype_are_refused(tmp_path, dtype, message):
    run, *_ = make(tmp_path)
    p = state_file(run, "model.safetensors")
    arrays = load_file(str(p))
    arrays["decoder.bias"] = np.ones(arrays["decoder.bias"].shape, dtype)
    save_file(arrays, str(p))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(run)


def test_nonfinite_parameters_names_the_arrays():
    m = LanguageModel(5, hidden_size=4, num_layers=1, seed=0)
    assert ckpt.nonfinite_parameters(m.params) == []
    m.params["decoder.bias"][2] = np.nan
    m.params["lstm.weight_hh_l0"][0, 0] = -np.inf
    assert ckpt.nonfinite_parameters(m.params) == ["decoder.bias", "lstm.weight_hh_l0"]


def test_a_float64_model_round_trips(tmp_path):
    tok = build_tokenizer("char", TEXT)
    m = LanguageModel(tok.vocab_size, hidden_size=4, num_layers=1, seed=0, dtype=np.float64)
    run = str(tmp_path / "run")
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=1)
    m2, _, _ = load_checkpoint(run)
    assert m2.dtype == np.float64
    for k in m.params:
        np.testing.assert_array_equal(m2.params[k], m.params[k])


@pytest.mark.parametrize("header", [
    {"decoder.bias": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4]}},
    {"decoder.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
     "embedding.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},     # overlapping
    {"decoder.bias": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    [1, 2],
])
def test_a_lying_safetensors_header_is_refused(tmp_path, header):
    run, *_ = make(tmp_path)
    h = json.dumps(header).encode()
    state_file(run, "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"\0" * 8)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(run)


# ---- 6. the vocabulary -------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,message", [
    ({"kind": "word", "vocab": sorted(["\n", "the", "fox"])}, "must hold '<unk>'"),
    ({"kind": "jamo", "vocab": ["", "a"]}, "token 0 is ''"),
    ({"kind": "char", "vocab": ["a", "bc"]}, "token 1 is 'bc'"),
])
def test_a_bad_vocabulary_is_a_checkpoint_error(tmp_path, vocab, message):
    tok = build_tokenizer(vocab["kind"], "a")
    run, *_ = make(tmp_path)
    p = state_file(run, "vocab.json")
    p.write_text(json.dumps(vocab))
    edit_json(state_file(run, "config.json"),
              lambda d: {**d, "model": {**d["model"], "vocab_size": len(vocab["vocab"])}})
    with pytest.raises(CheckpointError, match=f"corrupt: bad vocabulary in vocab.json .*{message}"):
        load_checkpoint(run)
    assert tok


# ---- 2. readers keep the state they found; one writer per run -----------------------------------

def test_the_previous_state_stays_for_a_reader_that_resolved_it(tmp_path):
    run, m, tok, opt = make(tmp_path)
    before = {k: v.copy() for k, v in m.params.items()}
    found = resolve(run)                                  # a reader finds the state ...
    for p in m.params.values():
        p += 1.0
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)   # ... a writer moves on
    m2, _, _ = load_checkpoint(found)                     # ... and the reader still reads what it found
    for k in before:
        np.testing.assert_array_equal(m2.params[k], before[k])
    assert resolve(run) != found


def test_a_reader_whose_state_was_removed_meanwhile_reads_the_new_one(tmp_path, monkeypatch):
    run, m, tok, opt = make(tmp_path)
    real, calls = ckpt._read_state, []

    def slow_reader(path, d, training, want):
        calls.append(d)
        if len(calls) == 1:          # two saves happen between resolve and reading: d is gone
            for step in (4, 5):
                save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=step)
        return real(path, d, training, want)

    monkeypatch.setattr(ckpt, "_read_state", slow_reader)
    assert read_checkpoint(run)["dir"] == resolve(run) and len(calls) == 2


WRITER = """
import sys, numpy as np
from lstmkit.checkpoint import save_checkpoint
from lstmkit.model import LanguageModel
from lstmkit.tokenizers import build_tokenizer
tok = build_tokenizer("char", "the quick brown fox")
m = LanguageModel(tok.vocab_size, hidden_size=8, num_layers=1, seed=0)
step = 10
print("ready", flush=True)
while not sys.stdin.closed:
    step += 1
    save_checkpoint(sys.argv[1], model=m, tokenizer=tok, config={}, run_id="abc", step=step)
    if step % 20 == 0 and sys.stdin.readline() != "more\\n":
        break
print(step, flush=True)
"""


def test_a_reader_never_fails_while_another_process_saves(tmp_path):
    run, *_ = make(tmp_path)
    writer = python(WRITER, run)
    assert writer.stdout.readline() == "ready\n"
    reads, failures = 0, []
    try:
        for _ in range(15):                    # the writer saves 20 states per round, the reader reads
            writer.stdin.write("more\n")
            writer.stdin.flush()
            for _ in range(10):
                try:
                    read_checkpoint(run)
                except CheckpointError as e:
                    failures.append(str(e))
                reads += 1
    finally:
        writer.stdin.close()
        last = writer.stdout.read()
        writer.wait(30)
    assert writer.returncode == 0, writer.stderr.read()
    assert int(last) > 100 and not failures, (reads, failures[:3])


HOLDER = """
import sys
from lstmkit.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    run, m, tok, opt = make(tmp_path)
    holder = python(HOLDER, run)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(CheckpointError, match=rf"is being written by another lstmkit process \(pid {holder.pid}\)"):
            save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)
        with pytest.raises(CheckpointError, match="being written"):
            with run_lock(run):
                pass
        assert checkpoint_info(run)["step"] == 3 and os.path.exists(os.path.join(run, ".lock"))
    finally:
        holder.communicate("done\n", timeout=30)
    assert not os.path.exists(os.path.join(run, ".lock"))          # released and removed
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)
    assert checkpoint_info(run)["step"] == 4


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    run, m, tok, opt = make(tmp_path)
    holder = python(HOLDER, run)
    assert holder.stdout.readline() == "locked\n"
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    assert json.loads(Path(run, ".lock").read_text())["pid"] == holder.pid      # left behind, stale
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)
    assert checkpoint_info(run)["step"] == 4 and not os.path.exists(os.path.join(run, ".lock"))


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    run, m, tok, opt = make(tmp_path)
    with run_lock(run):                          # what a trainer holds for its whole run
        save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)
        assert os.path.exists(os.path.join(run, ".lock"))
    assert not os.path.exists(os.path.join(run, ".lock"))


def test_the_lock_of_a_path_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        with run_lock(str(tmp_path / "file")):
            pass
    assert (tmp_path / "file").read_text() == "mine"


# ---- 8. an interrupted first save ----------------------------------------------------------------

DIES_SAVING = """
import os, sys
from lstmkit import checkpoint as ckpt
from lstmkit import run_files
from lstmkit.model import LanguageModel
from lstmkit.tokenizers import build_tokenizer
tok = build_tokenizer("char", "the quick brown fox")
m = LanguageModel(tok.vocab_size, hidden_size=8, num_layers=1, seed=0)
ckpt._write_json = lambda path, obj: os._exit(9)        # killed while writing config.json
ckpt.save_checkpoint(sys.argv[1], model=m, tokenizer=tok, config={}, run_id="abc", step=0)
"""


def test_a_run_whose_first_save_was_killed_can_be_trained_into_again(tmp_path):
    run = str(tmp_path / "run")
    p = python(DIES_SAVING, run)
    p.communicate(timeout=60)
    assert p.returncode == 9
    left = os.listdir(run)
    assert any(e.startswith(".tmp-") for e in left) and "checkpoint.json" not in left
    assert run_state(run) == "empty"
    with pytest.raises(CheckpointError, match="holds no complete state: its first save did not finish"):
        load_checkpoint(run)
    _, m, tok, _ = make(tmp_path, name="another")
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="new", step=1)
    assert run_state(run) == "run" and sorted(e[:13] for e in os.listdir(run)) == ["checkpoint.js", "step-00000001"]
    assert checkpoint_info(run)["step"] == 1


def test_run_state(tmp_path):
    assert run_state(str(tmp_path / "nothing")) == "empty"
    (tmp_path / "made").mkdir()
    assert run_state(str(tmp_path / "made")) == "empty"
    run, *_ = make(tmp_path)
    assert run_state(run) == "run"
    Path(run, "notes.txt").write_text("mine")
    assert run_state(run) == "run"                       # a run: the trainer decides (resume or refuse)
    os.remove(os.path.join(run, "notes.txt"))
    edit_json(Path(run, "checkpoint.json"), lambda d: {**d, "current": "step-00000099-abcdef"})
    assert run_state(run) == "empty"                     # the pointer names a state that is not there
    Path(run, "notes.txt").write_text("mine")
    assert run_state(run) == "foreign"
    other = tmp_path / "other"
    other.mkdir()
    (other / "loss.png").write_bytes(b"my own figure")    # loss.png is ours only next to our pointer
    assert run_state(str(other)) == "foreign"
    (tmp_path / "file").write_text("x")
    assert run_state(str(tmp_path / "file")) == "foreign"


# ---- the best state next to the last (issue 13) ------------------------------------------------

def test_best_and_last(tmp_path):
    run, m, tok, opt = make(tmp_path, step=3, best=True)
    best_params = {k: v.copy() for k, v in m.params.items()}
    for step in (4, 5, 6):                               # worse validation: not best
        for p in m.params.values():
            p += 1.0
        save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=step, val=3.0)
    info = checkpoint_info(run)
    assert (info["step"], info["best_step"], info["best_val"]) == (6, 3, 2.5)
    assert sorted(e[:13] for e in os.listdir(run) if e.startswith("step-")) == \
        ["step-00000003", "step-00000005", "step-00000006"]          # best, previous, last
    b, _, _ = load_checkpoint(run, which="best")
    last, _, _ = load_checkpoint(run)
    for k in best_params:
        np.testing.assert_array_equal(b.params[k], best_params[k])
        np.testing.assert_array_equal(last.params[k], m.params[k])
    assert read_checkpoint(run, training=True, which="best")["state"]["step"] == 3
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=7, best=True, val=2.0)
    info = checkpoint_info(run)
    assert (info["best"], info["best_step"], info["best_val"]) == (info["current"], 7, 2.0)
    assert sorted(e[:13] for e in os.listdir(run) if e.startswith("step-")) == \
        ["step-00000006", "step-00000007"]               # one folder serves as best and last


def test_best_falls_back_to_last_when_there_is_none(tmp_path):
    run, *_ = make(tmp_path)
    assert resolve(run, "best") == resolve(run)
    assert checkpoint_info(run)["best"] is None
    with pytest.raises(ValueError, match="which must be"):
        resolve(run, "first")


def test_a_non_finite_best_val_in_the_pointer_is_refused(tmp_path):
    run, *_ = make(tmp_path, best=True)
    Path(run, "checkpoint.json").write_text(Path(run, "checkpoint.json").read_text().replace("2.5", "NaN"))
    with pytest.raises(CheckpointError, match="'best_val' is nan"):
        load_checkpoint(run)
