"""The GRU layer (lstmkit/gru.py): central differences, the fused path against the reference, and
torch.nn.GRU (stacked, bidirectional, packed) as the oracle for values and every gradient.

Shape letters: T time steps, B batch, I input size, H hidden size, G = 3H stacked gates r, z, n,
L layers, D directions.
"""

import numpy as np
import pytest
import torch

from lstmkit import gru
from lstmkit.packed import layer_input, lengths_of, packed_output, reverse_within_lengths, \
    sort_batch, unsort_batch
from lstmkit.utils.rnn import pack_padded_sequence, pad_packed_sequence
from oracle import TOL, numerical_grad

PATHS = {"reference": (gru.reference_forward, gru.reference_backward),
         "fused": (gru.fused_forward, gru.fused_backward)}
if not gru.AVAILABLE:  # pragma: no cover - numba is a run-time dependency
    del PATHS["fused"]


def _weights(rng, I, H, dtype, bias=True):
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(dtype)   # noqa: E731
    return [r(3 * H, I), r(3 * H, H), r(3 * H) if bias else None, r(3 * H) if bias else None]


def _batch_sizes(lengths, T):
    return (np.arange(T)[:, None] < np.asarray(lengths)[None, :]).sum(axis=1)


# ---------------------------------------------------------------------- central differences
@pytest.mark.parametrize("lengths", [None, [4, 3, 3, 1], [1, 1, 1]], ids=["full", "uneven", "all-1"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", list(PATHS))
def test_gradients_match_central_differences(path, bias, lengths):
    forward, backward = PATHS[path]
    rng = np.random.default_rng(3)
    B = 3 if lengths is None else len(lengths)
    T, I, H = (3 if lengths is None else max(lengths)), 2, 3
    bs = None if lengths is None else _batch_sizes(lengths, T)
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((B, H))
    params = _weights(rng, I, H, np.float64, bias)
    g_out, g_h = rng.standard_normal((T, B, H)), rng.standard_normal((B, H))

    def loss():
        out, h_T, _ = forward(x, h0, *params, batch_sizes=bs)
        return float((out * g_out).sum() + (h_T * g_h).sum())

    _, _, cache = forward(x, h0, *params, batch_sizes=bs)
    analytic = backward(g_out, g_h, cache)
    inputs = [x, h0, *params]
    names = ["x", "h0", "W_ih", "W_hh", "b_ih", "b_hh"]
    for name, a, got in zip(names, inputs, analytic):
        if a is None:
            assert got is None, name
            continue
        np.testing.assert_allclose(got, numerical_grad(loss, a), rtol=1e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------- fused against reference
SHAPES = [(1, 1, 3, 4, None), (6, 1, 5, 8, None), (7, 3, 5, 9, None), (5, 4, 3, 10, [5, 4, 2, 1]),
          (4, 5, 6, 17, [4, 4, 4, 3, 1])]


@pytest.mark.skipif("fused" not in PATHS, reason="numba not importable")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_matches_reference(shape, bias, dtype):
    T, B, I, H, lengths = shape
    rng = np.random.default_rng(T * B + H)
    bs = None if lengths is None else _batch_sizes(lengths, T)
    x, h0 = rng.standard_normal((T, B, I)).astype(dtype), rng.standard_normal((B, H)).astype(dtype)
    params = _weights(rng, I, H, dtype, bias)
    dout, dh_T = rng.standard_normal((T, B, H)).astype(dtype), rng.standard_normal((B, H)).astype(dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=2e-5)
    want_out, want_h, want_cache = gru.reference_forward(x, h0, *params, batch_sizes=bs)
    got_out, got_h, got_cache = gru.fused_forward(x, h0, *params, batch_sizes=bs)
    for got, want in zip((got_out, got_h), (want_out, want_h)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tol)
    for dh in (dh_T, None):
        want = gru.reference_backward(dout, dh, want_cache)
        got = gru.fused_backward(dout, dh, got_cache)
        for name, g, w in zip(["dx", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh"], got, want):
            assert (g is None) == (w is None), name
            if w is not None:
                assert g.shape == w.shape and g.dtype == dtype, name
                np.testing.assert_allclose(g, w, err_msg=name, **tol)


def test_backend_rule_picks_the_path(monkeypatch):
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((2, 2, 3)), np.zeros((2, 4)), *_weights(rng, 3, 4, np.float64))
    monkeypatch.setenv("LSTMKIT_REFERENCE", "1")
    assert gru.gru_layer_forward(*args)[2]["path"] == "reference"
    monkeypatch.delenv("LSTMKIT_REFERENCE")
    cache = gru.gru_layer_forward(*args)[2]
    assert cache["path"] == ("fused" if gru.AVAILABLE else "reference")
    # the backward follows the cache, whatever the environment says now
    monkeypatch.setenv("LSTMKIT_REFERENCE", "1")
    assert len(gru.gru_layer_backward(np.ones((2, 2, 4)), None, cache)) == 6


# ---------------------------------------------------------------------- packed semantics
@pytest.mark.parametrize("path", list(PATHS))
def test_packed_rows_are_each_sequence_alone(path):
    """Each sequence of a packed batch gives what it gives run alone at its own length, and
    padding (NaN here) reaches neither the outputs nor any gradient."""
    forward, backward = PATHS[path]
    rng = np.random.default_rng(5)
    lengths, T, I, H = [4, 2, 2, 1], 4, 3, 5
    B = len(lengths)
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((B, H))
    dout, dh = rng.standard_normal((T, B, H)), rng.standard_normal((B, H))
    pad = ~(np.arange(T)[:, None] < np.array(lengths)[None, :])
    x[pad], dout[pad] = np.nan, np.nan
    params = _weights(rng, I, H, np.float64)
    out, h_T, cache = forward(x, h0, *params, batch_sizes=_batch_sizes(lengths, T))
    grads = backward(dout, dh, cache)
    assert np.all(out[pad] == 0) and np.all(grads[0][pad] == 0)
    total = [np.zeros_like(g) for g in grads[2:]]
    for b, n in enumerate(lengths):
        o, h, c = forward(x[:n, b : b + 1], h0[b : b + 1], *params)
        g = backward(dout[:n, b : b + 1], dh[b : b + 1], c)
        np.testing.assert_allclose(out[:n, b], o[:, 0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h_T[b], h[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grads[0][:n, b], g[0][:, 0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grads[1][b], g[1][0], rtol=1e-12, atol=1e-12)
        total = [t + w for t, w in zip(total, g[2:])]
    for name, got, want in zip(["dW_ih", "dW_hh", "db_ih", "db_hh"], grads[2:], total):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("batch_sizes, match", [([3, 2], r"shape \(3,\)"),
                                                ([3, 1, 2], "non-increasing"),
                                                ([2, 2, 1], "batch_size=3"),
                                                ([3, 2, 0], "at least 1")])
@pytest.mark.parametrize("path", list(PATHS))
def test_bad_batch_sizes_are_refused(path, batch_sizes, match):
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match=match):
        PATHS[path][0](np.zeros((3, 3, 2)), np.zeros((3, 4)), *_weights(rng, 2, 4, np.float64),
                       batch_sizes=np.array(batch_sizes))
    with pytest.raises(TypeError, match="float64"):
        PATHS[path][0](np.zeros((3, 3, 2)), np.zeros((3, 4)), *_weights(rng, 2, 4, np.float64),
                       batch_sizes=np.array([3.0, 2.0, 1.0]))


# ---------------------------------------------------------------------- torch.nn.GRU, stacked
def _stack_forward(x, h0, weights, batch_sizes, lengths):
    """L layers, D = 2 directions of our layer, as torch stacks them. x (T, B, I) on the sorted
    grid; h0 (L*D, B, H); weights[k] the four arrays of layer k // 2, direction k % 2."""
    caches, layer_in, h_n = [], x, []
    for layer in range(len(weights) // 2):
        outs = []
        for d in range(2):
            k = 2 * layer + d
            inp = layer_in if d == 0 else reverse_within_lengths(layer_in, lengths)
            out, h_T, cache = gru.gru_layer_forward(inp, h0[k], *weights[k], batch_sizes=batch_sizes)
            outs.append(out if d == 0 else reverse_within_lengths(out, lengths))
            caches.append(cache)
            h_n.append(h_T)
        layer_in = np.concatenate(outs, axis=2)
    return layer_in, np.stack(h_n), caches


def _stack_backward(dout, dh_n, caches, lengths):
    """Backward of _stack_forward -> dx, dh0 (L*D, B, H), [per layer/direction gradients]."""
    H = dh_n.shape[2]
    grads, dh0 = [None] * len(caches), np.empty_like(dh_n)
    for layer in reversed(range(len(caches) // 2)):
        d_in = 0
        for d in range(2):
            k = 2 * layer + d
            dk = dout[..., d * H : (d + 1) * H]
            dk = dk if d == 0 else reverse_within_lengths(dk, lengths)
            dx, dh0[k], *grads[k] = gru.gru_layer_backward(np.ascontiguousarray(dk), dh_n[k], caches[k])
            d_in = d_in + (dx if d == 0 else reverse_within_lengths(dx, lengths))
        dout = d_in
    return dout, dh0, grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed-unsorted"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stacked_bidirectional_matches_torch(dtype, packed, backend):
    T, B, I, H, L = 5, 4, 3, 4, 2
    lengths = np.array([3, 5, 1, 3]) if packed else np.full(B, T)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((2 * L, B, H)).astype(dtype)
    g_out = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    g_h = rng.standard_normal((2 * L, B, H)).astype(dtype)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    twin = torch.nn.GRU(I, H, num_layers=L, bidirectional=True, dtype=tdt)
    names = [n for n, _ in twin.named_parameters()]   # weight_ih_l0, weight_hh_l0, bias_ih_l0, ...
    weights = [[p.detach().numpy().copy() for p in list(twin.parameters())[4 * k : 4 * k + 4]]
               for k in range(2 * L)]

    # torch: the padded batch in its original order, packed with enforce_sorted=False
    xt, ht = torch.from_numpy(x).requires_grad_(), torch.from_numpy(h0).requires_grad_()
    tp = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths), enforce_sorted=False)
    t_out, t_h = twin(tp, ht)
    t_out = torch.nn.utils.rnn.pad_packed_sequence(t_out, total_length=T)[0]
    ((t_out * torch.from_numpy(g_out)).sum() + (t_h * torch.from_numpy(g_h)).sum()).backward()

    # ours: the same through lstmkit's packing, on the sorted grid
    seq = pack_padded_sequence(x, lengths, enforce_sorted=False)
    grid, bs = layer_input(seq)
    s_len = lengths_of(bs)
    out, h_n, caches = _stack_forward(grid, sort_batch(h0, seq.sorted_indices), weights, bs, s_len)
    out = pad_packed_sequence(packed_output(out, seq), total_length=T)[0]
    h_n = unsort_batch(h_n, seq.unsorted_indices)
    d_grid = layer_input(pack_padded_sequence(g_out, lengths, enforce_sorted=False))[0]
    dx, dh0, grads = _stack_backward(d_grid, sort_batch(g_h, seq.sorted_indices), caches, s_len)
    dx = pad_packed_sequence(packed_output(dx, seq), total_length=T)[0]
    dh0 = unsort_batch(dh0, seq.unsorted_indices)

    tol = TOL[dtype]
    np.testing.assert_allclose(out, t_out.detach().numpy(), err_msg="output", **tol)
    np.testing.assert_allclose(h_n, t_h.detach().numpy(), err_msg="h_n", **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), err_msg="d input", **tol)
    np.testing.assert_allclose(dh0, ht.grad.numpy(), err_msg="d h_0", **tol)
    for k in range(2 * L):
        for name, g, p in zip(names[4 * k : 4 * k + 4], grads[k], list(twin.parameters())[4 * k :]):
            np.testing.assert_allclose(g, p.grad.numpy(), err_msg=name, **tol)


def test_unsorted_packed_pipeline_matches_central_differences(backend):
    """pack_padded_sequence(enforce_sorted=False) -> the sorted grid -> both directions -> back
    to the user's order: the whole path's gradients for x, h0 and every weight, by central
    differences (lengths uneven, unsorted, one of length 1)."""
    T, B, I, H = 3, 3, 2, 2
    lengths = np.array([2, 3, 1])
    rng = np.random.default_rng(8)
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((2, B, H))
    weights = [_weights(rng, I, H, np.float64) for _ in range(2)]
    g_out, g_h = rng.standard_normal((T, B, 2 * H)), rng.standard_normal((2, B, H))

    def run():
        seq = pack_padded_sequence(x, lengths, enforce_sorted=False)
        grid, bs = layer_input(seq)
        out, h_n, caches = _stack_forward(grid, sort_batch(h0, seq.sorted_indices), weights, bs,
                                          lengths_of(bs))
        out = pad_packed_sequence(packed_output(out, seq), total_length=T)[0]
        return seq, bs, out, unsort_batch(h_n, seq.unsorted_indices), caches

    def loss():
        _, _, out, h_n, _ = run()
        return float((out * g_out).sum() + (h_n * g_h).sum())

    seq, bs, _, _, caches = run()
    d_grid = layer_input(pack_padded_sequence(g_out, lengths, enforce_sorted=False))[0]
    dx, dh0, grads = _stack_backward(d_grid, sort_batch(g_h, seq.sorted_indices), caches, lengths_of(bs))
    dx = pad_packed_sequence(packed_output(dx, seq), total_length=T)[0]
    dh0 = unsort_batch(dh0, seq.unsorted_indices)
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-7, err_msg="x")
    np.testing.assert_allclose(dh0, numerical_grad(loss, h0), rtol=1e-6, atol=1e-7, err_msg="h0")
    for k in range(2):
        for name, p, g in zip(["W_ih", "W_hh", "b_ih", "b_hh"], weights[k], grads[k]):
            np.testing.assert_allclose(g, numerical_grad(loss, p), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} direction {k}")


@pytest.mark.parametrize("lengths", [None, [3, 2, 2, 1]], ids=["full", "packed"])
@pytest.mark.parametrize("path", list(PATHS))
def test_save_false_gives_the_same_numbers_and_no_cache(path, lengths):
    rng = np.random.default_rng(9)
    T, B, I, H = 3, 4, 2, 5
    bs = None if lengths is None else _batch_sizes(lengths, T)
    args = (rng.standard_normal((T, B, I)), rng.standard_normal((B, H)), *_weights(rng, I, H, np.float64))
    out, h_T, cache = PATHS[path][0](*args, batch_sizes=bs)
    out2, h_T2, cache2 = PATHS[path][0](*args, batch_sizes=bs, save=False)
    assert cache is not None and cache2 is None
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(h_T2, h_T)


@pytest.mark.skipif("fused" not in PATHS, reason="numba not importable")
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_one_compiled_path_with_and_without_save(T, dtype):
    """B == 1 runs every step in one compiled call (dot products with the weight rows); with and
    without save it gives the reference's numbers, and its cache serves the usual backward."""
    rng = np.random.default_rng(T)
    I, H = 4, 9
    x, h0 = rng.standard_normal((T, 1, I)).astype(dtype), rng.standard_normal((1, H)).astype(dtype)
    params = _weights(rng, I, H, dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=2e-5)
    want = gru.reference_forward(x, h0, *params)
    for save in (True, False):
        got = gru.fused_forward(x, h0, *params, save=save)
        np.testing.assert_allclose(got[0], want[0], **tol)
        np.testing.assert_allclose(got[1], want[1], **tol)
        assert (got[2] is None) == (not save)
    dout, dh = rng.standard_normal((T, 1, H)).astype(dtype), rng.standard_normal((1, H)).astype(dtype)
    got_cache = gru.fused_forward(x, h0, *params)[2]
    for g, w in zip(gru.fused_backward(dout, dh, got_cache), gru.reference_backward(dout, dh, want[2])):
        np.testing.assert_allclose(g, w, **tol)
