"""lstm_parts.py (float32, B >= 16: OpenBLAS's micro-kernel on packed weights, the batch in parts
side by side) against lstm_fused.py's path, the reference (functional.py) and torch.nn.LSTM; and
gemm_kernel.py's pieces: its self-check and the parts runner.

Shape letters: T time steps, B batch, I input size, H hidden size, G = 4H.
"""

import itertools

import numpy as np
import pytest

from lstmkit import LSTM
from lstmkit import functional as F

K = pytest.importorskip("lstmkit.kernels")
if not K.AVAILABLE:  # pragma: no cover - numba is a run-time dependency; this only guards odd installs
    pytest.skip("numba not importable: the fast path is off", allow_module_level=True)
from lstmkit import gemm_kernel, lstm_fused, lstm_parts  # noqa: E402

if not gemm_kernel.AVAILABLE:  # pragma: no cover - NumPy without OpenBLAS, or a core not in the table
    pytest.skip("OpenBLAS's kernel is not bound here: lstm_fused.py's path runs", allow_module_level=True)

TOL = dict(rtol=1e-4, atol=2e-5)     # float32 against float64, as tests/test_kernels.py


# an L2 so small that the units split takes the tests' small layers (its rule is tested on its own)
SMALL_L2 = 1024

def _inputs(rng, T, B, I, H, bias, h0_zero):
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)   # noqa: E731
    h0 = np.zeros((B, H), np.float32) if h0_zero else r(B, H)
    return dict(x=r(T, B, I), h0=h0, c0=r(B, H), W_ih=r(4 * H, I), W_hh=r(4 * H, H),
                b=r(4 * H) if bias else None)


def _run(a, dout, dh_T, dc_T):
    """Forward (with and without save) and backward of one layer through kernels.py."""
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    out, h_T, c_T, cache = K.lstm_layer_forward(*args)
    out = out.copy()
    lean = K.lstm_layer_forward(*args, save=False)[:3]
    grads = K.lstm_layer_backward(dout, dh_T, dc_T, cache)
    return [out, h_T, c_T, *[v.copy() for v in lean]], [None if g is None else g.copy() for g in grads]


