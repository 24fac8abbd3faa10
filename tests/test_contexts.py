"""Saved state as a value (return_ctx / ctx=), and the guards that keep a backward from silently
going wrong: each case here gave wrong gradients without an error before contexts existed.

The BPTT cases are held against torch's autograd through the same Python loop, in float64.
Shape letters: L sequence length, N batch, I input size, H hidden size.
"""

import inspect
import threading

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from lstmkit.contexts import Parameter

L, N, I, H = 5, 3, 4, 6
TOL = dict(rtol=1e-10, atol=1e-12)


def torch_twin(ours, cls, **kw):
    twin = cls(**kw).double()
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    return twin


def leaf(a):
    return torch.tensor(a, requires_grad=True)


def assert_grads_match(ours, twin):
    for name, p in twin.named_parameters():
        np.testing.assert_allclose(ours.grads[name], p.grad.numpy(), **TOL, err_msg=name)


# ---------------------------------------------------------------------- BPTT through Python loops

@pytest.mark.parametrize("kind", ["lstm", "rnn", "gru"])
def test_cell_stepped_over_a_sequence_then_bptt_in_reverse_equals_torch(kind, backend):
    cls, tcls = {"lstm": (LSTMCell, torch.nn.LSTMCell), "rnn": (RNNCell, torch.nn.RNNCell),
                 "gru": (GRUCell, torch.nn.GRUCell)}[kind]
    cell = cls(I, H, dtype=np.float64, seed=0)
    twin = torch_twin(cell, tcls, input_size=I, hidden_size=H)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((L, N, I))
    g = rng.standard_normal((L, N, H))          # a loss on every step's h
    state, ctxs, hs = None, [], []
    for t in range(L):
        state, ctx = cell(x[t], state, return_ctx=True)
        ctxs.append(ctx)
        hs.append(state[0] if kind == "lstm" else state)
    tx, t_state, loss = leaf(x), None, 0.0
    for t in range(L):
        t_state = twin(tx[t], t_state)
        loss = loss + ((t_state[0] if kind == "lstm" else t_state) * torch.from_numpy(g[t])).sum()
    loss.backward()
    dh_next = dc_next = None
    dx = np.empty_like(x)
    for t in reversed(range(L)):       # the gradient at h_t: this step's loss plus what step t+1 sent back
        dh = g[t] if dh_next is None else g[t] + dh_next
        if kind == "lstm":
            dx[t], (dh_next, dc_next) = cell.backward((dh, dc_next), ctx=ctxs[t])
        else:
            dx[t], dh_next = cell.backward(dh, ctx=ctxs[t])
    np.testing.assert_allclose(dx, tx.grad.numpy(), **TOL)
    assert_grads_match(cell, twin)


def test_full_bptt_across_two_chunks_through_one_lstm_equals_torch(backend):
    lstm = LSTM(I, H, num_layers=2, proj_size=3, dtype=np.float64, seed=0)
    twin = torch_twin(lstm, torch.nn.LSTM, input_size=I, hidden_size=H, num_layers=2, proj_size=3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2 * L, N, I))
    g = rng.standard_normal((2 * L, N, 3))
    out1, state1, ctx1 = lstm(x[:L], return_ctx=True)
    out2, state2, ctx2 = lstm(x[L:], state1, return_ctx=True)
    tx = leaf(x)
    t_out1, t_state1 = twin(tx[:L])
    t_out2, _ = twin(tx[L:], t_state1)
    ((t_out1 * torch.from_numpy(g[:L])).sum() + (t_out2 * torch.from_numpy(g[L:])).sum()).backward()
    dx2, dstate1 = lstm.backward(g[L:], ctx=ctx2)
    dx1, _ = lstm.backward(g[:L], dstate1, ctx=ctx1)
    np.testing.assert_allclose(np.concatenate([dx1, dx2]), tx.grad.numpy(), **TOL)
    assert_grads_match(lstm, twin)


