"""lstmkit against torch.nn: same weights in, same outputs, states and every gradient out.

The LSTM grid covers every combination of num_layers {1, 2, 3}, bidirectional, proj_size {0, 2},
batch_first, bias, batched/unbatched input and h_0/c_0 given or not, in float64 (to 1e-10) and
float32, with both backends; the RNN's and the GRU's grids the same without proj_size (num_layers
{1, 3}). Packed input is held against torch in test_packed_modules.py.

Shape letters: L sequence length, N batch, I input size, H hidden size, P proj or hidden size,
D directions.
"""

import itertools

import numpy as np
import pytest
import torch

from lstmkit import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from oracle import assert_close, leaf, torch_twin, weighted_sum

L, N, I, H, PROJ = 4, 3, 5, 6, 2

LSTM_GRID = list(itertools.product([1, 2, 3], [False, True], [0, PROJ], [False, True], [True, False],
                                   [True, False], [True, False]))


def _grid_id(p):
    layers, bidir, proj, bf, bias, batched, given = p
    return (f"L{layers}-{'bi' if bidir else 'uni'}-p{proj}-{'bf' if bf else 'tf'}-{'b' if bias else 'nob'}"
            f"-{'batched' if batched else 'unbatched'}-{'hx' if given else 'nohx'}")


def _input(rng, dtype, batched, batch_first):
    shape = ((N, L, I) if batch_first else (L, N, I)) if batched else (L, I)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("params", LSTM_GRID, ids=[_grid_id(p) for p in LSTM_GRID])
def test_lstm_matches_torch(params, dtype, backend):
    layers, bidir, proj, batch_first, bias, batched, hx_given = params
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias, batch_first=batch_first,
              bidirectional=bidir, proj_size=proj)
    ours = LSTM(**kw, dtype=dtype, seed=1)
    twin = torch_twin(ours, torch.nn.LSTM, **kw)
    rng = np.random.default_rng(2)
    D, P = (2 if bidir else 1), (proj or H)
    x = _input(rng, dtype, batched, batch_first)
    state_lead = (layers * D, N) if batched else (layers * D,)
    h0 = rng.standard_normal(state_lead + (P,)).astype(dtype)
    c0 = rng.standard_normal(state_lead + (H,)).astype(dtype)

    out, (h_n, c_n) = ours(x, (h0, c0)) if hx_given else ours(x)
    tx, th0, tc0 = leaf(x), leaf(h0), leaf(c0)
    t_out, (t_hn, t_cn) = twin(tx, (th0, tc0)) if hx_given else twin(tx)
    for a, b, what in ((out, t_out, "output"), (h_n, t_hn, "h_n"), (c_n, t_cn, "c_n")):
        assert_close(a, b, dtype, what)

    g_out, g_h, g_c = (rng.standard_normal(a.shape).astype(dtype) for a in (out, h_n, c_n))
    weighted_sum((t_out, t_hn, t_cn), (g_out, g_h, g_c)).backward()
    dx, (dh0, dc0) = ours.backward(g_out, (g_h, g_c))
    assert_close(dx, tx.grad, dtype, "grad input")
    if hx_given:
        assert_close(dh0, th0.grad, dtype, "grad h_0")
        assert_close(dc0, tc0.grad, dtype, "grad c_0")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


