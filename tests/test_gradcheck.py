"""Central-difference gradient checks in float64 for every parameter, the input and h_0 / c_0.

The hand-written backward must agree with (f(θ+ε) - f(θ-ε)) / 2ε of the scalar loss
    loss = Σ output ⊙ g_out + Σ h_n ⊙ g_h + Σ c_n ⊙ g_c
for random fixed g's. Dropout is checked with a fixed mask: the dropout generator is re-seeded
before every forward, so each evaluation of the loss draws the same mask.

Shape letters: L sequence length, N batch, I input size, H hidden size.
"""

import numpy as np
import pytest

from lstmkit import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from oracle import numerical_grad

def _flat(outputs):
    """LSTM (out, (h, c)), RNN (out, h), LSTMCell (h, c), RNNCell h -> a list of arrays."""
    if not isinstance(outputs, tuple):
        return [outputs]
    first, rest = outputs
    return [first, *rest] if isinstance(rest, tuple) else [first, rest]


def _backward(module, weights):
    """Call backward with the loss weights as output gradients -> {name: gradient}."""
    if isinstance(module, LSTM):
        dx, (dh, dc) = module.backward(weights[0], (weights[1], weights[2]))
    elif isinstance(module, LSTMCell):
        dx, (dh, dc) = module.backward((weights[0], weights[1]))
    else:
        dx, dh = module.backward(*weights)
        return {"input": dx, "h_0": dh}
    return {"input": dx, "h_0": dh, "c_0": dc}


def check(module, x, states, seed_dropout=None):
    """Compare module.backward with central differences for x, each state and every parameter."""
    hx = states if len(states) == 2 else states[0]

    def forward():
        if seed_dropout is not None:
            module.dropout_rng = np.random.default_rng(seed_dropout)
        return _flat(module(x, hx))

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(o.shape) for o in forward()]

    def loss():
        return sum(float((o * w).sum()) for o, w in zip(forward(), weights))

    loss()
    module.zero_grad()
    analytic = _backward(module, weights)
    numeric = {"input": numerical_grad(loss, x)}
    numeric.update({name: numerical_grad(loss, s) for name, s in zip(("h_0", "c_0"), states)})
    for name, p in module.named_parameters():
        analytic[name] = module.grads[name].copy()
        numeric[name] = numerical_grad(loss, p)
    assert set(numeric) == set(analytic)
    for name in numeric:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=1e-6, atol=1e-7, err_msg=name)


CONFIGS = {
    "1-layer": dict(num_layers=1),
    "proj": dict(num_layers=1, proj_size=2),
    "bidirectional": dict(num_layers=1, bidirectional=True),
    "3-layers": dict(num_layers=3),
    "2-layer-bi-proj-batch-first": dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
    "no-bias": dict(num_layers=2, bias=False),
}


@pytest.mark.parametrize("kw", list(CONFIGS.values()), ids=list(CONFIGS))
def test_lstm_gradients_match_central_differences(kw, backend):
    L, N, I, H = 3, 2, 3, 4
    lstm = LSTM(I, H, dtype=np.float64, seed=0, **kw)
    rng = np.random.default_rng(1)
    D = 2 if kw.get("bidirectional") else 1
    P = kw.get("proj_size") or H
    x = rng.standard_normal((N, L, I) if kw.get("batch_first") else (L, N, I))
    h0 = rng.standard_normal((kw["num_layers"] * D, N, P))
    c0 = rng.standard_normal((kw["num_layers"] * D, N, H))
    check(lstm, x, (h0, c0))


