"""The fast path (kernels.py) against the readable reference (functional.py), and PyTorch.

Every option of the layer contract: float32 and float64, with and without bias, with and without
projection, T = 1 and T > 1, B = 1 (the compiled whole-layer path used for generation) and B > 1
(BLAS products + fused per-step kernels), final-state gradients given or None.
float64 must agree with the reference to 1e-10 (the kernels use libm's tanh in float64); float32
to float32 tolerance (the kernels use a rational tanh within a few ulps).

Shape letters: T time steps, B batch, I input size, H hidden size, P size of h (projection or H),
G = 4H stacked gates.
"""

import numpy as np
import pytest

from lstmkit import functional as F

K = pytest.importorskip("lstmkit.kernels")
if not K.AVAILABLE:  # pragma: no cover - numba is a run-time dependency; this only guards odd installs
    pytest.skip("numba not importable: the fast path is off", allow_module_level=True)
from lstmkit import blas, lstm_fused  # noqa: E402 - the pieces behind kernels.py, once Numba is known to import

TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=1e-4, atol=2e-5)}

# (T, B, I, H, P): P != H means a projection W_hr (P, H).
LSTM_SHAPES = [
    (1, 1, 3, 4, 4),     # one step, batch 1: the generation path
    (1, 1, 37, 45, 45),  # generation path with dot products long enough for vector loop + scalar tail
    (6, 1, 5, 8, 8),     # batch 1 over many steps
    (5, 1, 4, 6, 3),     # batch 1 with projection
    (1, 3, 4, 5, 5),     # one step, batched
    (7, 3, 5, 9, 9),     # H not a multiple of the vector width: remainder loops
    (4, 2, 3, 8, 5),     # projection, batched
]


def _lstm_inputs(rng, T, B, I, H, P, dtype, bias):
    G = 4 * H
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(dtype)   # noqa: E731
    return dict(x=r(T, B, I), h0=r(B, P), c0=r(B, H), W_ih=r(G, I), W_hh=r(G, P),
                b=r(G) if bias else None, W_hr=r(P, H) if P != H else None)


