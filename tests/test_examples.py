"""The runnable lessons in examples/, run as a user runs them (a fresh Python process), kept short."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="error::RuntimeWarning,error::DeprecationWarning")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_tutorial_shapes_match_pytorch():
    out, err = run_example("tutorial_shapes.py")
    assert "lstmkit" not in err                       # no warning from our code
    lines = out.splitlines()
    ours = lines[:lines.index("torch.nn.LSTM (same weights)")] if "torch.nn.LSTM (same weights)" in lines else lines
    text = "\n".join(ours)
    assert re.search(r"output\s+\(4, 6, 128\)", text)
    assert re.search(r"h_n\s+\(6, 4, 64\)", text)
    assert re.search(r"c_n\s+\(6, 4, 256\)", text)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    theirs = "\n".join(lines[lines.index("torch.nn.LSTM (same weights)"):])
    assert re.search(r"output\s+\(4, 6, 128\)", theirs) and re.search(r"c_n\s+\(6, 4, 256\)", theirs)
    diff = float(re.search(r"largest difference from lstmkit: (\S+)", theirs).group(1))
    assert diff < 1e-4                                # float32, three layers, both directions


def test_text_lstm_predicts_every_third_word():
    out, err = run_example("text_lstm.py")
    assert err == ""
    costs = [float(c) for c in re.findall(r"Epoch: \d{4} cost = (\S+)", out)]
    assert len(costs) == 5                            # every 100 of 500 epochs
    assert costs[-1] < costs[0] and costs[-1] < 0.1
    expected = {"i like": "dog", "i love": "coffee", "i hate": "milk",
                "you like": "cat", "you love": "milk", "you hate": "coffee"}
    predicted = dict(re.findall(r"^(\w+ \w+) -> (\w+)$", out, flags=re.M))
    assert predicted == expected
    assert "6/6 right" in out


def test_min_char_lstm_learns_mujeong_briefly():
    out, err = run_example("min_char_lstm.py", "--steps", 200, "--sample-every", 100, "--sample-length", 60)
    assert err == ""
    m = re.search(r"data has (\d+) characters, (\d+) unique", out)
    V = int(m.group(2))
    assert int(m.group(1)) > 300_000 and V > 1000     # the whole novel, ~1,700 distinct characters
    samples = re.findall(r"----\n (.*?) \n----", out, flags=re.S)
    assert len(samples) == 3                          # at steps 0, 100, 200
    assert all(len(s) == 60 for s in samples)
    assert any("\uac00" <= ch <= "\ud7a3" for ch in samples[-1])   # Hangul syllables
    losses = [float(x) for x in re.findall(r"iter \d+, loss: (\S+)", out)]
    assert losses[0] == pytest.approx(25 * math.log(V), rel=1e-3)   # min-char-rnn's starting point
    assert losses[-1] < losses[0]
    per_char = float(re.search(r"last 100 steps: (\S+) nats", out).group(1))
    assert per_char < 0.75 * math.log(V)              # well below a uniform guess (7.4 nats)


def test_how_it_works_quotes_are_verbatim():
    """Every code block in docs/how-it-works.md marked `<!-- quote: FILE -->` appears in FILE, its
    lines in the same order and indentation, so the page cannot drift from the code it explains."""
    doc = (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    quotes = re.findall(r"<!-- quote: (\S+) -->\n```python\n(.*?)```", doc, flags=re.S)
    assert len(quotes) >= 10
    for path, block in quotes:
        source = (ROOT / path).read_text(encoding="utf-8").splitlines()
        pos = 0
        for line in block.splitlines():
            if not line.strip():
                continue
            try:
                pos = source.index(line, pos) + 1
            except ValueError:
                raise AssertionError(f"{path} has no line {line!r} (after line {pos})") from None
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", doc):
        with open(ROOT / "docs" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png


def test_rows_classifier_gated_cells_read_digits():
    out, _ = run_example("rows_classifier.py", "--epochs", "15", timeout=300)
    acc = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(RNN|GRU|LSTM)\s+([\d.]+)%", out, re.M)}
    assert set(acc) == {"RNN", "GRU", "LSTM"}
    assert acc["LSTM"] > 90 and acc["GRU"] > 90          # 15 epochs, a third of the default: still well above chance