@pytest.mark.parametrize("cls", [RNN, GRU])
def test_one_module_serves_two_inputs_of_the_same_shape(cls, backend):
    rnn = cls(I, H, dtype=np.float64, seed=0)
    twin = torch_twin(rnn, getattr(torch.nn, cls.__name__), input_size=I, hidden_size=H)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((L, N, I)), rng.standard_normal((L, N, I))
    out_a, _, ctx_a = rnn(a, return_ctx=True)
    out_b, _, ctx_b = rnn(b, return_ctx=True)
    ta, tb = leaf(a), leaf(b)
    (twin(ta)[0].sum() + 2 * twin(tb)[0].sum()).backward()
    da, _ = rnn.backward(np.ones_like(out_a), ctx=ctx_a)      # in forward order this time
    db, _ = rnn.backward(2 * np.ones_like(out_b), ctx=ctx_b)
    np.testing.assert_allclose(da, ta.grad.numpy(), **TOL)
    np.testing.assert_allclose(db, tb.grad.numpy(), **TOL)
    assert_grads_match(rnn, twin)


def test_a_loss_on_h_n_alone_needs_no_grad_output(backend):
    lstm = LSTM(I, H, dtype=np.float64, seed=0)
    x = np.random.default_rng(4).standard_normal((L, N, I))
    out, (h_n, c_n) = lstm(x)
    dx, _ = lstm.backward(grad_state=(np.ones_like(h_n), None))
    lstm(x)
    dx_zeros, _ = lstm.backward(np.zeros_like(out), (np.ones_like(h_n), np.zeros_like(c_n)))
    np.testing.assert_array_equal(dx, dx_zeros)
    assert np.abs(dx).sum() > 0


def test_backward_signatures_are_the_same_across_modules():
    seq = ["self", "grad_output", "grad_state", "ctx", "retain"]
    for cls in (LSTM, RNN, GRU):
        assert list(inspect.signature(cls.backward).parameters) == seq, cls
    for cls in (LSTMCell, RNNCell, GRUCell):
        assert list(inspect.signature(cls.backward).parameters) == ["self"] + seq[2:], cls
    for cls in (LSTM, RNN, GRU, LSTMCell, RNNCell, GRUCell):
        params = inspect.signature(cls.backward).parameters
        assert all(p.default is not inspect.Parameter.empty for n, p in params.items() if n != "self")


# ---------------------------------------------------------------------- guards

def lstm_and_input(**kw):
    lstm = LSTM(I, H, dtype=np.float64, seed=0, **kw)
    rng = np.random.default_rng(5)
    return lstm, rng.standard_normal((L, N, I)), rng.standard_normal((1, N, H)), rng.standard_normal((1, N, H))


def test_a_cell_loop_with_plain_calls_refuses_instead_of_giving_wrong_gradients(backend):
    cell = LSTMCell(I, H, dtype=np.float64, seed=0)
    x = np.random.default_rng(6).standard_normal((2, N, I))
    h1, c1 = cell(x[0])
    h2, c2 = cell(x[1], (h1, c1))
    cell.backward((np.ones_like(h2), None))                   # the latest step: right
    with pytest.raises(RuntimeError, match="second time"):
        cell.backward((np.ones_like(h1), None))               # meant for step 1, which the module no longer has


def test_a_second_backward_refuses_unless_the_first_retained():
    lstm, x, _, _ = lstm_and_input()
    out, _ = lstm(x)
    lstm.backward(np.ones_like(out))
    once = {k: g.copy() for k, g in lstm.grads.items()}
    with pytest.raises(RuntimeError, match="second time.*retain=True"):
        lstm.backward(np.ones_like(out))
    assert all(np.array_equal(once[k], g) for k, g in lstm.grads.items())   # nothing was added
    lstm.zero_grad()
    out, _, ctx = lstm(x, return_ctx=True)
    lstm.backward(np.ones_like(out), ctx=ctx, retain=True)
    lstm.backward(np.ones_like(out), ctx=ctx)
    for k in once:
        np.testing.assert_allclose(lstm.grads[k], 2 * once[k], **TOL)
    with pytest.raises(RuntimeError, match="second time"):
        lstm.backward(np.ones_like(out), ctx=ctx)
    assert ctx.saved is None          # the freed context holds no arrays


def test_a_plain_backward_after_a_forward_that_returned_its_context_refuses():
    lstm, x, _, _ = lstm_and_input()
    out, _ = lstm(x)
    lstm(x, return_ctx=True)          # overwrites the context the plain call kept
    with pytest.raises(RuntimeError, match="return_ctx=True.*ctx=ctx"):
        lstm.backward(np.ones_like(out))