# (tile_gemm's tile where the product's output columns are whole panels: G forward, H and I backward;
# with AVX-512 panels of 64: forward at H = 16, 32, 64, dx at I = 64, dh at H = 64)
@pytest.mark.parametrize("T, B, I, H", [(5, 16, 7, 9), (3, 33, 20, 16), (1, 17, 3, 5), (6, 40, 64, 32),
                                        (4, 24, 70, 64), (2, 24, 64, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("h0_zero", [True, False])
@pytest.mark.parametrize("final_grads", [True, False])
def test_parts_match_reference_and_lstm_fused(T, B, I, H, bias, h0_zero, final_grads, monkeypatch):
    rng = np.random.default_rng(T * B + I + H + bias)
    a = _inputs(rng, T, B, I, H, bias, h0_zero)
    dout = rng.standard_normal((T, B, H)).astype(np.float32)
    dh_T, dc_T = ((rng.standard_normal((B, H)).astype(np.float32), rng.standard_normal((B, H)).astype(np.float32))
                  if final_grads else (None, None))
    taken = []
    run = gemm_kernel.run_parts
    monkeypatch.setattr(gemm_kernel, "run_parts",
                        lambda part, rows, **kw: (taken.append((part, len(rows))), run(part, rows, **kw)))
    values, grads = _run(a, dout, dh_T, dc_T)
    n = gemm_kernel.parts_for(B)
    part = lstm_parts._part
    assert taken == [(part(lstm_parts._forward_part), n)] * 2 + [(part(lstm_parts._backward_part), n),
                                                                 (part(lstm_parts._weight_part), n)], taken
    monkeypatch.setattr(lstm_parts, "ENABLED", False)
    values_old, grads_old = _run(a, dout, dh_T, dc_T)
    assert len(taken) == 4                                       # ... and this time it did not

    a64 = {k: None if v is None else v.astype(np.float64) for k, v in a.items()}
    out, h_T, c_T, cache = F.lstm_layer_forward(a64["x"], a64["h0"], a64["c0"], a64["W_ih"], a64["W_hh"], a64["b"])
    want_grads = F.lstm_layer_backward(dout.astype(np.float64), None if dh_T is None else dh_T.astype(np.float64),
                                       None if dc_T is None else dc_T.astype(np.float64), cache)
    for name, got, old, want in zip(["out", "h_T", "c_T", "out (no save)", "h_T (no save)", "c_T (no save)"],
                                    values, values_old, [out, h_T, c_T] * 2):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL)
        np.testing.assert_allclose(got, old, err_msg=name, **TOL)
    for name, got, old, want in zip(["dx", "dh0", "dc0", "dW_ih", "dW_hh", "db", "dW_hr"], grads, grads_old,
                                    want_grads):
        assert (got is None) == (want is None) == (old is None), name
        if want is not None:
            assert got.dtype == np.float32, name
            np.testing.assert_allclose(got, want, err_msg=name, **TOL)
            np.testing.assert_allclose(got, old, err_msg=name, **TOL)


def test_three_parts_and_uneven_rows(monkeypatch):
    """More parts than this machine's cores, of unequal sizes: each row belongs to exactly one."""
    monkeypatch.setattr(gemm_kernel, "parts_for", lambda B: 3)
    assert gemm_kernel.row_ranges(50, 3) == [(0, 16), (16, 33), (33, 50)]
    rng = np.random.default_rng(3)
    a = _inputs(rng, 4, 50, 12, 10, True, False)
    dout = rng.standard_normal((4, 50, 10)).astype(np.float32)
    values, grads = _run(a, dout, None, None)
    monkeypatch.setattr(lstm_parts, "ENABLED", False)
    values_old, grads_old = _run(a, dout, None, None)
    for got, old in zip(values + grads, values_old + grads_old):
        if old is not None:
            np.testing.assert_allclose(got, old, **TOL)


def test_small_batches_float64_and_projection_keep_lstm_fused():
    assert lstm_parts.usable(np.dtype(np.float32), 16, False)
    assert not lstm_parts.usable(np.dtype(np.float32), 15, False)
    assert not lstm_parts.usable(np.dtype(np.float64), 64, False)
    assert not lstm_parts.usable(np.dtype(np.float32), 64, True)


LAYERS = list(itertools.product([1, 2], [False, True], [False, True], [True, False], [True, False]))


@pytest.mark.parametrize("layers, bidir, batch_first, bias, hx_given", LAYERS)
def test_module_in_parts_matches_torch(layers, bidir, batch_first, bias, hx_given):
    """The module's stack (both directions, layers feeding layers) through the parts, against torch."""
    torch = pytest.importorskip("torch")
    from oracle import assert_close, leaf, torch_twin, weighted_sum
    L, N, I, H = 5, 20, 7, 8
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias, batch_first=batch_first,
              bidirectional=bidir)
    ours = LSTM(**kw, dtype=np.float32, seed=1)
    twin = torch_twin(ours, torch.nn.LSTM, **kw)
    rng = np.random.default_rng(2)
    D = 2 if bidir else 1
    x = rng.standard_normal((N, L, I) if batch_first else (L, N, I)).astype(np.float32)
    h0, c0 = (rng.standard_normal((layers * D, N, H)).astype(np.float32) for _ in range(2))
    out, (h_n, c_n) = ours(x, (h0, c0)) if hx_given else ours(x)
    tx, th0, tc0 = leaf(x), leaf(h0), leaf(c0)
    t_out, (t_hn, t_cn) = twin(tx, (th0, tc0)) if hx_given else twin(tx)
    for got, want, what in ((out, t_out, "output"), (h_n, t_hn, "h_n"), (c_n, t_cn, "c_n")):
        assert_close(got, want, np.float32, what)
    g_out, g_h, g_c = (rng.standard_normal(v.shape).astype(np.float32) for v in (out, h_n, c_n))
    weighted_sum((t_out, t_hn, t_cn), (g_out, g_h, g_c)).backward()
    dx, (dh0, dc0) = ours.backward(g_out, (g_h, g_c))
    assert_close(dx, tx.grad, np.float32, "grad input")
    if hx_given:
        assert_close(dh0, th0.grad, np.float32, "grad h_0")
        assert_close(dc0, tc0.grad, np.float32, "grad c_0")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, np.float32, f"grad {name}")


