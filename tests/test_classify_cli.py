"""`lstmkit classify train | eval | predict` end to end on a small labelled file: training, the best
state, an exact resume, the metrics against a count by hand, prediction from a file and from
standard input, and every kind of bad input (one line on stderr, exit 2, nothing written)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lstmkit.checkpoint import load_checkpoint, resolve
from lstmkit.classifier import SequenceClassifier
from lstmkit.cli import main

POS = ["좋아요 최고", "재밌다 강추", "감동 최고 영화", "훌륭한 연기", "또 보고 싶다"]
NEG = ["별로다 노잼", "지루하다", "최악 돈아깝다", "시간 낭비", "실망했다"]
SMALL = ["--hidden-size", "8", "--embed-size", "6", "--batch-size", "8", "--no-progress", "--show", "2"]


def write_tsv(path, n, seed=0, header="id\tdocument\tlabel", labels=("neg", "pos")):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(rng.integers(2))
        rows.append(f"{i}\t{(POS if y else NEG)[rng.integers(5)]}\t{labels[y]}")
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_tsv(tmp_path / "train.tsv", 200)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *words):
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lstmkit: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def state_of(run_dir, which="last"):
    return json.loads(Path(resolve(run_dir, which), "state.json").read_text())


def test_train_eval_predict(capsys, tmp_path, data):
    out = str(tmp_path / "run")
    rc, so, se = run(capsys, "classify", "train", "--data", data, "--out", out, *SMALL, "--steps", "40",
                     "--eval-every", "10", "--val-frac", "0.2", "--cell", "gru", "--pool", "mean")
    assert rc == 0, se
    assert "accuracy (best)" in so and "classes neg, pos" in so and "validation rows: predicted label" in so
    model, tok, config = load_checkpoint(out, format=SequenceClassifier.FORMAT)
    assert config["classes"] == ["neg", "pos"] and model.cell == "gru" and model.pool == "mean"

    test = write_tsv(tmp_path / "test.tsv", 60, seed=1)
    rc, so, se = run(capsys, "classify", "eval", out, "--data", test, "--json")
    assert rc == 0, se
    res = json.loads(so)
    M = np.array(res["confusion"])
    assert M.sum() == 60 and res["accuracy"] == pytest.approx(np.trace(M) / 60)
    assert res["precision"][1] == pytest.approx(M[1, 1] / M[:, 1].sum() if M[:, 1].sum() else 0.0)
    assert res["recall"][0] == pytest.approx(M[0, 0] / M[0].sum())
    assert res["accuracy"] > 0.9                                     # ten phrases, two classes: learnable

    texts = tmp_path / "in.txt"
    texts.write_text("좋아요 최고\n지루하다\n처음 보는 글자 😀\n", encoding="utf-8")
    rc, so, se = run(capsys, "classify", "predict", out, str(texts))
    lines = so.splitlines()
    assert rc == 0 and len(lines) == 3 and lines[0].split("\t")[0] == "pos" and lines[1].split("\t")[0] == "neg"
    assert all(0.5 <= float(line.split("\t")[1]) <= 1 for line in lines)
    rc, so, _ = run(capsys, "classify", "predict", out, str(texts), "--json")
    rows = [json.loads(line) for line in so.splitlines()]
    assert [r["label"] for r in rows] == [line.split("\t")[0] for line in lines]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in rows)


def test_stop_and_resume_equals_uninterrupted(capsys, tmp_path, data):
    common = [*SMALL, "--eval-every", "4", "--num-layers", "2", "--dropout", "0.3", "--val-frac", "0.1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run(capsys, "classify", "train", "--data", data, "--out", full, "--steps", "30", *common)[0] == 0
    assert run(capsys, "classify", "train", "--data", data, "--out", part, "--steps", "13", *common)[0] == 0
    rc, so, se = run(capsys, "classify", "train", "--resume", part, "--steps", "17", "--no-progress")
    assert rc == 0, se
    assert "resuming" in so
    a = load_checkpoint(full, which="last", format=SequenceClassifier.FORMAT)[0]
    b = load_checkpoint(part, which="last", format=SequenceClassifier.FORMAT)[0]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert state_of(full)["history"]["loss"] == state_of(part)["history"]["loss"]
    assert state_of(full)["data_position"] == state_of(part)["data_position"]


def test_the_best_state_is_the_best_accuracy(capsys, tmp_path, data, monkeypatch):
    from lstmkit.classify_train import ClassifierTrainer
    scores = iter([0.5, 0.9, 0.7])
    monkeypatch.setattr(ClassifierTrainer, "validate", lambda self: next(scores))
    out = str(tmp_path / "run")
    assert run(capsys, "classify", "train", "--data", data, "--out", out, *SMALL, "--steps", "6",
               "--eval-every", "2")[0] == 0
    assert state_of(out, "best")["step"] == 4 and state_of(out, "last")["step"] == 6


@pytest.mark.parametrize("content,words", [
    (b"id\ttext_x\tlabel\n1\thello\t0\n", ["no text column 'document'", "text_x"]),
    (b"id\tdocument\tstars\n1\thello\t0\n", ["no label column 'label'", "stars"]),
    (b"id\tdocument\tlabel\n1\thello\t0\n2\tbye\t0\n", ["one class only", "'0'"]),
    (b"id\tdocument\tlabel\n1\thello\t0\n2\t  \t1\n", ["line 3: the text is empty"]),
    (b"id\tdocument\tlabel\n1\th\xffello\t0\n", ["not valid UTF-8", "0xff"]),
    (b"id\tdocument\tlabel\n", ["no rows under its header"]),
])
def test_bad_training_data(capsys, tmp_path, content, words):
    p = tmp_path / "bad.tsv"
    p.write_bytes(content)
    out = tmp_path / "run"
    one_line_error(*run(capsys, "classify", "train", "--data", str(p), "--out", str(out), *SMALL)[::2], *words)
    assert not out.exists()


def test_eval_with_labels_the_model_never_saw_and_bad_predict_input(capsys, tmp_path, data):
    out = str(tmp_path / "run")
    assert run(capsys, "classify", "train", "--data", data, "--out", out, *SMALL, "--steps", "2")[0] == 0
    other = write_tsv(tmp_path / "other.tsv", 20, labels=("neg", "neutral"))
    one_line_error(*run(capsys, "classify", "eval", out, "--data", other)[::2], "never saw", "'neutral'")
    csv = tmp_path / "x.csv"
    csv.write_text('text,label\n"좋아요, 최고",pos\n지루하다,neg\n', encoding="utf-8")
    rc, so, se = run(capsys, "classify", "eval", out, "--data", str(csv), "--json", "--text-column", "text")
    assert rc == 0 and json.loads(so)["rows"] == 2, se                 # CSV with a quoted comma
    blank = tmp_path / "blank.txt"
    blank.write_text("좋아요\n\n별로\n", encoding="utf-8")
    one_line_error(*run(capsys, "classify", "predict", out, str(blank))[::2], "line 2 is empty")
    one_line_error(*run(capsys, "classify", "predict", out, str(tmp_path / "none.txt"))[::2], "cannot read")
    lm = str(tmp_path / "lm")
    text = tmp_path / "t.txt"
    text.write_text("abc def\n" * 50, encoding="utf-8")
    assert run(capsys, "train", "--data", str(text), "--out", lm, "--hidden-size", "4", "--batch-size", "2",
               "--seq-len", "4", "--steps", "1", "--sample-length", "0", "--no-progress")[0] == 0
    one_line_error(*run(capsys, "classify", "eval", lm, "--data", data)[::2], "holds a language model")
    one_line_error(*run(capsys, "sample", out)[::2], "holds a classifier")


def test_builtin_reviews_are_shipped():
    from lstmkit.labelled import read_labelled
    train = read_labelled("nsmc")
    test = read_labelled("nsmc-test", classes=train.classes)
    assert len(train.texts) == 150_000 and len(test.texts) == 50_000 and train.classes == ["0", "1"]
    assert abs(float(np.mean(train.labels)) - 0.5) < 0.01
    assert os.path.getsize(Path(__file__).parents[1] / "lstmkit" / "corpora" / "nsmc_train.tsv.gz") < 8_000_000