def test_a_context_of_another_module_is_refused():
    a, x, _, _ = lstm_and_input()
    b, _, _, _ = lstm_and_input()
    out, _, ctx = a(x, return_ctx=True)
    with pytest.raises(RuntimeError, match="another module"):
        b.backward(np.ones_like(out), ctx=ctx)
    with pytest.raises(TypeError, match="ctx must be"):
        b.backward(np.ones_like(out), ctx={"caches": []})


@pytest.mark.parametrize("what", ["input", "h_0", "c_0"])
def test_caller_arrays_modified_in_place_before_backward_raise_like_torch(what, backend):
    lstm, x, h0, c0 = lstm_and_input()
    arrays = {"input": x, "h_0": h0, "c_0": c0}
    twin = torch_twin(lstm, torch.nn.LSTM, input_size=I, hidden_size=H)
    t_arrays = {k: torch.tensor(v, requires_grad=(k == "input")) for k, v in arrays.items()}
    t_out, _ = twin(t_arrays["input"], (t_arrays["h_0"], t_arrays["c_0"]))
    with torch.no_grad():
        t_arrays[what].mul_(2)
    with pytest.raises(RuntimeError):
        t_out.sum().backward()
    out, (h_n, c_n) = lstm(x, (h0, c0))
    if what == "h_0":
        h0[...] = h_n        # the state-buffer pattern, done before backward instead of after
    else:
        arrays[what][0, 0, 0] += 1.0
    with pytest.raises(RuntimeError, match=f"{what}.*modified in place"):
        lstm.backward(np.ones_like(out))


def test_cell_input_and_state_modified_in_place_raise(backend):
    cell = RNNCell(I, H, dtype=np.float64, seed=0)
    x, h = np.ones((N, I)), np.ones((N, H))
    cell(x, h)
    h[0, 0] = 2.0
    with pytest.raises(RuntimeError, match="hx was modified in place"):
        cell.backward(np.ones((N, H)))
    cell(x, np.ones((N, H)))
    x[1, 1] = 0.0
    with pytest.raises(RuntimeError, match="the input was modified in place"):
        cell.backward(np.ones((N, H)))


@pytest.mark.parametrize("update", [
    lambda p, g: p.__isub__(0.1 * g),                         # what lstmkit's optimizers do: p -= lr * g
    lambda p, g: p.__setitem__((0, 0), 1.5),
    lambda p, g: p[1].__imul__(0.5),                          # through a view
    lambda p, g: np.copyto(p, g),
    lambda p, g: p.fill(0.25),
    lambda p, g: np.subtract(p, g, out=p),
], ids=["isub", "setitem", "view", "copyto", "fill", "ufunc-out"])
def test_weights_modified_in_place_before_backward_raise(update):
    lstm, x, _, _ = lstm_and_input()
    out, _ = lstm(x)
    update(lstm.weight_hh_l0, np.ones_like(lstm.weight_hh_l0))
    with pytest.raises(RuntimeError, match="weight_hh_l0 was modified in place"):
        lstm.backward(np.ones_like(out))


def test_editing_the_returned_output_in_place_changes_no_gradient(backend):
    for edit in (False, True):
        lstm, x, h0, c0 = lstm_and_input()
        out, (h_n, c_n) = lstm(x, (h0, c0))
        if edit:
            out *= 3.0
            h_n[...] = 0.0
            c_n[...] = 0.0
        dx, (dh0, dc0) = lstm.backward(np.ones(out.shape), (np.ones(h_n.shape), np.ones(c_n.shape)))
        if not edit:
            expected = dx, dh0, dc0, {k: g.copy() for k, g in lstm.grads.items()}
    np.testing.assert_array_equal(dx, expected[0])
    np.testing.assert_array_equal(dh0, expected[1])
    np.testing.assert_array_equal(dc0, expected[2])
    for k, g in lstm.grads.items():
        np.testing.assert_array_equal(g, expected[3][k], err_msg=k)


@pytest.mark.parametrize("make", [lambda: GRU(I, H, dtype=np.float64, seed=0),
                                  lambda: GRUCell(I, H, dtype=np.float64, seed=0)], ids=["GRU", "GRUCell"])
