"""End to end through the command line on small texts: train, checkpoint, resume, eval, sample, and
every kind of bad input (one line on stderr, a non-zero exit, nothing overwritten)."""

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lstmkit.checkpoint import load_checkpoint, resolve
from lstmkit.cli import main

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 12
KOREAN = ("형식은 여러 가지 생각을 한다. 우선 처음 만나서 어떻게 인사를 할까.\n"
          "'처음 보입니다. 저는 이형식이올시다' 이렇게 할까.\n") * 10
SMALL = ["--hidden-size", "16", "--batch-size", "4", "--seq-len", "16", "--sample-length", "20",
         "--sample-every", "0", "--no-progress"]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return str(p)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def train(capsys, data, out, *extra):
    return run(capsys, "train", "--data", data, "--out", out, *SMALL, *extra)


def state_of(run_dir):
    return json.loads(Path(resolve(run_dir), "state.json").read_text())


def snapshot(d):
    """Every file under d with its bytes: to show that nothing was touched."""
    res = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            res[os.path.relpath(p, d)] = Path(p).read_bytes()
    return res


def test_train_checkpoint_eval_sample(capsys, tmp_path, text_file):
    out = str(tmp_path / "run")
    rc, so, se = train(capsys, text_file, out, "--steps", "12", "--eval-every", "5")
    assert rc == 0, se
    assert "step      5" in so and "final sample" in so and "bits/char" in so
    assert os.path.isfile(os.path.join(out, "loss.png"))
    model, tok, cfg = load_checkpoint(out)
    assert cfg["train"]["hidden_size"] == 16 and len(cfg["run_id"]) == 32
    assert state_of(out)["step"] == 12

    rc, so, se = run(capsys, "eval", out, "--data", text_file, "--json")
    assert rc == 0, se
    res = json.loads(so)
    assert {"bits_per_char", "loss_nats", "tokens"} <= set(res)
    assert res["bits_per_char"] == pytest.approx(res["loss_nats"] / np.log(2))   # char: a token is a char
    assert 0 < res["bits_per_char"] < np.log2(tok.vocab_size) + 1

    a = run(capsys, "sample", out, "--seed", "7", "--length", "60", "--prime", "First")
    b = run(capsys, "sample", out, "--seed", "7", "--length", "60", "--prime", "First")
    c = run(capsys, "sample", out, "--seed", "8", "--length", "60", "--prime", "First")
    assert a[0] == 0 and a == b and a[1] != c[1]
    assert a[1].startswith("First") and len(a[1]) == len("First") + 60 + 1
    g1 = run(capsys, "sample", out, "--greedy", "--length", "30")
    g2 = run(capsys, "sample", out, "--greedy", "--length", "30", "--seed", "99")
    assert g1 == g2
    rc, so, _ = run(capsys, "sample", out, "--seed", "1", "--top-k", "3", "--top-p", "0.9", "--temperature", "0.7")
    assert rc == 0 and len(so) == 501


def test_stop_and_resume_equals_uninterrupted(capsys, tmp_path, text_file):
    common = ["--num-layers", "2", "--dropout", "0.3", "--eval-every", "4"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert train(capsys, text_file, full, "--steps", "14", *common)[0] == 0
    assert train(capsys, text_file, part, "--steps", "6", *common)[0] == 0
    rc, so, se = run(capsys, "train", "--resume", part, "--steps", "8", "--no-progress")   # 8 more: 14 in all
    assert rc == 0, se
    assert "resuming" in so and "step 6 of 14 steps" in so
    a, _, _ = load_checkpoint(full)
    b, _, _ = load_checkpoint(part)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    h1 = state_of(full)["history"]
    h2 = state_of(part)["history"]
    assert h1["loss"] == h2["loss"] and len(h1["loss"]) == 14


def test_jamo_and_word_tokenizers(capsys, tmp_path):
    p = tmp_path / "ko.txt"
    p.write_text(KOREAN, encoding="utf-8")
    out = str(tmp_path / "jamo")
    rc, so, se = train(capsys, str(p), out, "--steps", "3", "--tokenizer", "jamo")
    assert rc == 0, se
    _, tok, _ = load_checkpoint(out)
    assert tok.kind == "jamo" and tok.vocab_size < len(set(KOREAN))
    rc, so, se = run(capsys, "eval", out, "--data", str(p), "--json")
    res = json.loads(so)
    assert res["bits_per_char"] > res["loss_nats"] / np.log(2)      # > 1 token per character
    rc, so, _ = run(capsys, "sample", out, "--prime", "형식은", "--length", "30", "--seed", "0")
    assert rc == 0 and so.startswith("형식은")
    out = str(tmp_path / "word")
    assert train(capsys, str(p), out, "--steps", "3", "--tokenizer", "word",
                 "--batch-size", "2", "--seq-len", "8")[0] == 0
    rc, so, _ = run(capsys, "eval", out, "--data", str(p), "--json")
    res = json.loads(so)
    assert res["perplexity"] == pytest.approx(np.exp(res["loss_nats"]))


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, text_file):
    out = str(tmp_path / "boom")
    rc, so, se = train(capsys, text_file, out, "--steps", "50", "--optimizer", "sgd", "--lr", "1e4",
                       "--momentum", "0.9", "--grad-clip", "0")
    assert rc == 1
    assert se.count("\n") == 1 and "training stopped at step" in se and "last good checkpoint" in se
    model, _, _ = load_checkpoint(out)
    assert all(np.isfinite(p).all() for p in model.params.values())