def test_self_check_rejects_a_wrong_layout():
    """Packing the transposed-storage operand with the other copy routine must fail the check."""
    bound = gemm_kernel._bind()
    assert gemm_kernel._self_check(bound)
    swapped = dict(bound, oncopy=bound["otcopy"], otcopy=bound["oncopy"])
    assert not gemm_kernel._self_check(swapped)
    swapped = dict(bound, incopy=bound["itcopy"], itcopy=bound["incopy"])
    assert not gemm_kernel._self_check(swapped)


def test_run_parts_runs_every_row_once_on_openblas_threads():
    """Each part gets its own row, once, and parts run on different threads when there are two."""
    from numba import carray, cfunc, types

    @cfunc(types.void(types.CPointer(types.int64)))
    def part(arg):
        a = carray(arg, 3)
        out = carray(gemm_kernel.float32_at(a[0]), (a[2],))
        out[a[1]] += np.float32(a[1] + 1)

    out = np.zeros(5, np.float32)
    rows = np.array([[out.ctypes.data, p, out.size] for p in range(5)], np.int64)
    gemm_kernel.run_parts(part, rows)
    np.testing.assert_array_equal(out, [1, 2, 3, 4, 5])
    gemm_kernel.run_parts(part, rows[:1])
    np.testing.assert_array_equal(out, [2, 2, 3, 4, 5])