def _close(got, want, dtype, what):
    assert (got is None) == (want is None), what
    if want is None:
        return
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == dtype, (what, got.dtype)
    np.testing.assert_allclose(got, want, err_msg=what, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", LSTM_SHAPES)
def test_lstm_layer_matches_reference(shape, bias, dtype):
    rng = np.random.default_rng(sum(shape) + bias)
    T, B, I, H, P = shape
    a = _lstm_inputs(rng, T, B, I, H, P, dtype, bias)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
    want = F.lstm_layer_forward(*args)
    got = K.lstm_layer_forward(*args)
    for name, g, w in zip(["out", "h_T", "c_T"], got[:3], want[:3]):
        _close(g, w, dtype, name)
    # The lessons read these two out of the cache.
    _close(got[3]["gates"], want[3]["gates"], dtype, "cache gates")
    _close(got[3]["c"], want[3]["c"], dtype, "cache c")

    dout = (rng.standard_normal((T, B, P))).astype(dtype)
    for dh_T, dc_T in [(None, None), (rng.standard_normal((B, P)).astype(dtype),
                                      rng.standard_normal((B, H)).astype(dtype))]:
        saved = [v.copy() for v in (dout, dh_T, dc_T) if v is not None]
        w = F.lstm_layer_backward(dout, dh_T, dc_T, want[3])
        g = K.lstm_layer_backward(dout, dh_T, dc_T, got[3])
        names = ["dx", "dh0", "dc0", "dW_ih", "dW_hh", "db", "dW_hr"]
        for name, gg, ww in zip(names, g, w):
            _close(gg, ww, dtype, name)
        # The caller's gradients are inputs, never scratch space.
        for before, after in zip(saved, [v for v in (dout, dh_T, dc_T) if v is not None]):
            np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("T,B", [(1, 1), (5, 1), (1, 3), (5, 3)])
def test_lstm_weight_gradients_with_a_zero_initial_state(T, B):
    """The h0 term of dW_hh is skipped when h0 is all zeros (layer_rows._add_initial_state_term):
    the gradients must still be the reference's, at one step and many, batch 1 and more."""
    rng = np.random.default_rng(T * 10 + B)
    a = _lstm_inputs(rng, T, B, 3, 5, 5, np.float64, True)
    a["h0"][:] = 0
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
    want, got = F.lstm_layer_forward(*args), K.lstm_layer_forward(*args)
    dout = rng.standard_normal((T, B, 5))
    w = F.lstm_layer_backward(dout, None, None, want[3])
    g = K.lstm_layer_backward(dout, None, None, got[3])
    for name, gg, ww in zip(["dx", "dh0", "dc0", "dW_ih", "dW_hh", "db"], g, w):
        _close(gg, ww, np.float64, name)
    assert (np.abs(g[4]).max() > 0) == (T > 1)    # dW_hh: zeros at one step from h0 = 0, not after


def test_lstm_backward_twice_gives_the_same_gradients():
    # backward must not consume its cache (e.g. by writing gate gradients over the activations).
    rng = np.random.default_rng(1)
    a = _lstm_inputs(rng, 5, 3, 4, 6, 6, np.float32, True)
    out, _, _, cache = K.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    dout = rng.standard_normal(out.shape).astype(np.float32)
    first = K.lstm_layer_backward(dout, None, None, cache)
    second = K.lstm_layer_backward(dout, None, None, cache)
    for f, s in zip(first, second):
        np.testing.assert_array_equal(f, s)


def test_lstm_accepts_non_contiguous_input():
    # modules.py hands over swapaxes views (batch_first) and reversed views (bidirectional).
    rng = np.random.default_rng(2)
    a = _lstm_inputs(rng, 4, 3, 5, 6, 6, np.float64, True)
    x_view = np.ascontiguousarray(a["x"].swapaxes(0, 1)).swapaxes(0, 1)[::-1]
    assert not x_view.flags.c_contiguous
    want = F.lstm_layer_forward(np.ascontiguousarray(x_view), a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    got = K.lstm_layer_forward(x_view, a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)


def test_lstm_chained_calls_equal_one_call():
    # Generation feeds one step at a time through the B == 1 path; the states it hands on must
    # give exactly what one call over the whole sequence gives.
    rng = np.random.default_rng(3)
    a = _lstm_inputs(rng, 6, 1, 4, 5, 3, np.float32, True)
    full, h_T, c_T, _ = K.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
    h, c = a["h0"], a["c0"]
    for t in range(6):
        out, h, c, _ = K.lstm_layer_forward(a["x"][t:t + 1], h, c, a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
        np.testing.assert_allclose(out[0], full[t], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, h_T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c, c_T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B", [(1, 1), (5, 1), (6, 3)])
def test_rnn_layer_matches_reference(T, B, bias, nonlinearity, dtype):
    rng = np.random.default_rng(T * 10 + B)
    I, H = 4, 7
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(dtype)   # noqa: E731
    x, h0, W_ih, W_hh, b = r(T, B, I), r(B, H), r(H, I), r(H, H), (r(H) if bias else None)
    want = F.rnn_layer_forward(x, h0, W_ih, W_hh, b, nonlinearity)
    got = K.rnn_layer_forward(x, h0, W_ih, W_hh, b, nonlinearity)
    _close(got[0], want[0], dtype, "out")
    _close(got[1], want[1], dtype, "h_T")
    dout = r(T, B, H)
    for dh_T in (None, r(B, H)):
        w = F.rnn_layer_backward(dout, dh_T, want[2])
        g = K.rnn_layer_backward(dout, dh_T, got[2])
        for name, gg, ww in zip(["dx", "dh0", "dW_ih", "dW_hh", "db"], g, w):
            _close(gg, ww, dtype, name)


def test_float32_tanh_and_sigmoid_accuracy():
    # The rational float32 tanh (and the sigmoid built on it) against NumPy, over the whole range
    # that matters and far into saturation, where it must stay within a few ulps of ±1, not NaN.
    x = np.concatenate([np.linspace(-12, 12, 20001), [-1e30, -88.0, 88.0, 1e30]]).astype(np.float32)
    B = 1
    H = x.size
    gates = np.zeros((B, 4 * H), np.float32)
    gates[0, 2 * H:3 * H] = x                     # g = tanh(x)
    gates[0, :H] = x                              # i = σ(x)
    gates[0, H:2 * H] = 0                         # f = σ(0) = 0.5 (c_prev is 0 anyway)
    gates[0, 3 * H:] = 0                          # o = 0.5
    c, m = np.empty((B, H), np.float32), np.empty((B, H), np.float32)
    lstm_fused._lstm_fwd_step(gates, np.zeros_like(gates), np.zeros(4 * H, np.float32),
                     np.zeros((B, H), np.float32), c, m)
    x64 = x.astype(np.float64)
    assert np.all(np.isfinite(gates))
    np.testing.assert_allclose(gates[0, 2 * H:3 * H], np.tanh(x64), rtol=0, atol=3e-7)
    np.testing.assert_allclose(gates[0, :H], 0.5 * (1 + np.tanh(0.5 * x64)), rtol=0, atol=3e-7)
    assert abs(gates[0, 2 * H + H - 1] - 1.0) < 3e-7 and abs(gates[0, 2 * H + H - 4] + 1.0) < 3e-7
    assert np.abs(gates).max() <= 1.0 + 3e-7
    # c = σ(x) tanh(x), and m = o tanh(c) with o = 0.5: the cell path uses the same approximation.
    c_want = gates[0, :H].astype(np.float64) * gates[0, 2 * H:3 * H]
    np.testing.assert_allclose(c[0], c_want, rtol=0, atol=3e-7)
    np.testing.assert_allclose(m[0], 0.5 * np.tanh(c_want), rtol=0, atol=3e-7)


def test_lstm_matches_torch_float32():
    # An outside oracle for the fast path itself (the reference could share a mistake with it).
    torch = pytest.importorskip("torch")
    T, B, I, H, P = 5, 3, 4, 8, 3
    lstm = torch.nn.LSTM(I, H, proj_size=P)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((1, B, P)).astype(np.float32)
    c0 = rng.standard_normal((1, B, H)).astype(np.float32)
    xt, h0t, c0t = (torch.tensor(v, requires_grad=True) for v in (x, h0, c0))
    out_t, (h_t, c_t) = lstm(xt, (h0t, c0t))
    dout = rng.standard_normal(out_t.shape).astype(np.float32)
    out_t.backward(torch.from_numpy(dout))
    p = {k: v.detach().numpy() for k, v in lstm.named_parameters()}
    out, h_T, c_T, cache = K.lstm_layer_forward(x, h0[0], c0[0], p["weight_ih_l0"], p["weight_hh_l0"],
                                                p["bias_ih_l0"] + p["bias_hh_l0"], p["weight_hr_l0"])
    dx, dh0, dc0, dW_ih, dW_hh, db, dW_hr = K.lstm_layer_backward(dout, None, None, cache)
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, out_t.detach().numpy(), **tol)
    np.testing.assert_allclose(c_T, c_t.detach().numpy()[0], **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dh0, h0t.grad.numpy()[0], **tol)
    np.testing.assert_allclose(dc0, c0t.grad.numpy()[0], **tol)
    np.testing.assert_allclose(dW_ih, lstm.weight_ih_l0.grad.numpy(), **tol)
    np.testing.assert_allclose(dW_hh, lstm.weight_hh_l0.grad.numpy(), **tol)
    np.testing.assert_allclose(db, lstm.bias_ih_l0.grad.numpy(), **tol)
    np.testing.assert_allclose(dW_hr, lstm.weight_hr_l0.grad.numpy(), **tol)


def test_blas_thread_count_is_restored():
    # Small products run on one OpenBLAS thread; the caller's setting must come back afterwards.
    if blas._BLAS_THREADS is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS: no thread control")
    get, set_ = blas._BLAS_THREADS
    before = get()
    try:
        set_(2)
        rng = np.random.default_rng(5)
        a = _lstm_inputs(rng, 3, 2, 4, 5, 5, np.float32, True)
        out, _, _, cache = K.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
        K.lstm_layer_backward(np.ones_like(out), None, None, cache)
        assert get() == 2
    finally:
        set_(before)


@pytest.mark.parametrize("layers", [F, K], ids=["reference", "kernels"])
@pytest.mark.parametrize("shape", [(6, 1, 5, 8, 8), (1, 1, 3, 4, 4), (7, 3, 5, 9, 9), (4, 2, 3, 8, 5)])
def test_forward_without_save_gives_the_same_outputs_and_no_cache(shape, layers):
    # no_grad's path: c_t and m_t live in (B, H) buffers the steps take turns with (kernels, B > 1).
    T, B, I, H, P = shape
    a = _lstm_inputs(np.random.default_rng(3), T, B, I, H, P, np.float64, True)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
    *want, cache = layers.lstm_layer_forward(*args)
    *got, no_cache = layers.lstm_layer_forward(*args, save=False)
    assert cache is not None and no_cache is None
    for g, w, what in zip(got, want, ("out", "h_T", "c_T")):
        np.testing.assert_array_equal(g, w, err_msg=what)
    rng = np.random.default_rng(4)
    h0, W_ih, W_hh, b = rng.standard_normal((B, H)), rng.standard_normal((H, I)), rng.standard_normal((H, H)), \
        rng.standard_normal(H)
    *want, cache = layers.rnn_layer_forward(a["x"], h0, W_ih, W_hh, b)
    *got, no_cache = layers.rnn_layer_forward(a["x"], h0, W_ih, W_hh, b, save=False)
    assert no_cache is None
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("shape", [(6, 1, 5, 8, 8), (1, 1, 3, 4, 4), (5, 1, 4, 6, 3)])
def test_batch_one_with_a_kept_transposed_W_hh_matches(shape):
    # modules.py hands the batch-1 loops the W_hh.T it keeps across calls instead of a copy per call.
    T, B, I, H, P = shape
    a = _lstm_inputs(np.random.default_rng(4), T, B, I, H, P, np.float64, True)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
    dout = np.random.default_rng(5).standard_normal((T, B, P))
    *want, cache = K.lstm_layer_forward(*args)
    *got, kept = K.lstm_layer_forward(*args, W_hh_T=np.ascontiguousarray(a["W_hh"].T))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for g, w in zip(K.lstm_layer_backward(dout, None, None, kept), K.lstm_layer_backward(dout, None, None, cache)):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------- packed batches
PACKED = [  # (lengths, sorted longest first; I, H, P)
    ([5, 4, 2, 1], 3, 8, 8),
    ([6, 6, 3, 3, 1], 4, 5, 3),     # projection; ties
    ([2, 1], 3, 9, 9),              # H not a multiple of the vector width
]


def _bs(lengths):
    return (np.arange(lengths[0])[:, None] < np.array(lengths)[None, :]).sum(axis=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", PACKED, ids=str)
def test_packed_lstm_and_rnn_match_the_reference_segment_runner(case, bias, dtype):
    """kernels.py runs a packed batch natively over its real rows; functional.py runs its plain
    layer once per run of equal batch size (packed.py). Values, final states (each sequence's at
    its own last step) and every gradient agree; padding is zero in out and dx."""
    lengths, I, H, P = case
    T, B = lengths[0], len(lengths)
    rng = np.random.default_rng(len(lengths) + H + bias)
    a = _lstm_inputs(rng, T, B, I, H, P, dtype, bias)
    pad = ~(np.arange(T)[:, None] < np.array(lengths)[None, :])
    a["x"][pad] = np.nan                                   # padding must never be read
    dout = rng.standard_normal((T, B, P)).astype(dtype)
    dout[pad] = np.nan
    dh, dc = rng.standard_normal((B, P)).astype(dtype), rng.standard_normal((B, H)).astype(dtype)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], a["W_hr"])
    want = F.lstm_layer_forward(*args, batch_sizes=_bs(lengths))
    got = K.lstm_layer_forward(*args, batch_sizes=_bs(lengths))
    for name, g, w in zip(["out", "h_T", "c_T"], got[:3], want[:3]):
        _close(g, w, dtype, name)
    assert np.all(got[0][pad] == 0)
    lean = K.lstm_layer_forward(*args, batch_sizes=_bs(lengths), save=False)
    assert lean[3] is None and all(np.array_equal(u, v) for u, v in zip(lean[:3], got[:3]))
    for grads in ((dh, dc), (None, None)):
        w = F.lstm_layer_backward(dout, *grads, want[3])
        g = K.lstm_layer_backward(dout, *grads, got[3])
        assert np.all(g[0][pad] == 0)
        for name, gg, ww in zip(["dx", "dh0", "dc0", "dW_ih", "dW_hh", "db", "dW_hr"], g, w):
            _close(gg, ww, dtype, name)
    r = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(dtype)   # noqa: E731
    h0, W_ih, W_hh, b = r(B, H), r(H, I), r(H, H), r(H) if bias else None
    d_out, d_h = r(T, B, H), r(B, H)
    d_out[pad] = np.nan
    for nl in ("tanh", "relu"):
        want = F.rnn_layer_forward(a["x"], h0, W_ih, W_hh, b, nl, batch_sizes=_bs(lengths))
        got = K.rnn_layer_forward(a["x"], h0, W_ih, W_hh, b, nl, batch_sizes=_bs(lengths))
        _close(got[0], want[0], dtype, f"{nl} out")
        _close(got[1], want[1], dtype, f"{nl} h_T")
        for name, gg, ww in zip(["dx", "dh0", "dW_ih", "dW_hh", "db"], K.rnn_layer_backward(d_out, d_h, got[2]),
                                F.rnn_layer_backward(d_out, d_h, want[2])):
            _close(gg, ww, dtype, f"{nl} {name}")


def test_packed_loops_put_small_steps_on_one_blas_thread_and_restore_the_count():
    """A packed batch's big first steps keep all BLAS threads, its few-row last steps run on one
    (forward: the switch going down the steps; backward: back up); the caller's count returns."""
    if blas._BLAS_THREADS is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS: no thread control")
    from lstmkit import gru
    get, set_ = blas._BLAS_THREADS
    before = get()
    seen = []
    real_matmul = np.matmul
    try:
        set_(2)
        H = 64                                          # 4H * H = 16384 multiply-adds per row
        bs = np.array([200, 200, 100, 3, 1])            # 200 rows: above SMALL_PRODUCT; 3: below
        rng = np.random.default_rng(6)
        a = _lstm_inputs(rng, 5, 200, 4, H, H, np.float32, True)
        np.matmul = lambda *args, **kw: (seen.append((args[0].shape[0], get())), real_matmul(*args, **kw))[1]
        out, _, _, cache = K.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"],
                                                batch_sizes=bs)
        K.lstm_layer_backward(np.ones_like(out), None, None, cache)
        gcache = gru.fused_forward(a["x"], a["h0"], a["W_ih"][: 3 * H], a["W_hh"][: 3 * H], batch_sizes=bs)[2]
        gru.fused_backward(np.ones((5, 200, H), np.float32), None, gcache)
        np.matmul = real_matmul
        assert get() == 2
        assert {threads for rows, threads in seen if rows == 200} == {2}
        assert {threads for rows, threads in seen if rows in (3, 1)} == {1}
        assert len([1 for rows, _ in seen if rows in (3, 1)]) == 8    # 2 steps x fwd/bwd x LSTM/GRU
    finally:
        np.matmul = real_matmul
        set_(before)
