"""The gradient-flow lesson: the probe's gradients are the true ∂L/∂h_t, the LSTM keeps gradient the
RNN loses, the LSTM learns the memory task the RNN fails, and the command writes a real PNG."""

import struct

import numpy as np
import pytest

from lstmkit import gradient_flow as gf


def _restart_grad(clf, x, y, j):
    """∂L/∂(state after j steps), the slow way: run j steps, restart from that state, read grad_h_0."""
    net = clf.net
    N, B, _ = x.shape
    state = None
    if j > 0:
        _, state = net(x[:j])
    out, _ = net(x[j:], state)
    z = out[-1] @ clf.W.T + clf.b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(B), y] -= 1.0
    dout = np.zeros_like(out)
    dout[-1] = (p / B) @ clf.W
    _, grad_state = net.backward(dout)
    grad_h0 = grad_state[0] if clf.kind == "lstm" else grad_state
    return grad_h0[0]


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_probe_gives_the_gradient_for_every_hidden_state(kind, backend):
    rng = np.random.default_rng(1)
    clf = gf.Classifier(kind, 6, 3, seed=2, t_max=20)
    x, y = gf.memory_task(rng, 4, 12, 3)
    dh = gf.hidden_state_grads(clf, x, y)
    assert dh.shape == (13, 4, 6)
    for j in (0, 1, 5, 11):
        expected = _restart_grad(clf, x, y, j)
        assert np.abs(expected).max() > 1e-12          # a real gradient, not two zeros agreeing
        np.testing.assert_allclose(dh[j], expected, rtol=1e-9, atol=1e-15)


def test_lstm_keeps_the_gradient_the_rnn_loses():
    x, y = gf.memory_task(np.random.default_rng(0), 8, 101, 4)
    norms = {kind: gf.gradient_norms(gf.Classifier(kind, 16, 4, seed=0, t_max=100), x, y) for kind in gf.KINDS}
    assert all(n.shape == (102,) and np.isfinite(n).all() for n in norms.values())
    # The RNN's gradient shrinks geometrically (by far more than 1e-10 over 100 steps) ...
    assert norms["rnn"][100] < 1e-10 * norms["rnn"][1]
    # ... the LSTM's, through cells whose forget gates are near 1, does not.
    assert norms["lstm"][100] > 1e-2 * norms["lstm"][1]
    assert norms["lstm"][100] > 1e8 * norms["rnn"][100]


def test_chrono_init_sets_forget_and_input_biases():
    clf = gf.Classifier("lstm", 8, 2, seed=0, lstm_init="chrono", t_max=50)
    H = 8
    b = clf.net.bias_ih_l0 + clf.net.bias_hh_l0
    assert np.all(b[H:2 * H] >= 0) and np.all(b[H:2 * H] <= np.log(49) + 1e-12)
    np.testing.assert_allclose(b[:H], -b[H:2 * H])
    default = gf.Classifier("lstm", 8, 2, seed=0, lstm_init="default")
    assert np.abs(default.net.bias_ih_l0).max() <= 1 / np.sqrt(8)   # torch's U(-1/√H, 1/√H)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == gf.PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_command_trains_both_nets_prints_table_and_writes_png(tmp_path, capsys):
    out = tmp_path / "gf.png"
    rc = gf.main(["--out", str(out), "--lengths", "5,40", "--hidden-size", "16", "--steps", "250",
                  "--k-max", "60", "--seed", "0"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0 and stderr == ""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].endswith("%"):
            rows[int(parts[0])] = (float(parts[1][:-1]) / 100, float(parts[2][:-1]) / 100)
    assert set(rows) == {5, 40}
    assert rows[5][0] >= 0.9 and rows[5][1] >= 0.9       # both learn a short distance
    assert rows[40][1] >= 0.9                              # the LSTM remembers over 40 steps
    assert rows[40][0] <= 0.4                              # the RNN is at chance (0.25)
    assert "‖∂L/∂h_{T-k}‖" in stdout
    assert _png_size(out) == (1200, 450)
    from PIL import Image                                 # matplotlib's own dependency
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    red = np.all(np.abs(img - [214, 39, 40]) < 30, axis=2).sum()      # tab:red, the RNN
    blue = np.all(np.abs(img - [31, 119, 180]) < 30, axis=2).sum()    # tab:blue, the LSTM
    assert red > 500 and blue > 500


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "abc"], "comma-separated integers"),
    (["--lengths", "1,5"], ">= 2"),
    (["--steps", "-3"], ">= 0"),
    (["--lr", "nan"], "--lr"),
    (["--lstm-init", "zeros"], "invalid choice"),
    (["--out", "/nonexistent-dir/x.png"], "does not exist"),
])
def test_bad_input_gives_one_line_and_exit_2(argv, message, capsys):
    assert gf.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("lstmkit gradient-flow: error:") and message in err


def test_refuses_to_overwrite_a_file_that_is_not_a_png(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_text("my notes")
    assert gf.main(["--out", str(p)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert p.read_text() == "my notes"


def test_help_exits_0(capsys):
    assert gf.main(["--help"]) == 0
    assert "--hidden-size" in capsys.readouterr().out


def test_reached_through_the_lstmkit_command(capsys):
    from lstmkit.cli import main as cli_main
    assert cli_main(["gradient-flow", "--help"]) == 0
    assert "--lengths" in capsys.readouterr().out
    assert cli_main(["gradient-flow", "--steps", "x"]) == 2
    assert capsys.readouterr().err.startswith("lstmkit gradient-flow: error:")