@pytest.mark.parametrize("B, H, split", [(24, 12, "rows"), (50, 32, "units")])
def test_layers_called_from_two_threads_at_once(B, H, split, monkeypatch):
    """Two Python threads in the parts at the same time share OpenBLAS's workers (for the units
    split, each call's parts meet at barriers while the other call waits for a worker): both
    finish, with the same results as one at a time."""
    import threading
    from lstmkit import lstm_units
    monkeypatch.setattr(lstm_units, "L2_BYTES", SMALL_L2)
    assert lstm_units.preferred(B, 10, H, 2) == (split == "units")
    rng = np.random.default_rng(5)
    inputs = [_inputs(rng, 6, B, 10, H, True, False) for _ in range(2)]
    want = [K.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], save=False)[0].copy()
            for a in inputs]
    got = [None, None]

    def run(k):
        for _ in range(20):
            a = inputs[k]
            got[k] = K.lstm_layer_forward(a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"], save=False)[0].copy()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a layer call hung with another one running"
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_binding_needs_a_known_series_and_core(monkeypatch):
    """The routines are OpenBLAS internals: another series or an unknown core binds nothing."""
    from lstmkit import blas

    def fake(config, core):
        class Lib:
            pass
        lib = Lib()
        lib.scipy_openblas_get_config64_ = lambda: config
        lib.scipy_openblas_get_corename64_ = lambda: core
        real = gemm_kernel._BOUND["lib"]
        for r in gemm_kernel._ROUTINES:
            for c in ("SKYLAKEX", "HASWELL"):
                setattr(lib, f"sgemm_{r}_{c}", getattr(real, f"sgemm_{r}_{c}", None))
        monkeypatch.setattr(blas, "_find_openblas", lambda: (lib, "scipy_openblas", "64_"))
        return gemm_kernel._bind()

    assert fake(b"OpenBLAS 0.3.31 DYNAMIC_ARCH", b"SkylakeX") is not None
    assert fake(b"OpenBLAS 0.4.0 DYNAMIC_ARCH", b"SkylakeX") is None
    assert fake(b"OpenBLAS 0.3.31 DYNAMIC_ARCH", b"Neoverse") is None


def test_packed_batch_of_equal_lengths_takes_the_parts():
    """batch_sizes all B is an ordinary batch: the same numbers through the parts, and the backward
    of its cache too."""
    rng = np.random.default_rng(6)
    a = _inputs(rng, 5, 20, 6, 8, True, False)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    dout = rng.standard_normal((5, 20, 8)).astype(np.float32)
    plain = K.lstm_layer_forward(*args)
    want = [plain[0].copy(), *[g.copy() for g in K.lstm_layer_backward(dout, None, None, plain[3])[:6]]]
    packed = K.lstm_layer_forward(*args, batch_sizes=np.full(5, 20))
    got = [packed[0], *K.lstm_layer_backward(dout, None, None, packed[3])[:6]]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("layers, bidir", [(1, False), (2, True)])
def test_no_grad_keeps_packed_weights_until_they_change(layers, bidir, monkeypatch):
    """Under no_grad the module keeps each layer's weights packed for the kernel (rnn_base's
    _derived): packed once per weight version, the output torch's before and after an optimizer
    step changes the weights in place, and after load_state_dict; a training forward packs its own
    each call and keeps none."""
    torch = pytest.importorskip("torch")
    import lstmkit
    from lstmkit.optim import SGD
    from oracle import assert_close, torch_twin
    kw = dict(input_size=7, hidden_size=8, num_layers=layers, bidirectional=bidir)
    ours = LSTM(**kw, dtype=np.float32, seed=3)
    made = []
    real = lstm_parts.pack_weights
    monkeypatch.setattr(lstm_parts, "pack_weights", lambda *w: made.append(1) or real(*w))
    x = np.random.default_rng(4).standard_normal((5, 20, 7)).astype(np.float32)
    D = 2 if bidir else 1

    def check(expect_new_packs):
        before = len(made)
        with lstmkit.no_grad():
            first = ours(x)[0].copy()
            again = ours(x)[0]
        assert len(made) - before == expect_new_packs
        np.testing.assert_array_equal(first, again)
        twin = torch_twin(ours, torch.nn.LSTM, **kw)
        with torch.no_grad():
            assert_close(first, twin(torch.from_numpy(x))[0], np.float32, "no_grad output")

    check(layers * D)
    check(0)                                         # nothing changed: the packs are reused
    out, _ = ours(x)                                 # a training step: weights updated in place
    ours.backward(np.ones_like(out))
    assert len(made) == layers * D                   # the training forward kept no packs
    SGD(dict(ours.named_parameters()), lr=0.5).step(ours.grads)
    check(layers * D)
    state = {k: v * 0.5 for k, v in ours.state_dict().items()}
    ours.load_state_dict(state)
    check(layers * D)


# ---------------------------------------------------------------------- the split by units (lstm_units.py)
from lstmkit import lstm_units  # noqa: E402


def test_units_preferred_where_weights_pass_four_l2s(monkeypatch):
    monkeypatch.setattr(lstm_units, "L2_BYTES", 1 << 20)
    assert not lstm_units.preferred(50, 128, 128, 2)       # 0.5 MiB of weights
    assert not lstm_units.preferred(32, 256, 256, 2)       # 2 MiB
    assert not lstm_units.preferred(64, 256, 256, 2)       # 2 MiB, whatever the batch
    assert lstm_units.preferred(50, 512, 512, 2)           # 8 MiB
    assert lstm_units.preferred(16, 1024, 1024, 2)         # 32 MiB
    assert not lstm_units.preferred(50, 512, 512, 1)       # one part: nothing to split
    assert not lstm_units.preferred(50, 4096, 24, 2)       # fewer than 16 units a part
    monkeypatch.setattr(lstm_units.tile_gemm, "AVAILABLE", False)
    assert not lstm_units.preferred(50, 512, 512, 2)       # the parts' padded gates need the tile
    for H in (32, 40, 48, 100, 256):
        r = lstm_units.unit_ranges(H, 2)
        assert r[0][0] == 0 and r[-1][1] == H and all(a[1] == b[0] for a, b in zip(r, r[1:]))
        assert all(j0 % lstm_units.UNIT_STEP == 0 and j1 > j0 for j0, j1 in r)


@pytest.mark.parametrize("T, B, I, H", [(5, 50, 7, 32), (3, 20, 16, 64), (4, 18, 9, 48), (6, 34, 5, 40),
                                        (2, 50, 40, 128)])
@pytest.mark.parametrize("bias", [True, False])
def test_units_match_reference_and_rows(T, B, I, H, bias, monkeypatch):
    """The no-save forward split by units (uneven unit ranges, a tail of fewer than 16 units, odd
    batches) against the float64 reference and the row parts; which path ran, spied."""
    if gemm_kernel.parts_for(B) < 2:
        pytest.skip("one core or one BLAS thread: there is nothing to split")
    monkeypatch.setattr(lstm_units, "L2_BYTES", SMALL_L2)
    rng = np.random.default_rng(T + B + I + H)
    a = _inputs(rng, T, B, I, H, bias, False)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    assert lstm_units.preferred(B, I, H, gemm_kernel.parts_for(B))
    taken = []
    run = gemm_kernel.run_parts
    monkeypatch.setattr(gemm_kernel, "run_parts", lambda part, rows, **kw: (taken.append(part), run(part, rows, **kw)))
    got = [v.copy() for v in K.lstm_layer_forward(*args, save=False)[:3]]
    assert taken == [lstm_parts._part(lstm_units._forward_part)]
    monkeypatch.setattr(lstm_units, "preferred", lambda *s: False)
    rows = K.lstm_layer_forward(*args, save=False)[:3]
    assert taken[1] == lstm_parts._part(lstm_parts._forward_part)
    a64 = {k: None if v is None else v.astype(np.float64) for k, v in a.items()}
    want = F.lstm_layer_forward(a64["x"], a64["h0"], a64["c0"], a64["W_ih"], a64["W_hh"], a64["b"])[:3]
    for name, g, r, w in zip(("out", "h_T", "c_T"), got, rows, want):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)
        np.testing.assert_allclose(g, r, err_msg=name, **TOL)


