"""Packed batches: lstmkit.utils.rnn against torch.nn.utils.rnn (results, indices, dtypes and
errors), the layer-side helpers of lstmkit.packed, and the LSTM and RNN layers run over packed
batches against torch.nn.LSTM / torch.nn.RNN.

Shape letters: T time steps, B batch, I input size, H hidden size, N real tokens.
"""

import numpy as np
import pytest
import torch
import torch.nn.utils.rnn as trnn

from lstmkit import functional, gru, packed
from lstmkit.utils import rnn
from oracle import TOL

try:
    from lstmkit import kernels
    LAYERS = [functional, kernels] if kernels.AVAILABLE else [functional]
except ImportError:  # pragma: no cover
    LAYERS = [functional]


def _same(ours, theirs, what):
    """Our array equals torch's tensor exactly, dtype included (None matches None)."""
    if theirs is None:
        assert ours is None, what
        return
    theirs = theirs.detach().numpy()
    assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype, (what, ours, theirs.dtype)
    np.testing.assert_array_equal(ours, theirs, err_msg=what)


def _same_packed(ours, theirs):
    assert isinstance(ours, rnn.PackedSequence) and isinstance(ours, tuple)
    for field in theirs._fields:
        _same(getattr(ours, field), getattr(theirs, field), field)


# ---------------------------------------------------------------------- against torch's results
CASES = [  # (padded shape with T and B first, lengths)
    ((4, 3, 2), [4, 2, 1]),
    ((4, 3, 2), [2, 4, 1]),
    ((5, 4), [3, 5, 3, 1]),            # no feature dimension; a tie
    ((3, 2, 2, 3), [3, 3]),            # two feature dimensions; all equal
    ((6, 1, 2), [4]),                  # one sequence, shorter than the padding
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape, lengths, enforce_sorted",
                         [(*c, e) for c in CASES for e in (True, False)
                          if not e or c[1] == sorted(c[1], reverse=True)], ids=str)
def test_pack_and_pad_match_torch(shape, lengths, batch_first, enforce_sorted):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    if batch_first:
        x = np.ascontiguousarray(x.swapaxes(0, 1))
    ours = rnn.pack_padded_sequence(x, np.array(lengths, dtype=np.int32), batch_first, enforce_sorted)
    theirs = trnn.pack_padded_sequence(torch.from_numpy(x), lengths, batch_first, enforce_sorted)
    _same_packed(ours, theirs)
    for total_length in (None, shape[0] + 2):
        got = rnn.pad_packed_sequence(ours, batch_first, -1.5, total_length)
        want = trnn.pad_packed_sequence(theirs, batch_first, -1.5, total_length)
        _same(got[0], want[0], "padded")
        _same(got[1], want[1], "lengths")


@pytest.mark.parametrize("B", [16, 40])
def test_unsorted_ties(B):
    """enforce_sorted=False with many equal lengths. Up to 16 sequences torch's sort is stable
    and sorted_indices must be torch's exactly; beyond, torch orders ties by its sort's internals
    (not documented; ours stay stable), and everything else must still agree."""
    lengths = np.random.default_rng(0).integers(1, 4, size=B)
    x = np.random.default_rng(1).standard_normal((3, B))
    ours = rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    theirs = trnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths), enforce_sorted=False)
    if B <= 16:
        _same_packed(ours, theirs)
    _same(ours.batch_sizes, theirs.batch_sizes, "batch_sizes")
    np.testing.assert_array_equal(lengths[ours.sorted_indices], lengths[theirs.sorted_indices.numpy()])
    _same(ours.unsorted_indices[ours.sorted_indices], torch.arange(B), "unsorted inverts sorted")
    for got, want in zip(rnn.pad_packed_sequence(ours), trnn.pad_packed_sequence(theirs)):
        _same(got, want, "unpacked")


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_pad_and_pack_sequence_match_torch(batch_first, padding_side):
    rng = np.random.default_rng(1)
    seqs = [rng.standard_normal((n, 2)) for n in (2, 5, 1, 5)]
    tseqs = [torch.from_numpy(s) for s in seqs]
    _same(rnn.pad_sequence(seqs, batch_first, 7.0, padding_side),
          trnn.pad_sequence(tseqs, batch_first, 7.0, padding_side), "pad_sequence")
    ours, theirs = rnn.pack_sequence(seqs, enforce_sorted=False), trnn.pack_sequence(tseqs, enforce_sorted=False)
    _same_packed(ours, theirs)
    for got, want in zip(rnn.unpack_sequence(ours), trnn.unpack_sequence(theirs)):
        _same(got, want, "unpack_sequence")
    _same_packed(rnn.pack_sequence(sorted(seqs, key=len, reverse=True)),
                 trnn.pack_sequence(sorted(tseqs, key=len, reverse=True)))


