"""LSTM, GRU and RNN over a PackedSequence, against torch.nn with torch's own packing: the packed
output, h_n (and c_n) in the user's order, and every gradient (input, h_0, c_0, each parameter);
central differences through the whole packed path; each sequence of a batch gives what it gives
alone; the guards of contexts.py on packed input; torch's exception types for bad packed input.

Shape letters: T longest sequence, B batch (sequences), I input size, H hidden size, P proj or
hidden size, D directions, N real tokens.
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.utils.rnn as trnn

import lstmkit
from lstmkit import GRU, LSTM, RNN
from lstmkit.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from oracle import assert_close, numerical_grad, torch_twin

I, H = 3, 4
KINDS = {  # name: (our class, torch class, constructor arguments beyond the common ones)
    "lstm": (LSTM, torch.nn.LSTM, {}),
    "lstm-proj": (LSTM, torch.nn.LSTM, dict(proj_size=2)),
    "gru": (GRU, torch.nn.GRU, {}),
    "rnn-tanh": (RNN, torch.nn.RNN, dict(nonlinearity="tanh")),
    "rnn-relu": (RNN, torch.nn.RNN, dict(nonlinearity="relu")),
}
# ties and a length 1 in both; "uniform" (a bucketed batch) takes the layers' plain path
LENGTHS = {"unsorted": [3, 5, 1, 5], "sorted": [5, 5, 3, 1], "uniform": [4, 4, 4, 4]}


def _states(cls, kw, layers, bidir, B, rng, dtype):
    """Initial states in the user's order: [h_0] or [h_0, c_0]."""
    D = 2 if bidir else 1
    P = kw.get("proj_size") or H
    shapes = [(layers * D, B, P)] + ([(layers * D, B, H)] if cls is LSTM else [])
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _hx(states):
    return None if not states else (tuple(states) if len(states) == 2 else states[0])


def _flat_state(state):
    return list(state) if isinstance(state, tuple) else [state]


GRID = list(itertools.product(KINDS, [1, 2], [False, True], LENGTHS, [True, False]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, layers, bidir, order, hx_given", GRID, ids=[
    f"{k}-L{n}-{'bi' if b else 'uni'}-{o}-{'hx' if g else 'nohx'}" for k, n, b, o, g in GRID])
