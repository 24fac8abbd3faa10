"""Scoring a text (evaluate.py): one stream with the state carried, equal to feeding the text one token
at a time; the call length changes nothing; unknown symbols skipped and counted, or refused."""

import json
import math

import numpy as np
import pytest

from lstmkit.cli import main
from lstmkit.evaluate import ScoreError, evaluate, score_text
from lstmkit.model import LanguageModel
from lstmkit.tokenizers import build_tokenizer

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 4


@pytest.fixture(scope="module")
def lm():
    tok = build_tokenizer("char", TEXT)
    model = LanguageModel(tok.vocab_size, 12, 2, 0.3, seed=3, dtype=np.float64)
    return model, tok


def token_by_token(model, ids):
    """The definition: -log p(ids[k] | ids[:k]) fed one token at a time, averaged over k >= 1."""
    z, state = model.step_logits(ids[0])
    total = 0.0
    for k in range(1, len(ids)):
        total -= z[ids[k]] - (np.log(np.exp(z - z.max()).sum()) + z.max())
        z, state = model.step_logits(ids[k], state)
    return total / (len(ids) - 1)


def test_one_stream_equals_token_by_token_for_any_call_length(lm):
    model, tok = lm
    ids = tok.encode(TEXT[:31])
    model.eval()
    expected = token_by_token(model, ids)
    model.train()
    for seq_len in (1, 5, 30, 512):
        nats, n = evaluate(model, ids, seq_len)
        assert n == len(ids) - 1
        assert nats == pytest.approx(expected, rel=1e-12)
    assert model.lstm.training                    # left in the mode it was in


def test_bits_per_char_of_a_short_text(lm):
    model, tok = lm
    res = score_text(model, tok, TEXT[:31])
    assert res["tokens"] == 30 and res["characters"] == 31 and res["unknown"] == 0
    assert res["bits_per_char"] == pytest.approx(res["loss_nats"] / math.log(2) * 31 / 31)


def test_unknown_symbols_are_skipped_and_counted(lm):
    model, tok = lm
    noisy = "the cat Ω sat on ΩΩ the mat"
    res = score_text(model, tok, noisy)
    clean = score_text(model, tok, noisy.replace("Ω", ""))
    assert res["unknown"] == 3 and res["unknown_symbols"] == ["Ω"]
    assert res["loss_nats"] == clean["loss_nats"] and res["tokens"] == clean["tokens"]
    assert res["characters"] == len(noisy) - 3
    with pytest.raises(ScoreError, match=r"1 symbol\(s\) not in the model's vocabulary: 'Ω'"):
        score_text(model, tok, noisy, unknown="error")


def test_word_tokenizer_reads_unknown_words_as_unk(lm):
    tok = build_tokenizer("word", TEXT)
    model = LanguageModel(tok.vocab_size, 8, 1, seed=0)
    res = score_text(model, tok, "the zebra sat on the unicorn")
    assert res["unknown"] == 2 and res["unknown_symbols"] == ["unicorn", "zebra"]
    assert res["tokens"] == 5 and "perplexity" in res


def test_eval_command_skips_unknown_by_default_and_errors_on_request(capsys, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(data), "--out", out, "--hidden-size", "8", "--batch-size", "2",
                 "--seq-len", "8", "--steps", "2", "--sample-length", "0", "--no-progress"]) == 0
    held = tmp_path / "held.txt"
    held.write_text("the cat 猫 sat.\nthe 犬 dog", encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", out, "--data", str(held), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["unknown"] == 2 and sorted(res["unknown_symbols"]) == ["犬", "猫"]
    assert main(["eval", out, "--data", str(held)]) == 0
    assert "2 unknown token(s) skipped" in capsys.readouterr().out
    assert main(["eval", out, "--data", str(held), "--unknown", "error"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 symbol(s) not in the model's vocabulary" in err