def one_line_error(rc, err):
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("lstmkit: error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("content,pattern", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"abc\xfe\xffdef", "byte 0xfe at offset 3"),
    (b"too short", "fewer than one batch"),
])
def test_bad_data(capsys, tmp_path, content, pattern):
    p = tmp_path / "data.txt"
    if content is not None:
        p.write_bytes(content)
    out = tmp_path / "run"
    rc, so, se = train(capsys, str(p), str(out), "--steps", "2")
    one_line_error(rc, se)
    assert pattern in se
    assert not out.exists()


@pytest.mark.parametrize("args,pattern", [
    (["--hidden-size", "0"], "--hidden-size must be"),
    (["--num-layers", "-1"], "--num-layers must be"),
    (["--dropout", "1.5"], "--dropout must be"),
    (["--num-layers", "1", "--dropout", "0.3"], "--dropout 0.3 needs --num-layers >= 2"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--val-frac", "0.9"], "--val-frac must be"),
    (["--seq-len", "0"], "--seq-len must be"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--grad-clip", "-1"], "--grad-clip must be"),
    (["--steps", "0"], "--steps"),
    (["--steps", "3", "--minutes", "1"], "not allowed with"),
    (["--optimizer", "lbfgs"], "invalid choice"),
    (["--hidden-size", "abc"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_hyperparameters(capsys, tmp_path, text_file, args, pattern):
    out = tmp_path / "run"
    rc, so, se = train(capsys, text_file, str(out), *args)
    one_line_error(rc, se)
    assert pattern in se
    assert not out.exists()


@pytest.fixture
def trained(capsys, tmp_path, text_file):
    out = str(tmp_path / "trained")
    assert train(capsys, text_file, out, "--steps", "2")[0] == 0
    return out


def test_bad_checkpoints(capsys, tmp_path, trained, text_file):
    rc, _, se = run(capsys, "sample", str(tmp_path / "missing"))
    one_line_error(rc, se)
    assert "does not exist" in se
    rc, _, se = run(capsys, "eval", str(tmp_path), "--data", text_file)
    one_line_error(rc, se)
    assert "not an lstmkit checkpoint" in se

    state = resolve(trained)
    vocab = Path(os.path.join(state, "vocab.json")).read_bytes()
    os.remove(os.path.join(state, "vocab.json"))
    rc, _, se = run(capsys, "sample", trained)
    one_line_error(rc, se)
    assert "incomplete" in se
    Path(os.path.join(state, "vocab.json")).write_bytes(vocab)

    lstm = os.path.join(state, "lstm.safetensors")
    good = Path(lstm).read_bytes()
    Path(lstm).write_bytes(b"garbage" * 10)
    rc, _, se = run(capsys, "train", "--resume", trained, "--steps", "4")
    one_line_error(rc, se)
    assert "corrupt" in se
    Path(lstm).write_bytes(good)

    ptr = os.path.join(trained, "checkpoint.json")
    d = json.loads(Path(ptr).read_text())
    d["format_version"] = 0
    Path(ptr).write_text(json.dumps(d))
    rc, _, se = run(capsys, "eval", trained, "--data", text_file)
    one_line_error(rc, se)
    assert "format version 0" in se


def test_resume_with_different_data_or_model(capsys, tmp_path, trained):
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    before = snapshot(trained)
    rc, _, se = run(capsys, "train", "--resume", trained, "--data", str(other), "--steps", "4")
    one_line_error(rc, se)
    assert "differs from the text" in se
    rc, _, se = run(capsys, "train", "--resume", trained, "--hidden-size", "32", "--steps", "4")
    one_line_error(rc, se)
    assert "--hidden-size 32 differs" in se
    assert snapshot(trained) == before


def test_prime_with_unknown_symbols(capsys, trained):
    rc, so, se = run(capsys, "sample", trained, "--prime", "First 한글")
    one_line_error(rc, se)
    assert "'한'" in se and "'글'" in se and so == ""


def test_bad_sampling_options(capsys, trained):
    for args, pattern in ((["--temperature", "0"], "--temperature"), (["--top-p", "1.5"], "--top-p"),
                          (["--top-k", "-2"], "--top-k"), (["--length", "-1"], "--length")):
        rc, _, se = run(capsys, "sample", trained, *args)
        one_line_error(rc, se)
        assert pattern in se


def test_negative_sample_seed(capsys, trained):
    rc, so, se = run(capsys, "sample", trained, "--seed", "-1")
    one_line_error(rc, se)
    assert "--seed must be an integer >= 0, got -1" in se and so == ""


def _del(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _set(key, value):
    return lambda d: {**d, key: value}


def _set_in(outer, key, value):
    return lambda d: {**d, outer: {**d[outer], key: value}}


@pytest.mark.parametrize("name,edit,command", [          # edit: the file's JSON -> what is written instead
    ("config.json", _del("train"), "resume"),
    ("config.json", _del("data"), "resume"),
    ("config.json", _set("train", ["not", "a", "dict"]), "resume"),
    ("config.json", _set_in("train", "hidden_size", "16"), "resume"),
    ("config.json", _set_in("data", "sha256", None), "resume"),
    ("vocab.json", lambda d: ["a", "b"], "sample"),
    ("vocab.json", lambda d: ["a", "b"], "resume"),
    ("vocab.json", _set("vocab", [1, 2]), "sample"),
    ("state.json", _set("optimizer", None), "resume"),
    ("state.json", _set("optimizer", []), "resume"),
    ("state.json", _set("history", []), "resume"),
    ("state.json", _set("first_loss", "high"), "resume"),
    ("state.json", lambda d: [], "resume"),
])
def test_checkpoint_json_of_the_wrong_shape(capsys, trained, name, edit, command):
    p = Path(resolve(trained), name)
    p.write_text(json.dumps(edit(json.loads(p.read_text(encoding="utf-8")))), encoding="utf-8")
    before = snapshot(trained)
    if command == "resume":
        rc, _, se = run(capsys, "train", "--resume", trained, "--steps", "4", "--no-progress")
    else:
        rc, _, se = run(capsys, "sample", trained, "--length", "5")
    one_line_error(rc, se)
    assert "corrupt" in se and (repr(trained) in se or repr(resolve(trained)) in se), se
    assert snapshot(trained) == before


def test_out_holding_another_run_is_refused(capsys, trained, text_file):
    before = snapshot(trained)
    rc, _, se = train(capsys, text_file, trained, "--steps", "2")
    one_line_error(rc, se)
    assert "another run" in se
    assert snapshot(trained) == before


def test_out_holding_other_files_is_refused_and_left_alone(capsys, tmp_path, text_file):
    out = tmp_path / "mine"
    (out / "step-by-step").mkdir(parents=True)
    (out / "step-by-step" / "notes.txt").write_text("my notes")
    (out / "loss.png").write_bytes(b"my own figure")
    before = snapshot(out)
    rc, _, se = train(capsys, text_file, str(out), "--steps", "2")
    one_line_error(rc, se)
    assert "not empty" in se and "checkpoint.json" in se
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["loss.png", "step-by-step"]


def test_an_empty_out_folder_is_used(capsys, tmp_path, text_file):
    out = tmp_path / "empty"
    out.mkdir()
    rc, _, se = train(capsys, text_file, str(out), "--steps", "2")
    assert rc == 0, se
    assert state_of(str(out))["step"] == 2


def test_eval_unknown_symbols_and_missing_data(capsys, tmp_path, trained):
    p = tmp_path / "ko.txt"
    p.write_text("한국어", encoding="utf-8")
    rc, _, se = run(capsys, "eval", trained, "--data", str(p))
    one_line_error(rc, se)
    assert "not in the model's vocabulary" in se
    rc, _, se = run(capsys, "eval", trained, "--data", str(tmp_path / "none.txt"))
    one_line_error(rc, se)


def test_sigterm_saves_and_the_run_resumes(tmp_path, text_file):
    out = str(tmp_path / "sig")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lstmkit.cli", "train", "--data", text_file, "--out", out,
                             *SMALL, "--steps", "100000", "--eval-every", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    for line in proc.stdout:                 # wait until training is under way
        if line.startswith("step") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    so, se = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, se
    assert "stopped by SIGTERM" in so and "Traceback" not in se
    step = state_of(out)["step"]
    assert step >= 10
    rc = main(["train", "--resume", out, "--steps", "2", "--no-progress"])
    assert rc == 0
    assert state_of(out)["step"] == step + 2


def test_delegates_to_the_lessons(monkeypatch):
    import types
    seen = {}
    for name in ("gradient_flow", "visualize"):
        mod = types.ModuleType(f"lstmkit.{name}")
        mod.main = (lambda n: lambda argv: seen.setdefault(n, argv) and 0)(name)
        monkeypatch.setitem(sys.modules, f"lstmkit.{name}", mod)
    assert main(["gradient-flow", "--x", "1"]) == 0
    assert main(["visualize", "run"]) == 0
    assert seen == {"gradient_flow": ["--x", "1"], "visualize": ["run"]}


def test_epochs_with_the_progress_bar(capsys, tmp_path, text_file):
    out = str(tmp_path / "ep")
    rc, so, se = run(capsys, "train", "--data", text_file, "--out", out, "--hidden-size", "8", "--batch-size", "4",
                     "--seq-len", "16", "--epochs", "1", "--sample-length", "0", "--eval-every", "1000")
    assert rc == 0, se
    chunks = (len(TEXT) * 0.95 // 4 - 1) // 16
    assert state_of(out)["step"] == chunks and state_of(out)["data_position"] == {"epoch": 0, "chunk": chunks}
    assert "step" in se                                          # tqdm's bar went to stderr


def test_no_arguments_is_the_mujeong_main_job(tmp_path):
    from lstmkit.config import MAIN_JOB_MINUTES, TrainConfig
    from lstmkit.train import Trainer
    t = Trainer(TrainConfig(), str(tmp_path / "main"), progress=False)
    assert t.cfg.data == "mujeong" and t.cfg.tokenizer == "char" and t.cfg.minutes == MAIN_JOB_MINUTES
    assert 1600 < t.tok.vocab_size < 1700
    assert not (tmp_path / "main").exists()                      # nothing is written before run()


def test_dropout_default_follows_the_number_of_layers(capsys, tmp_path, text_file):
    # The main job is 2 layers with dropout between them; asking for one layer must not trip the
    # "dropout needs 2 layers" check with a dropout the user never gave.
    from lstmkit.config import DEFAULT_DROPOUT, TrainConfig, validate
    main_job = TrainConfig()
    assert main_job.num_layers == 2 and main_job.dropout == DEFAULT_DROPOUT > 0
    one = TrainConfig(num_layers=1)
    assert one.dropout == 0.0
    validate(one)
    assert TrainConfig(num_layers=3, dropout=0.1).dropout == 0.1
    assert TrainConfig.from_dict(TrainConfig(num_layers=1).to_dict()).dropout == 0.0
    rc, so, se = train(capsys, text_file, str(tmp_path / "one"), "--num-layers", "1", "--steps", "1")
    assert rc == 0, se
    assert state_of(str(tmp_path / "one"))["step"] == 1


def test_write_output_reports_a_failed_write_as_one_line(capsys, tmp_path):
    from lstmkit.cli import write_output
    target = tmp_path / "missing_dir" / "out.png"
    assert write_output("lesson", str(target), lambda: open(target, "wb").close()) is False
    err = capsys.readouterr().err
    assert err == f"lesson: error: cannot write {str(target)!r}: No such file or directory\n"
    ok = tmp_path / "ok.png"
    assert write_output("lesson", str(ok), lambda: ok.write_bytes(b"x")) is True
    assert ok.read_bytes() == b"x" and capsys.readouterr().err == ""
