"""What a user of char-rnn or nanoGPT expects of a run: budgets that mean "more" on --resume, the best
checkpoint kept beside the last, starting from a trained model (--init-from), learning-rate schedules,
and `sample`'s -n / --out; plus the small things the progress bar and --version say."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lstmkit import config as C
from lstmkit.checkpoint import load_checkpoint, resolve
from lstmkit.cli import main
from lstmkit.train import Trainer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 12
SMALL = ["--hidden-size", "16", "--batch-size", "4", "--seq-len", "16", "--sample-length", "0",
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


def state_of(run_dir, which="last"):
    return json.loads(Path(resolve(run_dir, which), "state.json").read_text())


def test_resume_budget_flags_mean_more_and_a_finished_run_says_so(capsys, tmp_path, text_file):
    out = str(tmp_path / "run")
    assert run(capsys, "train", "--data", text_file, "--out", out, *SMALL, "--steps", "3")[0] == 0
    rc, so, _ = run(capsys, "train", "--resume", out, "--no-progress")
    assert rc == 0 and "nothing to do" in so and "--steps" in so
    assert state_of(out)["step"] == 3
    assert run(capsys, "train", "--resume", out, "--steps", "2", "--no-progress")[0] == 0
    assert state_of(out)["step"] == 5
    assert run(capsys, "train", "--resume", out, "--epochs", "1", "--no-progress")[0] == 0
    chunks = (len(TEXT) * 0.95 // 4 - 1) // 16
    assert state_of(out)["step"] == 5 + chunks
    before = state_of(out)["elapsed_s"]
    rc, so, _ = run(capsys, "train", "--resume", out, "--minutes", "0.01", "--no-progress")
    assert rc == 0 and state_of(out)["step"] > 5 + chunks
    assert state_of(out)["elapsed_s"] >= before + 0.6            # 0.01 more minutes of training


def test_an_interrupted_run_resumed_without_flags_finishes_its_budget(tmp_path, text_file):
    cfg = C.TrainConfig(data=text_file, hidden_size=8, batch_size=4, seq_len=16, steps=6, sample_length=0,
                        eval_every=2)
    t = Trainer(cfg, str(tmp_path / "r"), progress=False, out=open("/dev/null", "w"))
    t.stop_signal = None
    orig = t._train_step

    def stop_after_two():
        loss = orig()
        if t.step == 2:
            t.stop_signal = 2
        return loss
    t._train_step = stop_after_two
    assert t.run()["status"] == "interrupted" and state_of(str(tmp_path / "r"))["step"] == 2
    r = Trainer(C.TrainConfig(), str(tmp_path / "r"), resume=str(tmp_path / "r"), progress=False,
                out=open("/dev/null", "w")).run()
    assert r["status"] == "done" and r["step"] == 6


def test_the_best_state_is_kept_beside_the_last_and_sample_eval_use_it(capsys, tmp_path, text_file, monkeypatch):
    scores = iter([3.0, 2.0, 2.5, 2.7])
    monkeypatch.setattr(Trainer, "validate", lambda self: next(scores))
    out = str(tmp_path / "run")
    rc, so, _ = run(capsys, "train", "--data", text_file, "--out", out, *SMALL, "--steps", "8", "--eval-every", "2")
    assert rc == 0 and "(best)" in so and "best 2.0000" in so
    assert state_of(out, "best")["step"] == 4 and state_of(out, "last")["step"] == 8
    best, _, _ = load_checkpoint(out, which="best")
    last, _, _ = load_checkpoint(out, which="last")
    assert not np.array_equal(best.params["decoder.bias"], last.params["decoder.bias"])
    monkeypatch.undo()
    a = run(capsys, "eval", out, "--data", text_file, "--json")
    b = run(capsys, "eval", out, "--data", text_file, "--json", "--last")
    assert a[0] == b[0] == 0 and json.loads(a[1])["loss_nats"] != json.loads(b[1])["loss_nats"]
    from lstmkit.evaluate import score_text
    assert json.loads(a[1])["loss_nats"] == pytest.approx(score_text(best, load_checkpoint(out)[1], TEXT)["loss_nats"])


def test_init_from_starts_a_new_run_from_the_best_weights(capsys, tmp_path, text_file):
    base = str(tmp_path / "base")
    assert run(capsys, "train", "--data", text_file, "--out", base, *SMALL, "--steps", "4", "--eval-every", "2")[0] == 0
    new_text = tmp_path / "new.txt"
    new_text.write_text("Speak, speak. All resolved.\n" * 30, encoding="utf-8")
    ft = str(tmp_path / "ft")
    rc, so, se = run(capsys, "train", "--init-from", base, "--data", str(new_text), "--out", ft,
                     "--batch-size", "2", "--seq-len", "8", "--steps", "1", "--eval-every", "1", "--sample-length",
                     "0", "--no-progress", "--lr", "1e-12")
    assert rc == 0, se
    start, tok, cfg = load_checkpoint(base, which="best")
    tuned, tok2, cfg2 = load_checkpoint(ft, which="last")
    assert tok2.vocab == tok.vocab and cfg2["train"]["hidden_size"] == 16
    assert cfg2["data"]["init_from"]["run_id"] == cfg["run_id"] != cfg2["run_id"]
    for k in start.params:                                        # lr 1e-12: one step moves nothing visible
        np.testing.assert_allclose(tuned.params[k], start.params[k], atol=1e-6, err_msg=k)
    assert state_of(ft)["step"] == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("Speak, Ωmega!\n" * 40, encoding="utf-8")
    rc, _, se = run(capsys, "train", "--init-from", base, "--data", str(bad), "--out", str(tmp_path / "x"),
                    "--steps", "1", "--no-progress")
    assert rc == 2 and se.count("\n") == 1 and "not in the model's vocabulary" in se and "'Ω'" in se
    rc, _, se = run(capsys, "train", "--init-from", base, "--data", str(new_text), "--out", str(tmp_path / "y"),
                    "--hidden-size", "32", "--steps", "1", "--no-progress")
    assert rc == 2 and "--hidden-size 32 differs from the --init-from checkpoint's 16" in se
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_learning_rate_schedules_in_the_trainer(tmp_path, text_file):
    def lrs(**kw):
        cfg = C.TrainConfig(data=text_file, hidden_size=8, batch_size=4, seq_len=16, steps=10, **kw)
        t = Trainer(cfg, str(tmp_path / "unused"), progress=False)
        out = []
        for s in range(10):
            t.step = s
            out.append(t._lr())
        return out
    assert lrs() == [C.DEFAULT_LR["adam"]] * 10
    warm = lrs(lr=1.0, warmup_steps=4, lr_schedule="cosine", min_lr=0.1)
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4] == pytest.approx(1.0)
    assert warm[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / 6)))
    assert lrs(lr=1.0, lr_schedule="step", lr_decay=0.5, lr_decay_every=4)[8] == 0.25
    with pytest.raises(C.ConfigError, match="--lr-decay 0.5 needs --lr-schedule step"):
        C.validate(C.TrainConfig(lr_decay=0.5))


def test_lr_decay_alone_asks_for_the_step_schedule(capsys, tmp_path, text_file):
    out = str(tmp_path / "r")
    assert run(capsys, "train", "--data", text_file, "--out", out, *SMALL, "--steps", "1", "--lr-decay", "0.5",
               "--weight-decay", "0.01", "--beta2", "0.99")[0] == 0
    saved = load_checkpoint(out)[2]["train"]
    assert saved["lr_schedule"] == "step" and saved["weight_decay"] == 0.01 and saved["beta2"] == 0.99


def test_sample_several_and_to_a_file(capsys, tmp_path, text_file):
    out = str(tmp_path / "run")
    assert run(capsys, "train", "--data", text_file, "--out", out, *SMALL, "--steps", "2")[0] == 0
    rc, one, _ = run(capsys, "sample", out, "--seed", "3", "--length", "40")
    rc3, three, _ = run(capsys, "sample", out, "--seed", "3", "--length", "40", "-n", "3")
    assert rc == rc3 == 0
    parts = three.split("\n-----\n")
    assert len(parts) == 3 and parts[0] + "\n" == one and len(set(parts)) == 3
    dest = tmp_path / "samples.txt"
    rc, so, se = run(capsys, "sample", out, "--seed", "3", "--length", "40", "-n", "3", "--out", str(dest))
    assert rc == 0 and so == "" and dest.read_text(encoding="utf-8") == three
    rc, _, se = run(capsys, "sample", out, "--out", str(dest))
    assert rc == 2 and "exists" in se and dest.read_text(encoding="utf-8") == three
    assert C.SAMPLE_TEMPERATURE == C.TrainConfig().sample_temperature


def test_version_and_a_light_start(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "lstmkit 0.1.0"
    # the CLI module loads without NumPy or Numba, so a Ctrl-C while it starts is caught by main()
    probe = "import sys, lstmkit.cli; print('numpy' in sys.modules, 'numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_progress_bar_words(capsys, tmp_path, text_file):
    out = str(tmp_path / "run")
    rc, so, se = run(capsys, "train", "--data", text_file, "--out", out, "--hidden-size", "8", "--batch-size", "4",
                     "--seq-len", "16", "--minutes", "0.03", "--sample-length", "0", "--eval-every", "100000")
    assert rc == 0
    assert "s of training" in se and not re.search(r"\ds/s", se) and "nan" not in se   # tqdm's "1.07s/s" is gone
    assert "0.03 minutes" in so
    from lstmkit.trainer import plural
    assert plural(1, "minute") == "1 minute" and plural(2.5, "minute") == "2.5 minutes"
