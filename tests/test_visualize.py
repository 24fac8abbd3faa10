"""The visualize lesson: a self-contained page, cells ranked by a stated score, and the page driven in
real headless Chromium (Debian's `chromium`; the tests never install it: they skip when it is missing,
and .ci/run installs it so that CI runs them): switch cells through the
URL, check the colours the page's script painted against the model's activations, take a screenshot
and check it is not blank."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from lstmkit import visualize as vis
from lstmkit.checkpoint import save_checkpoint
from lstmkit.model import LanguageModel
from lstmkit.tokenizers import build_tokenizer

TEXT = ('He said "hello (my old) friend" and left.\nShe said "goodbye" twice, then (quietly) sat down.\n'
        'A long line without any quotes at all, to count the position in the line.\n') * 3
HANGUL = '형식은 "처음 보입니다" 하고 인사를 한다.\n'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vis")
    tok = build_tokenizer("char", TEXT)
    model = LanguageModel(tok.vocab_size, hidden_size=12, num_layers=2, seed=0)
    save_checkpoint(str(d / "run"), model=model, tokenizer=tok, config={}, run_id="test", step=0)
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    return d, model, tok


@pytest.fixture(scope="module")
def page(ckpt, tmp_path_factory):
    d, _, _ = ckpt
    out = d / "page.html"
    assert vis.main([str(d / "run"), "--text", str(d / "text.txt"), "--out", str(out)]) == 0
    return out


# ---- without a browser -----------------------------------------------------------------------

def test_page_is_self_contained(page):
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>\n" + vis.MARKER.decode())
    for needle in ("http:", "https:", "<link", " src=", "@import", "url(", "@font-face"):
        assert needle not in html, needle                 # nothing fetched from anywhere
    assert html.count('<span data-u="') == len(TEXT)    # every character shown and coloured
    assert "Gate saturation" in html and html.count("<svg") == 2 * 4   # 2 layers x i, f, g, o


def test_text_features():
    units = list('ab "c(d)" e\nf')
    f = vis.text_features(units)
    assert f["inside quotes"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert f["inside parentheses"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert f["position in line"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1]
    assert f["position in word"].tolist() == [1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1]


def test_interpretable_cells_are_ranked_first():
    units = list(TEXT)
    feats = vis.text_features(units)
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((len(units), 4))
    acts[:, 2] = 0.5 - feats["inside quotes"] + 0.01 * rng.standard_normal(len(units))   # a quote cell
    acts[:, 3] = 0.0                                                                      # a dead cell
    score, names, r = vis.interpretability(acts, feats)
    assert np.argmax(score) == 2 and names[2] == "inside quotes"
    assert score[2] > 0.99 and r[2] < 0                 # anti-correlated, and the score says so
    assert score[3] == 0 and max(score[0], score[1]) < 0.3


def test_jamo_and_word_models_show_whole_characters_and_words():
    jamo = build_tokenizer("jamo", HANGUL)
    units, last = vis.display_units(jamo, HANGUL)
    assert "".join(units) == HANGUL
    assert last[-1] == len(jamo.encode(HANGUL)) - 1 and len(jamo.encode(HANGUL)) > len(HANGUL)
    assert last[1] - last[0] == len(jamo.tokenize("식"))   # a syllable spans its jamo
    word = build_tokenizer("word", TEXT)
    units, last = vis.display_units(word, "She said hello\nto me")
    assert units == ["She", " ", "said", " ", "hello", "\n", "to", " ", "me"]
    assert last.tolist() == [0, -1, 1, -1, 2, 3, 4, -1, 5]


@pytest.mark.parametrize("extra, message", [
    (["--text", "/nonexistent.txt"], "does not exist"),
    (["--text", "TEXTFILE", "--max-chars", "0"], "--max-chars"),
    (["--text", "KOREAN"], "not in the model's vocabulary"),
    (["--text", "TEXTFILE", "--out", "/nonexistent-dir/p.html"], "does not exist"),
    (["--text", "TEXTFILE", "--out", "NOTES"], "refusing to overwrite"),
])
def test_bad_input_gives_one_line(ckpt, extra, message, capsys, tmp_path):
    d, _, _ = ckpt
    (tmp_path / "k.txt").write_text(HANGUL, encoding="utf-8")
    notes = tmp_path / "notes.html"
    notes.write_text("mine")
    subst = {"TEXTFILE": str(d / "text.txt"), "KOREAN": str(tmp_path / "k.txt"), "NOTES": str(notes)}
    assert vis.main([str(d / "run")] + [subst.get(a, a) for a in extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert notes.read_text() == "mine"


def test_a_failed_write_keeps_the_old_page_and_leaves_no_temporary(ckpt, tmp_path, capsys, monkeypatch):
    d, _, _ = ckpt
    out = tmp_path / "p.html"
    out.write_text(vis.MARKER.decode() + " an older page")

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    assert vis.main([str(d / "run"), "--text", str(d / "text.txt"), "--out", str(out), "--max-chars", "20"]) == 1
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["p.html"] and out.read_text().endswith("an older page")


def test_missing_checkpoint(tmp_path, capsys):
    assert vis.main([str(tmp_path / "nope"), "--text", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- in Chromium -------------------------------------------------------------------------------

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        msg = "no chromium on PATH: these tests drive a real headless browser (Debian: apt-get install chromium)"
        if os.environ.get("CI"):       # .ci/run installs it, so in CI a missing browser is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _chromium(chromium, tmp_path, *args):
    proc = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


SPAN = re.compile(r'<span data-u="(\d+)" style="background-color: rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\);">')


def test_activations_are_the_models_own_h_and_c(ckpt):
    _, model, tok = ckpt
    ids = tok.encode(TEXT[:60])
    layers = vis.activations(model, ids)
    _, (h_T, c_T), cache = model.forward(ids[:, None])
    c = [np.array(lc[0]["c"][:, 0]) for lc in cache["lstm"]]         # (T, H) per layer, from the model's cache
    out, _ = model.lstm(model.embedding[ids[:, None]])               # (T, 1, H): the top layer's h
    np.testing.assert_allclose(layers[-1]["h"], out[:, 0], rtol=1e-5, atol=1e-6)
    for l, acts in enumerate(layers):
        np.testing.assert_allclose(acts["c"], c[l], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(acts["h"][-1], h_T[l, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts["c"][-1], c_T[l, 0], rtol=1e-5, atol=1e-6)
    assert np.abs(layers[-1]["h"]).max() > 1e-3                      # not two zeros agreeing


def _expected_codes(model, tok, layer, kind, cell):
    layers = vis.activations(model, tok.encode(TEXT))
    q, _ = vis._quantise(layers[layer][kind], kind)
    return q[:, cell].astype(int)


@pytest.mark.parametrize("layer, kind, cell", [(1, "c", 5), (0, "f", 2), (1, "h", 11)])
def test_switching_cells_repaints_the_text(chromium, page, ckpt, tmp_path, layer, kind, cell):
    _, model, tok = ckpt
    dom = _chromium(chromium, tmp_path, "--dump-dom", f"{page.as_uri()}#layer={layer}&kind={kind}&cell={cell}")
    assert f'data-selected="{layer}:{kind}:{cell}"' in dom
    painted = {int(m[0]): (int(m[1]), int(m[2]), int(m[3]), float(m[4]) if m[4] else 1.0)
               for m in SPAN.findall(dom)}
    assert sorted(painted) == list(range(len(TEXT)))   # the script coloured every character
    q = _expected_codes(model, tok, layer, kind, cell)
    assert len(set(q.tolist())) > 5                    # the cell varies, so the check below can fail
    for u, (r, g, b, a) in painted.items():
        if kind in vis.SIGNED:
            if q[u] != 0:
                assert (r, g, b) == ((220, 50, 32) if q[u] > 0 else (30, 100, 220))
            assert a == pytest.approx(abs(q[u]) / 127, abs=0.005)   # the browser keeps alpha in 8 bits
        else:
            assert (r, g, b) == (20, 150, 60)
            assert a == pytest.approx((q[u] + 127) / 254, abs=0.005)   # the browser keeps alpha in 8 bits


def test_default_view_is_the_top_ranked_cell(chromium, page, tmp_path):
    dom = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    first = re.search(r'<li><a href="#layer=(\d+)&amp;kind=(\w)&amp;cell=(\d+)"', dom)
    assert first and f'data-selected="{first[1]}:{first[2]}:{first[3]}"' in dom


def test_screenshot_is_not_blank(chromium, page, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium(chromium, tmp_path, "--window-size=1200,900", "--hide-scrollbars", f"--screenshot={shot}",
              f"{page.as_uri()}#layer=1&kind=c&cell=5")
    from PIL import Image                                 # matplotlib's own dependency
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (900, 1200, 3)
    colours = {tuple(p) for p in img.reshape(-1, 3)[::7]}
    assert len(colours) > 100                             # text, controls, histograms: not one flat colour
    assert np.mean(img.sum(axis=2) < 3 * 250) > 0.03     # more than 3% of the page is not white
    reddish = (img[:, :, 0] - img[:, :, 2] > 40).sum()
    bluish = (img[:, :, 2] - img[:, :, 0] > 40).sum()
    assert reddish > 200 and bluish > 200                 # the text is painted both signs of c


def test_reached_through_the_lstmkit_command(ckpt, tmp_path, capsys):
    from lstmkit.cli import main as cli_main
    d, _, _ = ckpt
    out = tmp_path / "p.html"
    assert cli_main(["visualize", str(d / "run"), "--text", str(d / "text.txt"), "--out", str(out),
                     "--max-chars", "50"]) == 0
    assert out.read_text(encoding="utf-8").count('<span data-u="') == 50
    assert cli_main(["visualize", "--help"]) == 0
    assert "--max-chars" in capsys.readouterr().out