def test_packed_input_matches_torch(kind, layers, bidir, order, hx_given, dtype, backend):
    cls, tcls, extra = KINDS[kind]
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir, **extra)
    ours = cls(**kw, dtype=dtype, seed=2)
    twin = torch_twin(ours, tcls, **kw)
    lengths = np.array(LENGTHS[order])
    T, B = lengths.max(), len(lengths)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    states = _states(cls, extra, layers, bidir, B, rng, dtype) if hx_given else []
    seq = pack_padded_sequence(x, lengths, enforce_sorted=order == "sorted")

    out, state = ours(seq, _hx(states))
    state = _flat_state(state)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tstates = [torch.from_numpy(s.copy()).requires_grad_() for s in states]
    tseq = trnn.pack_padded_sequence(tx, torch.from_numpy(lengths), enforce_sorted=order == "sorted")
    t_out, t_state = twin(tseq, _hx(tstates))
    t_state = _flat_state(t_state)

    assert isinstance(out, PackedSequence)
    assert out.batch_sizes is seq.batch_sizes and out.sorted_indices is seq.sorted_indices
    assert out.unsorted_indices is seq.unsorted_indices
    assert_close(out.data, t_out.data, dtype, "output data")
    for k, (s, ts) in enumerate(zip(state, t_state)):
        assert_close(s, ts, dtype, f"final state {k}")

    g_out = rng.standard_normal(out.data.shape).astype(dtype)
    g_state = [rng.standard_normal(s.shape).astype(dtype) for s in state]
    loss = (t_out.data * torch.from_numpy(g_out)).sum()
    loss = loss + sum((ts * torch.from_numpy(g)).sum() for ts, g in zip(t_state, g_state))
    loss.backward()
    grad_state = tuple(g_state) if cls is LSTM else g_state[0]
    dx, dstate = ours.backward(PackedSequence(g_out, seq.batch_sizes, seq.sorted_indices), grad_state)
    assert isinstance(dx, PackedSequence) and dx.batch_sizes is seq.batch_sizes
    assert dx.sorted_indices is seq.sorted_indices
    assert_close(pad_packed_sequence(dx)[0], tx.grad, dtype, "grad input")
    for k, (d, ts) in enumerate(zip(_flat_state(dstate), tstates)):
        assert_close(d, ts.grad, dtype, f"grad initial state {k}")
    for name, p in twin.named_parameters():
        assert_close(ours.grads[name], p.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_batch_first_does_not_apply_to_packed_input(kind, backend):
    """A PackedSequence has one layout: batch_first changes nothing, as in torch."""
    cls, _, extra = KINDS[kind]
    seq = pack_padded_sequence(np.random.default_rng(0).standard_normal((4, 3, I)), [2, 4, 1],
                               enforce_sorted=False)
    a = cls(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0, **extra)
    b = cls(I, H, num_layers=2, bidirectional=True, batch_first=True, dtype=np.float64, seed=0, **extra)
    (oa, sa), (ob, sb) = a(seq), b(seq)
    np.testing.assert_array_equal(oa.data, ob.data)
    for u, v in zip(_flat_state(sa), _flat_state(sb)):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------------- central differences
GRADCHECK = {
    "lstm-proj-2-bi": (LSTM, dict(num_layers=2, bidirectional=True, proj_size=2)),
    "gru-2-bi": (GRU, dict(num_layers=2, bidirectional=True)),
    "gru-2-bi-dropout": (GRU, dict(num_layers=2, bidirectional=True, dropout=0.4)),
    "rnn-relu-2-bi": (RNN, dict(num_layers=2, bidirectional=True, nonlinearity="relu")),
    "lstm-1-nobias": (LSTM, dict(num_layers=1, bias=False)),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_packed_gradients_match_central_differences(name, backend):
    """Uneven unsorted lengths with a length 1: the packed data, h_0 (c_0) and every parameter."""
    cls, kw = GRADCHECK[name]
    module = cls(I, 3, dtype=np.float64, seed=0, **kw)
    rng = np.random.default_rng(1)
    lengths = [2, 3, 1]
    seq = pack_padded_sequence(rng.standard_normal((3, 3, I)), lengths, enforce_sorted=False)
    D = 2 if kw.get("bidirectional") else 1
    states = [rng.standard_normal((kw["num_layers"] * D, 3, kw.get("proj_size") or 3))]
    if cls is LSTM:
        states.append(rng.standard_normal((kw["num_layers"] * D, 3, 3)))

    def forward():
        module.dropout_rng = np.random.default_rng(7)     # the same dropout mask every time
        out, state = module(seq, _hx(states))
        return [out.data] + _flat_state(state)

    weights = [rng.standard_normal(o.shape) for o in forward()]

    def loss():
        return sum(float((o * w).sum()) for o, w in zip(forward(), weights))

    loss()
    module.zero_grad()
    dx, dstate = module.backward(PackedSequence(weights[0], seq.batch_sizes, seq.sorted_indices),
                                 tuple(weights[1:]) if cls is LSTM else weights[1])
    tol = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx.data, numerical_grad(loss, seq.data), err_msg="input", **tol)
    for k, (d, s) in enumerate(zip(_flat_state(dstate), states)):
        np.testing.assert_allclose(d, numerical_grad(loss, s), err_msg=f"state {k}", **tol)
    for pname, p in module.named_parameters():
        np.testing.assert_allclose(module.grads[pname], numerical_grad(loss, p), err_msg=pname, **tol)


# ---------------------------------------------------------------------- each sequence alone
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_sequence_of_a_packed_batch_gives_what_it_gives_alone(kind, backend):
    """Output rows, final states, input and state gradients of each sequence as when it runs
    alone, unbatched, at its own length; the parameter gradients are the sum over sequences:
    nothing of another sequence or of the padding reaches any of them."""
    cls, _, extra = KINDS[kind]
    module = cls(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=3, **extra)
    rng = np.random.default_rng(4)
    seqs = [rng.standard_normal((n, I)) for n in (3, 5, 1, 4)]
    padded = np.stack([np.pad(s, ((0, 5 - len(s)), (0, 0)), constant_values=np.nan) for s in seqs], 1)
    seq = pack_padded_sequence(padded, [len(s) for s in seqs], enforce_sorted=False)
    states = _states(cls, extra, 2, True, len(seqs), rng, np.float64)
    out, state = module(seq, _hx(states))
    g_out = rng.standard_normal(out.data.shape)
    g_state = [rng.standard_normal(s.shape) for s in _flat_state(state)]
    dx, dstate = module.backward(g_out, tuple(g_state) if cls is LSTM else g_state[0])
    together = {k: g.copy() for k, g in module.grads.items()}
    out_pad, g_pad = pad_packed_sequence(out)[0], pad_packed_sequence(PackedSequence(g_out, *seq[1:]))[0]
    dx_pad = pad_packed_sequence(dx)[0]
    module.zero_grad()
    tol = dict(rtol=1e-10, atol=1e-12)
    for b, s in enumerate(seqs):
        n = len(s)
        o, st = module(s, _hx([a[:, b] for a in states]))
        d, dst = module.backward(g_pad[:n, b], tuple(g[:, b] for g in g_state) if cls is LSTM else g_state[0][:, b])
        np.testing.assert_allclose(out_pad[:n, b], o, err_msg=f"output {b}", **tol)
        np.testing.assert_allclose(dx_pad[:n, b], d, err_msg=f"grad input {b}", **tol)
        for k in range(len(states)):
            np.testing.assert_allclose(_flat_state(state)[k][:, b], _flat_state(st)[k], err_msg=f"state {b}", **tol)
            np.testing.assert_allclose(_flat_state(dstate)[k][:, b], _flat_state(dst)[k], **tol)
    assert np.isfinite(out.data).all() and np.isfinite(dx.data).all()
    for k, g in module.grads.items():
        np.testing.assert_allclose(together[k], g, err_msg=k, **tol)


# ---------------------------------------------------------------------- contexts and guards
def _packed_case(cls=GRU):
    module = cls(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    rng = np.random.default_rng(6)
    seq = pack_padded_sequence(rng.standard_normal((4, 3, I)), [2, 4, 1], enforce_sorted=False)
    return module, seq, rng


@pytest.mark.parametrize("cls", [LSTM, GRU, RNN])
def test_packed_data_or_h0_modified_in_place_before_backward_raise(cls):
    module, seq, rng = _packed_case(cls)
    out, _ = module(seq)
    seq.data[1, 0] += 1.0
    with pytest.raises(RuntimeError, match="the input was modified in place"):
        module.backward(out)
    if cls is not LSTM:
        h0 = rng.standard_normal((4, 3, H))
        out, _ = module(seq, h0)
        h0[0, 2, 1] = 0.0
        with pytest.raises(RuntimeError, match="h_0 was modified in place"):
            module.backward(out)


def test_packed_contexts_serve_two_batches_in_any_order_and_retain(backend):
    module, seq, rng = _packed_case()
    other = pack_padded_sequence(rng.standard_normal((3, 2, I)), [3, 1])
    out_a, _, ctx_a = module(seq, return_ctx=True)
    out_b, _, ctx_b = module(other, return_ctx=True)
    ga, gb = rng.standard_normal(out_a.data.shape), rng.standard_normal(out_b.data.shape)
    module.backward(gb, ctx=ctx_b)
    module.backward(ga, ctx=ctx_a, retain=True)
    both = {k: g.copy() for k, g in module.grads.items()}
    module.zero_grad()
    for s, g in ((seq, ga), (other, gb)):
        module(s)
        module.backward(g)
    for k in both:
        np.testing.assert_allclose(both[k], module.grads[k], rtol=1e-12, atol=1e-14, err_msg=k)
    dx_plain, _ = module.backward(ga, ctx=ctx_a)           # the retained context, as a data array
    with pytest.raises(RuntimeError, match="second time"):
        module.backward(ga, ctx=ctx_a)
    assert dx_plain.data.shape == seq.data.shape


def test_packed_no_grad_gives_the_same_numbers_and_keeps_nothing(backend):
    for cls in (LSTM, GRU, RNN):
        module, seq, _ = _packed_case(cls)
        out, state = module(seq)
        with lstmkit.no_grad():
            out2, state2 = module(seq)
        np.testing.assert_array_equal(out.data, out2.data)
        for a, b in zip(_flat_state(state), _flat_state(state2)):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(RuntimeError, match="no_grad"):
            module.backward(out)


@pytest.mark.parametrize("lengths", [[4, 4, 4], [4, 2, 3]], ids=["uniform", "uneven"])
@pytest.mark.parametrize("cls", [LSTM, GRU, RNN])
def test_editing_a_packed_output_in_place_changes_no_gradient(cls, lengths, backend):
    seq = pack_padded_sequence(np.random.default_rng(8).standard_normal((4, 3, I)), lengths, enforce_sorted=False)
    results = []
    for edit in (False, True):
        module = cls(I, H, dtype=np.float64, seed=0)
        out, state = module(seq)
        g = np.random.default_rng(9).standard_normal(out.data.shape)
        if edit:
            out.data[...] = 5.0
            for s in _flat_state(state):
                s[...] = 5.0
        dx, _ = module.backward(g)
        results.append((dx.data, {k: v.copy() for k, v in module.grads.items()}))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for k in results[0][1]:
        np.testing.assert_array_equal(results[0][1][k], results[1][1][k], err_msg=k)


def test_packed_grad_output_must_be_packed_like_the_output():
    module, seq, _ = _packed_case()
    out, _ = module(seq)
    wrong = pack_padded_sequence(np.zeros((4, 3, 2 * H)), [4, 2, 2])
    with pytest.raises(RuntimeError, match=r"batch_sizes \[3, 2, 1, 1\], got \[3, 3, 1, 1\]"):
        module.backward(wrong)
    with pytest.raises(RuntimeError, match=r"\(7, 8\).*\(6, 8\)"):
        module.backward(np.zeros((6, 2 * H)))


# ---------------------------------------------------------------------- bad packed input
def _torch_type(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - whatever torch raises
        return type(e)
    return None


SORTED = pack_padded_sequence(np.zeros((3, 3, I), np.float32), [3, 2, 1])
UNSORTED = pack_padded_sequence(np.zeros((3, 3, I), np.float32), [2, 3, 1], enforce_sorted=False)


def _tp(seq, data=None):
    """torch's PackedSequence of the same layout (other data if given)."""
    idx = None if seq.sorted_indices is None else torch.from_numpy(seq.sorted_indices)
    return trnn.PackedSequence(torch.from_numpy(seq.data if data is None else data),
                               torch.from_numpy(seq.batch_sizes), idx)


BAD = [  # (id, class, packed sequence, data replacing its own or None, h_0 shape or None, words)
    ("data 3-D", GRU, SORTED, np.zeros((6, 1, I), np.float32), None, ["2 dimensions", "got 3"]),
    ("data wrong input_size", LSTM, SORTED, np.zeros((6, 5), np.float32), None, ["Expected 3", "got 5"]),
    ("data float64", RNN, SORTED, np.zeros((6, I)), None, ["float64", "float32"]),
    ("h_0 wrong batch", GRU, SORTED, None, (1, 2, H), ["(1, 3, 4)", "[1, 2, 4]"]),
    ("h_0 wrong batch, unsorted", GRU, UNSORTED, None, (1, 2, H), ["(1, 3, 4)", "[1, 2, 4]"]),
    ("h_0 2-D", RNN, SORTED, None, (1, H), ["3-D", "2-D"]),
    ("too few rows", GRU, SORTED, np.zeros((5, I), np.float32), None, ["5 rows", "add up to 6"]),
]


@pytest.mark.parametrize("cls, seq, data, h0_shape, words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_packed_input_raises_torchs_exception_type(cls, seq, data, h0_shape, words):
    ours = cls(I, H)
    twin = getattr(torch.nn, cls.__name__)(I, H)
    h0 = None if h0_shape is None else np.zeros(h0_shape, np.float32)
    if cls is LSTM and h0 is not None:
        h0, th0 = (h0, h0), (torch.from_numpy(h0), torch.from_numpy(h0))
    else:
        th0 = None if h0 is None else torch.from_numpy(h0)
    expected = _torch_type(lambda: twin(_tp(seq, data), th0))
    assert expected is not None, "torch accepted this input; the case is wrong"
    bad = seq if data is None else PackedSequence(data, seq.batch_sizes, seq.sorted_indices)
    with pytest.raises(expected) as info:
        ours(bad, h0)
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} does not mention {word!r}"


def test_wrong_h0_batch_with_unsorted_input_is_refused_where_torch_goes_on():
    """torch permutes h_0 by sorted_indices before checking its size: an h_0 with MORE rows than
    sequences is silently cut to the first rows the indices pick. lstmkit refuses it."""
    twin = torch.nn.GRU(I, H)
    twin(_tp(UNSORTED), torch.zeros(1, 5, H))         # torch goes on
    with pytest.raises(RuntimeError, match=r"\(1, 3, 4\), got \[1, 5, 4\]"):
        GRU(I, H)(UNSORTED, np.zeros((1, 5, H), np.float32))


def test_exports():
    """lstmkit.GRU, lstmkit.GRUCell, and lstmkit.utils.rnn's functions under torch's names."""
    import lstmkit.utils.rnn as ours
    assert lstmkit.utils.rnn is ours and lstmkit.GRU is GRU and lstmkit.GRUCell.__name__ == "GRUCell"
    assert set(ours.__all__) == {n for n in dir(trnn) if n in ours.__all__}
    for name in ("pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "unpack_sequence",
                 "pad_sequence", "unpad_sequence", "PackedSequence", "invert_permutation"):
        assert name in ours.__all__ and hasattr(trnn, name), name


def test_the_backend_fixture_switches_the_gru_modules_too(backend):
    """gru.py picks its path by LSTMKIT_REFERENCE as modules do, so every GRU test above runs
    both paths under the backend fixture."""
    want = "reference" if backend == "reference" else "fused"
    gru = GRU(I, H, dtype=np.float64, seed=0)
    _, _, ctx = gru(np.zeros((2, 3, I)), return_ctx=True)
    _, _, packed_ctx = gru(_packed_case()[1], return_ctx=True)
    cell = lstmkit.GRUCell(I, H, dtype=np.float64, seed=0)
    _, cell_ctx = cell(np.zeros((3, I)), return_ctx=True)
    assert {c.caches[0][0]["path"] for c in (ctx, packed_ctx, cell_ctx)} == {want}
