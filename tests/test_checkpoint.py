"""Checkpoints: round trip, PyTorch loads the LSTM tensors directly, atomic writes, and clear errors for
missing, incomplete, corrupt and incompatible checkpoints."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from lstmkit import checkpoint as ckpt
from lstmkit.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from lstmkit.config import LMError
from lstmkit.model import LanguageModel
from lstmkit.optim import Adam
from lstmkit.tokenizers import build_tokenizer

TEXT = "the quick brown fox\njumps over the lazy dog\n"


def make(tmp_path, step=3, name="run"):
    tok = build_tokenizer("char", TEXT)
    m = LanguageModel(tok.vocab_size, hidden_size=8, num_layers=2, embed_size=5, seed=0)
    opt = Adam(m.params, 0.01)
    ids = tok.encode(TEXT)
    m.loss(ids[:-1, None], ids[1:, None])
    m.backward()
    opt.step(m.grads)
    run = str(tmp_path / name)
    save_checkpoint(run, model=m, tokenizer=tok, config={"note": "x"}, run_id="abc", step=step,
                    state={"step": step}, optimizer=opt, carry=m.initial_state(1))
    return run, m, tok, opt


def test_round_trip(tmp_path):
    run, m, tok, opt = make(tmp_path)
    m2, tok2, cfg = load_checkpoint(run)
    assert tok2.vocab == tok.vocab and cfg["note"] == "x" and cfg["run_id"] == "abc"
    for k in m.params:
        np.testing.assert_array_equal(m2.params[k], m.params[k], err_msg=k)
    assert not m2.lstm.training
    ck = read_checkpoint(run, training=True)
    assert ck["state"]["step"] == 3 and ck["state"]["optimizer"]["t"] == 1
    np.testing.assert_array_equal(ck["optimizer_arrays"]["exp_avg.decoder.weight"],
                                  opt.state["exp_avg"]["decoder.weight"])
    ids = tok2.encode("the fox")
    logits, _, cache = m2.forward(ids[:, None])
    assert logits.shape == (7, 1, tok.vocab_size) and cache["lstm"][0][0]["gates"].shape == (7, 1, 32)


def test_torch_loads_the_lstm_tensors_directly(tmp_path):
    run, m, tok, _ = make(tmp_path)
    d = ckpt.resolve(run)
    sd = load_file(os.path.join(d, "lstm.safetensors"))
    assert sorted(sd) == sorted(torch.nn.LSTM(5, 8, 2).state_dict())
    t = torch.nn.LSTM(5, 8, 2)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(np.float32)
    ours, _ = m.lstm(x)
    theirs, _ = t(torch.from_numpy(x))
    np.testing.assert_allclose(ours, theirs.detach().numpy(), atol=1e-5)
    rest = load_file(os.path.join(d, "model.safetensors"))
    emb = torch.nn.Embedding(tok.vocab_size, 5)
    emb.load_state_dict({"weight": torch.from_numpy(rest["embedding.weight"])})
    dec = torch.nn.Linear(8, tok.vocab_size)
    dec.load_state_dict({"weight": torch.from_numpy(rest["decoder.weight"]),
                         "bias": torch.from_numpy(rest["decoder.bias"])})
    np.testing.assert_array_equal(emb.weight.detach().numpy(), m.params["embedding.weight"])
    np.testing.assert_array_equal(dec.weight.detach().numpy(), m.params["decoder.weight"])
    np.testing.assert_array_equal(dec.bias.detach().numpy(), m.params["decoder.bias"])


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run, m, tok, opt = make(tmp_path, step=3)
    before = {k: v.copy() for k, v in m.params.items()}
    for p in m.params.values():
        p += 1.0
    calls = {"n": 0}
    real = ckpt._write_json

    def crash(path, obj):
        calls["n"] += 1
        if calls["n"] == 2:          # config.json written, then the process "dies" writing vocab.json
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=9, state={"step": 9},
                        optimizer=opt, carry=m.initial_state(1))
    monkeypatch.undo()
    m2, _, _ = load_checkpoint(run)
    for k in before:
        np.testing.assert_array_equal(m2.params[k], before[k], err_msg=k)
    assert json.loads(Path(os.path.join(run, "checkpoint.json")).read_text())["step"] == 3
    assert [e for e in os.listdir(run) if e.startswith("step-")] == [os.path.basename(ckpt.resolve(run))]


def test_a_new_save_keeps_the_previous_state_and_removes_older_ones(tmp_path):
    run, m, tok, opt = make(tmp_path, step=3)
    for step, kept in ((4, ["step-00000003", "step-00000004"]), (5, ["step-00000004", "step-00000005"])):
        save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=step)
        assert sorted(e[:13] for e in os.listdir(run) if e.startswith("step-")) == kept


def test_a_new_save_removes_only_names_it_creates(tmp_path):
    run, m, tok, opt = make(tmp_path, step=3)
    old_state = os.path.basename(ckpt.resolve(run))
    mine = {"step-by-step": "dir", "step-00000001-notes": "dir", ".tmp-notes": "dir", "loss-notes.txt": "file",
            ".tmp-abc.json": "file"}
    for name, kind in mine.items():
        if kind == "dir":
            os.mkdir(os.path.join(run, name))
            Path(run, name, "keep.txt").write_text("mine")
        else:
            Path(run, name).write_text("mine")
    stale = {".tmp-abcd1234": "dir", ".tmp-zz_99xyz.json": "file"}      # left by interrupted writes
    os.mkdir(os.path.join(run, ".tmp-abcd1234"))
    Path(run, ".tmp-zz_99xyz.json").write_text("{")
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)
    assert old_state in os.listdir(run)                # kept for readers until the next save
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=5)
    left = set(os.listdir(run))
    assert set(mine) <= left
    assert not (set(stale) | {old_state}) & left
    assert all(Path(run, n, "keep.txt").read_text() == "mine" for n, k in mine.items() if k == "dir")


def test_every_file_and_folder_is_fsynced_before_the_old_state_goes(tmp_path, monkeypatch):
    run, m, tok, opt = make(tmp_path, step=3)
    old_state = os.path.basename(ckpt.resolve(run))
    save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=4)     # old_state goes next
    events, real_fsync, real_rmtree = [], os.fsync, ckpt.shutil.rmtree

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        real_fsync(fd)

    def rmtree(path, *a, **k):
        events.append(("rm", os.path.basename(path)))
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    final = save_checkpoint(run, model=m, tokenizer=tok, config={}, run_id="abc", step=5, state={"step": 5},
                            optimizer=opt, carry=m.initial_state(1))
    monkeypatch.undo()

    def ino(p):
        st = os.stat(p)
        return st.st_dev, st.st_ino

    synced = [e[1] for e in events if e[0] == "fsync"]
    files = sorted(os.listdir(final))
    assert len(files) == 7
    for f in files:                                   # safetensors and JSON alike
        assert ino(os.path.join(final, f)) in synced, f
    assert ino(final) in synced                       # the state folder's entries
    pointer = synced.index(ino(os.path.join(run, "checkpoint.json")))
    assert synced.index(ino(final)) < pointer
    assert ino(run) in synced[:pointer]               # the rename into place, before the pointer names it
    assert ino(run) in synced[pointer + 1:]           # the pointer's own os.replace
    removed = events.index(("rm", old_state))
    assert events.index(("fsync", ino(run)), events.index(("fsync", synced[pointer]))) < removed


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.json"
    p.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(str(p), fail)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]
    ckpt.atomic_write(str(p), lambda f: f.write(b"new"))
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]
    assert os.stat(p).st_mode & 0o777 == ckpt.MODE_FILE      # not mkstemp's 0600


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="not an lstmkit checkpoint"):
        load_checkpoint(str(tmp_path))


def test_incomplete(tmp_path):
    run, *_ = make(tmp_path)
    os.remove(os.path.join(ckpt.resolve(run), "lstm.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete: lstm.safetensors is missing"):
        load_checkpoint(run)


def test_corrupt_tensors(tmp_path):
    run, *_ = make(tmp_path)
    p = os.path.join(ckpt.resolve(run), "model.safetensors")
    data = Path(p).read_bytes()
    Path(p).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run)


def test_corrupt_json_and_wrong_shapes(tmp_path):
    run, *_ = make(tmp_path)
    d = ckpt.resolve(run)
    cfg = json.loads(Path(os.path.join(d, "config.json")).read_text())
    cfg["model"]["hidden_size"] = 9
    Path(os.path.join(d, "config.json")).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="corrupt.*shape"):
        load_checkpoint(run)
    Path(os.path.join(d, "config.json")).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt: cannot read config.json"):
        load_checkpoint(run)


def test_incompatible_version(tmp_path):
    run, *_ = make(tmp_path)
    p = os.path.join(run, "checkpoint.json")
    ptr = json.loads(Path(p).read_text())
    ptr["format_version"] = 99
    Path(p).write_text(json.dumps(ptr))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(run)


def test_check_output_refuses_a_fifo_without_opening_it(tmp_path):
    p = tmp_path / "out.png"
    os.mkfifo(p)                        # opening it for reading would wait for a writer forever
    with pytest.raises(LMError, match="it is a FIFO, not a PNG file"):
        ckpt.check_output(str(p), b"\x89PNG", "a PNG file")


def test_a_pointer_of_another_version_is_refused_before_its_fields_are_read(tmp_path):
    run, *_ = make(tmp_path)
    p = os.path.join(run, "checkpoint.json")
    Path(p).write_text(json.dumps({"format": ckpt.FORMAT, "format_version": 2, "state": "../elsewhere"}))
    with pytest.raises(CheckpointError, match="format version 2; this lstmkit reads version 1"):
        ckpt.read_pointer(run)