def test_editing_a_gru_output_in_place_changes_no_gradient(make, backend):
    # The fused GRU layer's output is its cache's h: what the caller gets must be a copy.
    results = []
    for edit in (False, True):
        module = make()
        x = np.random.default_rng(10).standard_normal((L, N, I) if isinstance(module, GRU) else (N, I))
        result = module(x)
        outs = result if isinstance(result, tuple) else (result,)
        g = [np.ones(o.shape) for o in outs]
        if edit:
            for o in outs:
                o[...] = 7.0
        grads = module.backward(*g)
        results.append((grads, {k: v.copy() for k, v in module.grads.items()}))
    (g0, p0), (g1, p1) = results
    for a, b in zip(g0, g1):
        np.testing.assert_array_equal(a, b)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)


@pytest.mark.parametrize("batch", [N, 1])
def test_an_optimizer_step_is_seen_by_the_next_forward_and_backward(batch, backend):
    # b = b_ih + b_hh (and at batch 1 W_hh's transposed copy) are computed once and kept;
    # an in-place update of the parameters must refresh them.
    lstm, x, _, _ = lstm_and_input()
    x = x[:, :batch]
    out, _ = lstm(x)
    lstm.backward(np.ones_like(out))
    for p, g in zip(lstm.parameters(), lstm.grads.values()):
        p -= 0.1 * g
    fresh = LSTM(I, H, dtype=np.float64, seed=1)
    fresh.load_state_dict(lstm.state_dict())
    lstm.zero_grad()
    for m in (lstm, fresh):
        out, _ = m(x)
        m.backward(np.ones_like(out))
    np.testing.assert_array_equal(lstm(x)[0], fresh(x)[0])
    for k in lstm.grads:
        np.testing.assert_array_equal(lstm.grads[k], fresh.grads[k], err_msg=k)


# ---------------------------------------------------------------------- no_grad

def test_no_grad_keeps_nothing_and_backward_refuses(backend):
    for module, x in ((LSTM(I, H, num_layers=2, proj_size=2, dtype=np.float64, seed=0), np.ones((L, N, I))),
                      (RNN(I, H, dtype=np.float64, seed=0), np.ones((L, N, I))),
                      (GRU(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0), np.ones((L, N, I))),
                      (GRUCell(I, H, dtype=np.float64, seed=0), np.ones((N, I))),
                      (LSTMCell(I, H, dtype=np.float64, seed=0), np.ones((N, I))),
                      (RNNCell(I, H, dtype=np.float64, seed=0), np.ones((N, I)))):
        expected = module(x)
        with lstmkit.no_grad():
            got = module(x)
            *_, ctx = module(x, return_ctx=True)
        assert ctx is None and module._caches is None
        for a, b in zip(np.concatenate([np.ravel(np.asarray(e)) for e in _leaves(expected)]),
                        np.concatenate([np.ravel(np.asarray(e)) for e in _leaves(got)])):
            assert a == b
        with pytest.raises(RuntimeError, match="no_grad"):
            module.backward()


def _leaves(result):
    if isinstance(result, (tuple, list)):
        return [leaf for r in result for leaf in _leaves(r)]
    return [result]


def test_no_grad_as_decorator_nests_and_is_per_thread():
    assert lstmkit.contexts.is_grad_enabled()

    @lstmkit.no_grad()
    def inner():
        seen = []
        t = threading.Thread(target=lambda: seen.append(lstmkit.contexts.is_grad_enabled()))
        t.start()
        t.join()
        return lstmkit.contexts.is_grad_enabled(), seen[0]

    @lstmkit.no_grad
    def bare():
        return lstmkit.contexts.is_grad_enabled()

    assert bare() is False and lstmkit.contexts.is_grad_enabled()
    with lstmkit.no_grad():
        assert inner() == (False, True)           # another thread keeps its own mode
        assert not lstmkit.contexts.is_grad_enabled()
    assert lstmkit.contexts.is_grad_enabled()


def test_eval_mode_does_not_forbid_backward():
    lstm, x, _, _ = lstm_and_input()
    lstm.eval()
    out, _ = lstm(x)
    dx, _ = lstm.backward(np.ones_like(out))
    assert np.abs(dx).sum() > 0


# ---------------------------------------------------------------------- parameters