def test_packed_sequence_constructs_as_torch():
    data, bs, idx = np.arange(3.0), np.array([2, 1]), np.array([1, 0])
    theirs = trnn.PackedSequence(torch.from_numpy(data), torch.from_numpy(bs), torch.from_numpy(idx))
    _same_packed(rnn.PackedSequence(data, bs, idx), theirs)     # unsorted_indices derived
    _same_packed(rnn.PackedSequence((data, bs)),
                 trnn.PackedSequence((torch.from_numpy(data), torch.from_numpy(bs))))
    with pytest.raises(AssertionError, match="list or tuple of length 2"):
        rnn.PackedSequence(data)
    assert rnn.PackedSequence._fields == trnn.PackedSequence._fields


# ---------------------------------------------------------------------- errors, as torch raises them
TORCH_ERRORS = [  # (padded shape, lengths, enforce_sorted, words torch's message and ours share)
    ((4, 3, 2), [4, 3, 0], True, "Length of all samples has to be greater than 0"),
    ((4, 3, 2), [4, 0, 1], False, "Length of all samples has to be greater than 0"),
    ((4, 3, 2), [3, 4, 1], True, "`lengths` array must be sorted in decreasing order"),
    ((4, 3, 2), [4, 3], True, "Expected `len(lengths)` to be equal to batch_size, but got 2 (batch_size=3)"),
    ((4, 0, 2), [], True, "Cannot pack empty tensors."),
    ((4,), [4], True, "Dimension out of range"),
    ((4, 3, 2), [[4, 3, 1]], True, "'lengths' argument should be a 1D"),
]


@pytest.mark.parametrize("shape, lengths, enforce_sorted, words", TORCH_ERRORS, ids=str)
def test_bad_lengths_raise_torchs_exception(shape, lengths, enforce_sorted, words):
    with pytest.raises(Exception) as theirs:
        trnn.pack_padded_sequence(torch.zeros(shape), lengths, enforce_sorted=enforce_sorted)
    with pytest.raises(type(theirs.value)) as ours:
        rnn.pack_padded_sequence(np.zeros(shape), lengths, enforce_sorted=enforce_sorted)
    assert str(theirs.value).startswith(words), str(theirs.value)
    assert str(ours.value).startswith(words), str(ours.value)


@pytest.mark.parametrize("lengths, given", [([4, 3, 0], r"\[4, 3, 0\]"), ([3, 4, 1], r"\[3, 4, 1\]"),
                                            ([4, 3], "got 2 .batch_size=3"), ([[4, 3, 1]], "2D")])
def test_length_errors_name_what_was_given(lengths, given):
    with pytest.raises(RuntimeError, match=given):
        rnn.pack_padded_sequence(np.zeros((4, 3, 2)), lengths)


def test_length_beyond_the_input_is_refused():
    """torch 2.13 reads past the input here; we refuse, naming both numbers."""
    for enforce_sorted in (True, False):
        with pytest.raises(RuntimeError, match="at most the input's length 4.*got a length of 5"):
            rnn.pack_padded_sequence(np.zeros((4, 3, 2)), [5, 3, 1], enforce_sorted=enforce_sorted)
    with pytest.raises(RuntimeError, match="at most the input's length 3 \\(dimension 1"):
        rnn.pack_padded_sequence(np.zeros((2, 3)), [4, 1], batch_first=True)


@pytest.mark.parametrize("lengths", [[4.5, 3, 1], np.array([4.0, 3.0, 1.0]), [True, True, True], ["4", "3", "1"]])
def test_non_integer_lengths_are_a_type_error(lengths):
    with pytest.raises(TypeError, match="lengths must be integers, got .*dtype"):
        rnn.pack_padded_sequence(np.zeros((4, 3, 2)), lengths)


def test_pad_errors_match_torch():
    p = rnn.pack_padded_sequence(np.zeros((4, 3, 2)), [4, 2, 1])
    with pytest.raises(ValueError, match="total_length=3 and max sequence length being 4"):
        rnn.pad_packed_sequence(p, total_length=3)
    with pytest.raises(TypeError, match="total_length must be int, not float"):
        rnn.pad_packed_sequence(p, total_length=5.0)
    with pytest.raises(RuntimeError, match="received an empty list of sequences"):
        rnn.pad_sequence([])
    with pytest.raises(RuntimeError, match="Expected iterable for input sequences"):
        rnn.pad_sequence(3)
    with pytest.raises(RuntimeError, match="but got middle"):
        rnn.pad_sequence([np.zeros(2)], padding_side="middle")
    with pytest.raises(RuntimeError, match=r"sequence 1 has shape \(3, 2\)"):
        rnn.pad_sequence([np.zeros((2, 3)), np.zeros((3, 2))])
    with pytest.raises(RuntimeError, match="greater than 0"):
        rnn.pack_sequence([np.zeros(2), np.zeros(0)])