def test_barrier_orders_the_steps_of_parts():
    """Each part writes its half of a vector per step from the sum of the whole previous one: with
    the barrier every step sees both halves of the step before (without it the halves drift)."""
    from numba import carray, cfunc, types

    @cfunc(types.void(types.CPointer(types.int64)))
    def part(arg):
        a = carray(arg, 5)
        buf = carray(gemm_kernel.float32_at(a[0]), (2, a[1]))
        p, steps, n = a[3], a[4], a[1] // 2
        for t in range(steps):
            prev, cur = buf[t % 2], buf[(t + 1) % 2]
            s = np.float32(0)
            for j in range(a[1]):
                s += prev[j]
            for j in range(p * n, (p + 1) * n):
                cur[j] = s / a[1] + np.float32(1)
            gemm_kernel.barrier(a[2], 2, t)

    if gemm_kernel._blas_threads() < 2:
        pytest.skip("one BLAS thread: parts cannot meet")
    buf = np.zeros((2, 64), np.float32)
    counter = np.zeros(8, np.int64)
    steps = 2000
    rows = np.array([[buf.ctypes.data, 64, counter.ctypes.data, p, steps] for p in range(2)], np.int64)
    gemm_kernel.run_parts(part, rows)
    assert counter[0] == 2 * steps
    np.testing.assert_array_equal(buf[steps % 2], steps)        # the value after `steps` whole steps