def test_assigning_a_parameter_copies_into_the_live_array():
    lstm, x, _, _ = lstm_and_input()
    live = lstm.weight_ih_l0
    new = np.random.default_rng(7).standard_normal(live.shape)
    lstm.weight_ih_l0 = new
    assert lstm.weight_ih_l0 is live and np.array_equal(live, new)
    other = LSTM(I, H, dtype=np.float64, seed=9)
    other.load_state_dict(lstm.state_dict())
    np.testing.assert_array_equal(lstm(x)[0], other(x)[0])      # forward uses what was assigned
    with pytest.raises(RuntimeError, match=r"size mismatch for weight_ih_l0.*\(24, 5\).*\(24, 4\)"):
        lstm.weight_ih_l0 = np.zeros((24, 5))
    with pytest.raises(TypeError, match="complex128"):
        lstm.weight_ih_l0 = np.zeros((24, 4), dtype=complex)
    with pytest.raises(RuntimeError, match="non-finite"):
        lstm.weight_ih_l0 = np.full((24, 4), np.nan)
    assert np.array_equal(live, new)


def test_load_state_dict_checks_every_value_before_writing_any():
    lstm = LSTM(I, H, num_layers=2, seed=0)
    before = lstm.state_dict()
    for bad_value in (np.full(before["bias_hh_l1"].shape, np.inf, np.float32),
                      np.zeros(before["bias_hh_l1"].shape, dtype=complex),
                      np.array(["x"] * before["bias_hh_l1"].size)):
        bad = {k: np.zeros_like(v) for k, v in before.items()}
        bad["bias_hh_l1"] = bad_value                       # the last key: every other value was fine
        with pytest.raises(RuntimeError, match="bias_hh_l1"):
            lstm.load_state_dict(bad)
        assert all(np.array_equal(v, lstm.state_dict()[k]) for k, v in before.items())


def test_parameters_count_writes_and_what_they_give_out_is_plain():
    lstm = LSTM(I, H, seed=0)
    p = lstm.weight_ih_l0
    assert isinstance(p, Parameter)
    versions = [p._version]
    for write in (lambda: p[0].__iadd__(1.0), lambda: p.T.__setitem__((0, 0), 2.0),
                  lambda: np.add.at(p, [0], 1.0)):
        write()
        versions.append(p._version)
    assert versions == sorted(set(versions))           # every write moved the counter
    v0 = p._version
    picked = p[[0, 1]]                                 # fancy indexing copies: writing it is not writing p
    picked[...] = 0.0
    for derived in (p * 2, p.sum(axis=0), p.copy(), np.zeros_like(p), lstm.state_dict()["weight_ih_l0"],
                    p.astype(np.float64)):
        assert type(derived) is np.ndarray
    assert p._version == v0


def test_fingerprints_see_small_edits_of_large_and_small_arrays():
    from lstmkit.contexts import fingerprint
    for shape in ((64, 16, 8), (3, 5)):          # the vectorised hash (>= 16 KiB) and zlib's CRC-32
        for dtype in (np.float32, np.float64):
            a = np.random.default_rng(8).standard_normal(shape).astype(dtype)
            edits = [lambda b: b.flat.__setitem__(7, -b.flat[7]),                 # one sign bit
                     lambda b: b.flat.__setitem__([0, 2], b.flat[[2, 0]]),        # two values swapped
                     lambda b: b.flat.__setitem__([1, 3], -b.flat[[1, 3]]),       # two sign bits
                     lambda b: b.flat.__setitem__(-1, np.nextafter(b.flat[-1], np.inf, dtype=dtype))]
            for edit in edits:
                b = a.copy()
                edit(b)
                assert fingerprint(b) != fingerprint(a), (shape, dtype)
            assert fingerprint(a.copy()) == fingerprint(a)
            assert fingerprint(np.asfortranarray(a)) == fingerprint(a)      # the bytes in C order


def test_a_large_input_modified_in_place_raises(backend):
    lstm = LSTM(8, H, seed=0)
    x = np.random.default_rng(9).standard_normal((64, 16, 8)).astype(np.float32)    # 32 KiB
    out, _ = lstm(x)
    x[-1, -1, -1] *= 2
    with pytest.raises(RuntimeError, match="the input was modified in place"):
        lstm.backward(np.ones_like(out))