# ---------------------------------------------------------------------- the layer side
def test_layer_grid_round_trip_and_reversal():
    lengths = np.array([2, 4, 1])
    x = np.arange(4 * 3 * 2, dtype=np.float64).reshape(4, 3, 2)
    seq = rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    grid, bs = packed.layer_input(seq)
    np.testing.assert_array_equal(bs, [3, 2, 1, 1])
    np.testing.assert_array_equal(packed.lengths_of(bs), [4, 2, 1])
    for k, b in enumerate(seq.sorted_indices):        # sorted order, zero padding
        n = lengths[b]
        np.testing.assert_array_equal(grid[:n, k], x[:n, b])
        assert np.all(grid[n:, k] == 0)
    back = packed.packed_output(grid, seq)
    _same_packed(back, trnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                                 enforce_sorted=False))
    rev = packed.reverse_within_lengths(grid, packed.lengths_of(bs))
    for k, n in enumerate(packed.lengths_of(bs)):
        np.testing.assert_array_equal(rev[:n, k], grid[:n, k][::-1])   # within its own length
        np.testing.assert_array_equal(rev[n:, k], grid[n:, k])         # padding stays put
    np.testing.assert_array_equal(packed.reverse_within_lengths(rev, packed.lengths_of(bs)), grid)


def _lstm(layers, W_ih, W_hh, b_ih, b_hh, W_hr=None):
    return layers.lstm_layer_forward, layers.lstm_layer_backward, (W_ih, W_hh, b_ih + b_hh, W_hr)


def _rnn(layers, W_ih, W_hh, b_ih, b_hh):
    return layers.rnn_layer_forward, layers.rnn_layer_backward, (W_ih, W_hh, b_ih + b_hh, "relu")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["lstm", "lstm-proj", "rnn-relu"])