RNN_GRID = list(itertools.product(["tanh", "relu"], [1, 3], [False, True], [False, True], [True, False],
                                  [True, False], [True, False]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("params", RNN_GRID, ids=[
    f"{nl}-L{k}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-{'b' if b else 'nob'}-"
    f"{'batched' if bt else 'unbatched'}-{'hx' if g else 'nohx'}" for nl, k, bi, bf, b, bt, g in RNN_GRID])
def test_rnn_matches_torch(params, dtype, backend):
    nonlinearity, layers, bidir, batch_first, bias, batched, hx_given = params
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, nonlinearity=nonlinearity, bias=bias,
              batch_first=batch_first, bidirectional=bidir)
    ours = RNN(**kw, dtype=dtype, seed=3)
    twin = torch_twin(ours, torch.nn.RNN, **kw)
    rng = np.random.default_rng(4)
    D = 2 if bidir else 1
    x = _input(rng, dtype, batched, batch_first)
    h0 = rng.standard_normal(((layers * D, N) if batched else (layers * D,)) + (H,)).astype(dtype)

    out, h_n = ours(x, h0) if hx_given else ours(x)
    tx, th0 = leaf(x), leaf(h0)
    t_out, t_hn = twin(tx, th0) if hx_given else twin(tx)
    assert_close(out, t_out, dtype, "output")
    assert_close(h_n, t_hn, dtype, "h_n")

    g_out, g_h = (rng.standard_normal(a.shape).astype(dtype) for a in (out, h_n))
    weighted_sum((t_out, t_hn), (g_out, g_h)).backward()
    dx, dh0 = ours.backward(g_out, g_h)
    assert_close(dx, tx.grad, dtype, "grad input")
    if hx_given:
        assert_close(dh0, th0.grad, dtype, "grad h_0")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


GRU_GRID = list(itertools.product([1, 3], [False, True], [False, True], [True, False], [True, False],
                                  [True, False]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("params", GRU_GRID, ids=[
    f"L{k}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-{'b' if b else 'nob'}-"
    f"{'batched' if bt else 'unbatched'}-{'hx' if g else 'nohx'}" for k, bi, bf, b, bt, g in GRU_GRID])
def test_gru_matches_torch(params, dtype, backend):
    layers, bidir, batch_first, bias, batched, hx_given = params
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias, batch_first=batch_first,
              bidirectional=bidir)
    ours = GRU(**kw, dtype=dtype, seed=3)
    twin = torch_twin(ours, torch.nn.GRU, **kw)
    rng = np.random.default_rng(4)
    D = 2 if bidir else 1
    x = _input(rng, dtype, batched, batch_first)
    h0 = rng.standard_normal(((layers * D, N) if batched else (layers * D,)) + (H,)).astype(dtype)

    out, h_n = ours(x, h0) if hx_given else ours(x)
    tx, th0 = leaf(x), leaf(h0)
    t_out, t_hn = twin(tx, th0) if hx_given else twin(tx)
    assert_close(out, t_out, dtype, "output")
    assert_close(h_n, t_hn, dtype, "h_n")

    g_out, g_h = (rng.standard_normal(a.shape).astype(dtype) for a in (out, h_n))
    weighted_sum((t_out, t_hn), (g_out, g_h)).backward()
    dx, dh0 = ours.backward(g_out, g_h)
    assert_close(dx, tx.grad, dtype, "grad input")
    if hx_given:
        assert_close(dh0, th0.grad, dtype, "grad h_0")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
def test_gru_cell_matches_torch(dtype, bias, batched, hx_given, backend):
    ours = GRUCell(I, H, bias=bias, dtype=dtype, seed=9)
    twin = torch_twin(ours, torch.nn.GRUCell, input_size=I, hidden_size=H, bias=bias)
    rng = np.random.default_rng(10)
    lead = (N,) if batched else ()
    x = rng.standard_normal(lead + (I,)).astype(dtype)
    h = rng.standard_normal(lead + (H,)).astype(dtype)
    h1 = ours(x, h) if hx_given else ours(x)
    tx, th = leaf(x), leaf(h)
    t_h1 = twin(tx, th) if hx_given else twin(tx)
    assert_close(h1, t_h1, dtype, "h'")
    g_h = rng.standard_normal(h1.shape).astype(dtype)
    weighted_sum((t_h1,), (g_h,)).backward()
    dx, dh = ours.backward(g_h)
    assert_close(dx, tx.grad, dtype, "grad input")
    if hx_given:
        assert_close(dh, th.grad, dtype, "grad h")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
def test_lstm_cell_matches_torch(dtype, bias, batched, hx_given, backend):
    ours = LSTMCell(I, H, bias=bias, dtype=dtype, seed=5)
    twin = torch_twin(ours, torch.nn.LSTMCell, input_size=I, hidden_size=H, bias=bias)
    rng = np.random.default_rng(6)
    lead = (N,) if batched else ()
    x = rng.standard_normal(lead + (I,)).astype(dtype)
    h, c = (rng.standard_normal(lead + (H,)).astype(dtype) for _ in range(2))
    h1, c1 = ours(x, (h, c)) if hx_given else ours(x)
    tx, th, tc = leaf(x), leaf(h), leaf(c)
    t_h1, t_c1 = twin(tx, (th, tc)) if hx_given else twin(tx)
    assert_close(h1, t_h1, dtype, "h'")
    assert_close(c1, t_c1, dtype, "c'")
    g_h, g_c = (rng.standard_normal(h1.shape).astype(dtype) for _ in range(2))
    weighted_sum((t_h1, t_c1), (g_h, g_c)).backward()
    dx, (dh, dc) = ours.backward((g_h, g_c))
    assert_close(dx, tx.grad, dtype, "grad input")
    if hx_given:
        assert_close(dh, th.grad, dtype, "grad h")
        assert_close(dc, tc.grad, dtype, "grad c")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
def test_rnn_cell_matches_torch(dtype, nonlinearity, bias, batched, hx_given, backend):
    ours = RNNCell(I, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype, seed=7)
    twin = torch_twin(ours, torch.nn.RNNCell, input_size=I, hidden_size=H, bias=bias,
                      nonlinearity=nonlinearity)
    rng = np.random.default_rng(8)
    lead = (N,) if batched else ()
    x = rng.standard_normal(lead + (I,)).astype(dtype)
    h = rng.standard_normal(lead + (H,)).astype(dtype)
    h1 = ours(x, h) if hx_given else ours(x)
    tx, th = leaf(x), leaf(h)
    t_h1 = twin(tx, th) if hx_given else twin(tx)
    assert_close(h1, t_h1, dtype, "h'")
    g_h = rng.standard_normal(h1.shape).astype(dtype)
    weighted_sum((t_h1,), (g_h,)).backward()
    dx, dh = ours.backward(g_h)
    assert_close(dx, tx.grad, dtype, "grad input")
    if hx_given:
        assert_close(dh, th.grad, dtype, "grad h")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("make, torch_cls, kw", [
    (LSTM, torch.nn.LSTM, dict(input_size=3, hidden_size=5, num_layers=3, bidirectional=True, proj_size=2)),
    (LSTM, torch.nn.LSTM, dict(input_size=3, hidden_size=5, num_layers=2, bias=False)),
    (RNN, torch.nn.RNN, dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)),
    (GRU, torch.nn.GRU, dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)),
    (GRU, torch.nn.GRU, dict(input_size=3, hidden_size=5, bias=False)),
    (GRUCell, torch.nn.GRUCell, dict(input_size=3, hidden_size=5)),
    (LSTMCell, torch.nn.LSTMCell, dict(input_size=3, hidden_size=5)),
    (RNNCell, torch.nn.RNNCell, dict(input_size=3, hidden_size=5, bias=False)),
])
def test_state_dict_keys_shapes_and_init_match_torch(make, torch_cls, kw):
    ours = make(**kw, seed=0)
    theirs = torch_cls(**kw).state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert list(ours.grads) == list(theirs)
    for k, v in ours.state_dict().items():
        assert v.shape == tuple(theirs[k].shape), k
        assert v.dtype == np.float32
        bound = 1 / np.sqrt(kw["hidden_size"])
        assert np.abs(v).max() <= bound, f"{k} outside U(-1/sqrt(H), 1/sqrt(H))"
    everything = np.concatenate([v.ravel() for v in ours.state_dict().values()])
    # U(-k, k) has standard deviation k/sqrt(3); with hundreds of draws the estimate is within 15%.
    assert abs(everything.std() / (bound / np.sqrt(3)) - 1) < 0.15
    # Torch loads ours directly, and the seed is a promise: the same seed, the same weights.
    torch_cls(**kw).load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    again = make(**kw, seed=0).state_dict()
    assert all(np.array_equal(again[k], v) for k, v in ours.state_dict().items())
    other = make(**kw, seed=1).state_dict()
    assert not all(np.array_equal(other[k], v) for k, v in ours.state_dict().items())


def test_attribute_access_is_the_live_parameter():
    lstm = LSTM(3, 4, seed=0)
    assert lstm.weight_ih_l0.shape == (16, 3)
    lstm.weight_ih_l0[...] = 0.0
    assert not lstm.state_dict()["weight_ih_l0"].any()
    with pytest.raises(AttributeError):
        lstm.weight_ih_l7