def test_lstm_dropout_gradients_with_a_fixed_mask(backend):
    lstm = LSTM(3, 4, num_layers=3, dropout=0.4, bidirectional=True, dtype=np.float64, seed=0)
    rng = np.random.default_rng(2)
    x, h0, c0 = rng.standard_normal((3, 2, 3)), rng.standard_normal((6, 2, 4)), rng.standard_normal((6, 2, 4))
    lstm.train()
    check(lstm, x, (h0, c0), seed_dropout=123)
    # the mask really drops something, and in eval mode nothing is dropped
    lstm.dropout_rng = np.random.default_rng(123)
    out_train, _, ctx = lstm(x, (h0, c0), return_ctx=True)
    assert any(m is not None and (m == 0).any() for m in ctx.saved["masks"])
    lstm.eval()
    out_eval, _, ctx = lstm(x, (h0, c0), return_ctx=True)
    assert all(m is None for m in ctx.saved["masks"])
    assert not np.allclose(out_train, out_eval)


def test_lstm_unbatched_gradients(backend):
    lstm = LSTM(3, 4, num_layers=2, proj_size=3, dtype=np.float64, seed=0)
    rng = np.random.default_rng(3)
    check(lstm, rng.standard_normal((4, 3)), (rng.standard_normal((2, 3)), rng.standard_normal((2, 4))))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_gradients_match_central_differences(nonlinearity, backend):
    rnn = RNN(3, 4, num_layers=2, nonlinearity=nonlinearity, bidirectional=True, dtype=np.float64, seed=0)
    rng = np.random.default_rng(4)
    check(rnn, rng.standard_normal((3, 2, 3)), (rng.standard_normal((4, 2, 4)),))


def test_cells_gradients_match_central_differences(backend):
    rng = np.random.default_rng(5)
    check(LSTMCell(3, 4, dtype=np.float64, seed=0), rng.standard_normal((2, 3)),
          (rng.standard_normal((2, 4)), rng.standard_normal((2, 4))))
    for nl in ("tanh", "relu"):
        check(RNNCell(3, 4, nonlinearity=nl, dtype=np.float64, seed=0), rng.standard_normal((2, 3)),
              (rng.standard_normal((2, 4)),))
    for bias in (True, False):
        check(GRUCell(3, 4, bias=bias, dtype=np.float64, seed=0), rng.standard_normal((2, 3)),
              (rng.standard_normal((2, 4)),))
    check(GRUCell(3, 4, dtype=np.float64, seed=0), rng.standard_normal(3), (rng.standard_normal(4),))


GRU_CONFIGS = {
    "1-layer": dict(num_layers=1),
    "no-bias": dict(num_layers=1, bias=False),
    "bidirectional": dict(num_layers=1, bidirectional=True),
    "2-layers": dict(num_layers=2),
    "2-layer-bi-batch-first-no-bias": dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
}


@pytest.mark.parametrize("kw", list(GRU_CONFIGS.values()), ids=list(GRU_CONFIGS))
def test_gru_gradients_match_central_differences(kw, backend):
    L, N, I, H = 3, 2, 3, 4
    gru = GRU(I, H, dtype=np.float64, seed=0, **kw)
    rng = np.random.default_rng(6)
    D = 2 if kw.get("bidirectional") else 1
    x = rng.standard_normal((N, L, I) if kw.get("batch_first") else (L, N, I))
    check(gru, x, (rng.standard_normal((kw["num_layers"] * D, N, H)),))


def test_gru_dropout_and_unbatched_gradients(backend):
    gru = GRU(3, 4, num_layers=2, dropout=0.4, bidirectional=True, dtype=np.float64, seed=0)
    rng = np.random.default_rng(7)
    x, h0 = rng.standard_normal((3, 2, 3)), rng.standard_normal((4, 2, 4))
    check(gru, x, (h0,), seed_dropout=123)
    gru.dropout_rng = np.random.default_rng(123)
    _, _, ctx = gru(x, h0, return_ctx=True)
    assert any(m is not None and (m == 0).any() for m in ctx.saved["masks"])   # it really drops
    check(GRU(3, 4, num_layers=2, dtype=np.float64, seed=1), rng.standard_normal((4, 3)),
          (rng.standard_normal((2, 4)),))