@pytest.mark.parametrize("layers, bidir", [(1, False), (2, True)])
def test_module_no_grad_by_units_matches_torch(layers, bidir, monkeypatch):
    """A module's stack under no_grad through the units split (B = 50), against torch."""
    torch = pytest.importorskip("torch")
    import lstmkit
    from oracle import assert_close, torch_twin
    monkeypatch.setattr(lstm_units, "L2_BYTES", SMALL_L2)
    assert lstm_units.preferred(50, 24, 48, 2)
    kw = dict(input_size=24, hidden_size=48, num_layers=layers, bidirectional=bidir)
    ours = LSTM(**kw, dtype=np.float32, seed=5)
    twin = torch_twin(ours, torch.nn.LSTM, **kw)
    rng = np.random.default_rng(6)
    D = 2 if bidir else 1
    x = rng.standard_normal((7, 50, 24)).astype(np.float32)
    h0, c0 = (rng.standard_normal((layers * D, 50, 48)).astype(np.float32) for _ in range(2))
    with lstmkit.no_grad():
        out, (h_n, c_n) = ours(x, (h0, c0))
    with torch.no_grad():
        t_out, (t_hn, t_cn) = twin(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    for got, want, what in ((out, t_out, "output"), (h_n, t_hn, "h_n"), (c_n, t_cn, "c_n")):
        assert_close(got, want, np.float32, what)


def test_units_run_together_while_another_thread_lowers_blas_threads(monkeypatch):
    """blas._single_blas_thread in another Python thread sets OpenBLAS to one thread for a moment;
    the units split's parts wait for each other every step, so they must still start together (run
    in waves of the lowered count, the first would wait forever). Here the count reads 1 throughout
    the call: it finishes, with the same numbers."""
    import threading
    rng = np.random.default_rng(8)
    a = _inputs(rng, 5, 50, 10, 32, True, False)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    monkeypatch.setattr(lstm_units, "L2_BYTES", SMALL_L2)
    assert lstm_units.preferred(50, 10, 32, 2)
    want = K.lstm_layer_forward(*args, save=False)[0].copy()
    real_parts_for = gemm_kernel.parts_for
    monkeypatch.setattr(gemm_kernel, "parts_for", lambda B: real_parts_for(B))   # decided at two threads ...
    parts = gemm_kernel.parts_for(50)
    monkeypatch.setattr(gemm_kernel, "_blas_threads", lambda: 1)                 # ... run at one
    monkeypatch.setattr(gemm_kernel, "parts_for", lambda B: parts)
    got = []
    t = threading.Thread(target=lambda: got.append(K.lstm_layer_forward(*args, save=False)[0].copy()), daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the units split hung with OpenBLAS's thread count lowered"
    np.testing.assert_array_equal(got[0], want)


def test_units_never_take_more_parts_than_the_pool_had(monkeypatch):
    """More parts than OpenBLAS's pool had at import (the user raised its thread count since): the
    row parts run the call instead of the units split, which needs all parts at once."""
    monkeypatch.setattr(lstm_units, "L2_BYTES", SMALL_L2)
    assert lstm_units.preferred(50, 10, 32, 2)
    rng = np.random.default_rng(9)
    a = _inputs(rng, 4, 50, 10, 32, True, False)
    args = (a["x"], a["h0"], a["c0"], a["W_ih"], a["W_hh"], a["b"])
    want = K.lstm_layer_forward(*args, save=False)[0].copy()
    monkeypatch.setattr(gemm_kernel, "POOL_THREADS", 1)
    taken = []
    run = gemm_kernel.run_parts
    monkeypatch.setattr(gemm_kernel, "run_parts", lambda part, rows, **kw: (taken.append(part), run(part, rows, **kw)))
    got = K.lstm_layer_forward(*args, save=False)[0]
    assert taken == [lstm_parts._part(lstm_parts._forward_part)]
    np.testing.assert_allclose(got, want, **TOL)



@pytest.mark.parametrize("H, tile", [(128, True), (20, False)])
def test_batch_one_no_grad_on_the_tile_matches_torch(H, tile, monkeypatch):
    """Batch 1 over several steps under no_grad: with G whole tile panels both products run
    tile_gemm's tile on the module's kept packing (spied), against torch and the save path."""
    torch = pytest.importorskip("torch")
    import lstmkit
    from oracle import assert_close, torch_twin
    kw = dict(input_size=65, hidden_size=H, num_layers=2)
    ours = LSTM(**kw, dtype=np.float32, seed=3)
    twin = torch_twin(ours, torch.nn.LSTM, **kw)
    x = np.random.default_rng(4).standard_normal((9, 1, 65)).astype(np.float32)
    rows = []
    real_rows = lstm_parts.PackedWeights.rows
    monkeypatch.setattr(lstm_parts.PackedWeights, "rows", lambda self: (rows.append(1), real_rows(self))[1])
    with lstmkit.no_grad():
        out, (h_n, c_n) = ours(x)
    assert len(rows) == (2 if tile and lstm_parts._tile_rows(4 * H) else 0)    # one per layer
    saved, _ = ours(x)                                                           # the save path's products
    with torch.no_grad():
        t_out, (t_hn, t_cn) = twin(torch.from_numpy(x))
    for got, want, what in ((out, t_out, "output"), (h_n, t_hn, "h_n"), (c_n, t_cn, "c_n")):
        assert_close(got, want, np.float32, what)
    np.testing.assert_allclose(out, saved, **TOL)