@pytest.mark.parametrize("layers", LAYERS, ids=lambda m: m.__name__.split(".")[-1])
def test_existing_layers_over_packed_batches_match_torch(layers, kind, dtype):
    """functional/kernels layers, unchanged, run by packed_layer_forward/backward in both
    directions over an unsorted packed batch: torch's values and every gradient."""
    T, B, I, H = 5, 4, 3, 4
    lengths = np.array([2, 5, 1, 5])
    rng = np.random.default_rng(2)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    if kind == "rnn-relu":
        twin = torch.nn.RNN(I, H, nonlinearity="relu", bidirectional=True, dtype=tdt)
    else:
        twin = torch.nn.LSTM(I, H, bidirectional=True, proj_size=2 if kind == "lstm-proj" else 0, dtype=tdt)
    nstates = 1 if kind == "rnn-relu" else 2
    P = 2 if kind == "lstm-proj" else H
    shapes = [(2, B, P), (2, B, H)][:nstates]
    x = rng.standard_normal((T, B, I)).astype(dtype)
    states = [rng.standard_normal(s).astype(dtype) for s in shapes]
    g_out = rng.standard_normal((T, B, 2 * P)).astype(dtype)
    g_states = [rng.standard_normal(s).astype(dtype) for s in shapes]

    xt = torch.from_numpy(x).requires_grad_()
    st = [torch.from_numpy(s).requires_grad_() for s in states]
    t_out, t_states = twin(trnn.pack_padded_sequence(xt, torch.from_numpy(lengths), enforce_sorted=False),
                           tuple(st) if nstates == 2 else st[0])
    t_states = list(t_states) if nstates == 2 else [t_states]
    t_out = trnn.pad_packed_sequence(t_out)[0]
    loss = (t_out * torch.from_numpy(g_out)).sum()
    for s, g in zip(t_states, g_states):
        loss = loss + (s * torch.from_numpy(g)).sum()
    loss.backward()

    params = [p.detach().numpy() for p in twin.parameters()]
    per_dir = len(params) // 2
    make = _rnn if kind == "rnn-relu" else _lstm
    seq = rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    grid, bs = packed.layer_input(seq)
    s_len = packed.lengths_of(bs)
    d_grid = packed.layer_input(rnn.pack_padded_sequence(g_out, lengths, enforce_sorted=False))[0]
    outs, finals, dx, dstates, dparams = [], [], 0, [], []
    for d in range(2):
        fwd, bwd, p = make(layers, *params[d * per_dir : (d + 1) * per_dir])
        flip = (lambda a: a) if d == 0 else (lambda a: packed.reverse_within_lengths(a, s_len))  # noqa: E731
        s0 = [packed.sort_batch(s[d], seq.sorted_indices, axis=0) for s in states]
        out, *fin, cache = packed.packed_layer_forward(fwd, flip(grid), s0, p, bs)
        outs.append(flip(out))
        finals.append([packed.unsort_batch(f, seq.unsorted_indices, axis=0) for f in fin])
        dout = np.ascontiguousarray(flip(d_grid[..., d * P : (d + 1) * P]))
        dg = [packed.sort_batch(g[d], seq.sorted_indices, axis=0) for g in g_states]
        dx_d, *rest = packed.packed_layer_backward(bwd, dout, dg, cache)
        dx = dx + flip(dx_d)
        dstates.append([packed.unsort_batch(r, seq.unsorted_indices, axis=0) for r in rest[:nstates]])
        dparams.append(rest[nstates:])
    out = rnn.pad_packed_sequence(packed.packed_output(np.concatenate(outs, axis=2), seq))[0]
    dx = rnn.pad_packed_sequence(packed.packed_output(dx, seq), total_length=T)[0]

    tol = TOL[dtype]
    np.testing.assert_allclose(out, t_out.detach().numpy(), err_msg="output", **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), err_msg="d input", **tol)
    for k in range(nstates):
        np.testing.assert_allclose(np.stack([f[k] for f in finals]), t_states[k].detach().numpy(),
                                   err_msg=f"final state {k}", **tol)
        np.testing.assert_allclose(np.stack([g[k] for g in dstates]), st[k].grad.numpy(),
                                   err_msg=f"d initial state {k}", **tol)
    for d in range(2):
        named = list(twin.named_parameters())[d * per_dir : (d + 1) * per_dir]
        (n_ih, W_ih), (n_hh, W_hh), (n_bi, b_ih), (n_bh, b_hh) = named[:4]
        got_ih, got_hh, got_b = dparams[d][:3]
        np.testing.assert_allclose(got_ih, W_ih.grad.numpy(), err_msg=n_ih, **tol)
        np.testing.assert_allclose(got_hh, W_hh.grad.numpy(), err_msg=n_hh, **tol)
        # the layers take b = b_ih + b_hh, whose gradient is each of torch's two
        np.testing.assert_allclose(got_b, b_ih.grad.numpy(), err_msg=n_bi, **tol)
        np.testing.assert_allclose(got_b, b_hh.grad.numpy(), err_msg=n_bh, **tol)
        if kind == "lstm-proj":
            np.testing.assert_allclose(dparams[d][3], named[4][1].grad.numpy(), err_msg=named[4][0], **tol)


@pytest.mark.parametrize("path", ["reference", "fused"] if gru.AVAILABLE else ["reference"])
def test_segment_runner_agrees_with_native_batch_sizes(path):
    """The GRU's own batch_sizes and packed_layer_forward over its plain layer: the same numbers
    by two different routes."""
    forward = gru.fused_forward if path == "fused" else gru.reference_forward
    backward = gru.fused_backward if path == "fused" else gru.reference_backward
    rng = np.random.default_rng(4)
    T, B, I, H = 6, 5, 3, 4
    bs = np.array([5, 4, 4, 2, 1, 1])
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((B, H))
    params = [rng.standard_normal(s) * 0.5 for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    dout, dh = rng.standard_normal((T, B, H)), rng.standard_normal((B, H))
    out, h_T, cache = forward(x, h0, *params, batch_sizes=bs)
    grads = backward(dout, dh, cache)
    out2, h_T2, cache2 = packed.packed_layer_forward(forward, x, [h0], params, bs)
    grads2 = packed.packed_layer_backward(backward, dout, [dh], cache2)
    assert len(packed.segments(bs)) == 4
    out3, h_T3, cache3 = packed.packed_layer_forward(forward, x, [h0], params, bs, save=False)
    assert cache3 is None
    np.testing.assert_array_equal(out3, out2)
    np.testing.assert_array_equal(h_T3, h_T2)
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_T2, h_T, rtol=1e-12, atol=1e-12)
    for k, (g2, g) in enumerate(zip(grads2, grads)):
        np.testing.assert_allclose(g2, g, rtol=1e-10, atol=1e-12, err_msg=str(k))


def test_too_few_lengths_for_an_unsorted_batch_are_refused():
    """torch 2.13 packs a subset and drops the rest here; we report the mismatch."""
    with pytest.raises(RuntimeError, match=r"but got 2 \(batch_size=3\)"):
        rnn.pack_padded_sequence(np.zeros((4, 3, 2)), [2, 1], enforce_sorted=False)
