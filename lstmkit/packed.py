"""Packed (variable-length) batches for the recurrent layers: the layout they take, and any
existing layer run over one at the cost of its real tokens.

Shape letters
    T   time steps of the longest sequence      B   batch (sequences), sorted longest first
    N   real tokens, Σ_t batch_sizes[t]         I   input size       *   trailing dimensions

A layer with `batch_sizes` takes x (T, B, I) time-major and padded, its sequences sorted by length
(longest first), and batch_sizes (T,): at step t only rows [:batch_sizes[t]] are real. This is
PackedSequence.data laid out on the (T, B) grid (layer_input / packed_output convert), so a
sequence's row never changes and the rows still running at step t are always a prefix.

Directions. The forward direction reads that grid top to bottom. The reverse direction must start
each sequence at its own last step, which is not x[::-1] (that would start the short ones in
padding): reverse_within_lengths reverses each sequence inside its own length, keeps the sorted
order and hence batch_sizes, and is its own inverse, so the same call maps the reverse layer's
output back.

Layers written for full batches (functional.py's textbook LSTM and RNN) are run over a packed
batch by packed_layer_forward/backward: the steps are cut where batch_sizes changes, and each run
of equal batch size is one ordinary layer call on its active rows only, carrying the state rows
from one call to the next. The cost is the real tokens plus one call per distinct batch size.
The fused layers (kernels.py, gru.py) take batch_sizes themselves and keep the real rows packed.

Devices: the layout (batch_sizes, lengths, indices) is always host NumPy, as torch keeps
batch_sizes on the CPU; the data and the states may be CuPy arrays (a module on the GPU), so the
functions that move data take their array module from it (device.py) and send their index arrays
to its device.

Modules (modules.py) take a PackedSequence through packing (its layout, checked), to_grid /
from_grid (data <-> the sorted grid), sort_batch / unsort_batch (states in the user's order, as
torch permutes them) and reverse_within_lengths (the reverse direction).
"""

import numpy as np

from .device import array_module
from .utils.rnn import PackedSequence, _lengths_of


def _index(xp, idx):
    """A host index array as one `xp` indexes with (on the GPU: copied there, once per call)."""
    return idx if xp is np else xp.asarray(idx)


def check_batch_sizes(batch_sizes, T, B):
    """batch_sizes as (T,) int64, checked: non-increasing, batch_sizes[0] == B, all >= 1."""
    bs = np.asarray(batch_sizes)
    if bs.dtype.kind not in "iu":
        raise TypeError(f"batch_sizes must be integers, got an array of dtype {bs.dtype}")
    bs = bs.astype(np.int64)
    if bs.shape != (T,):
        raise RuntimeError(f"Expected batch_sizes of shape ({T},) (one per time step), got {bs.shape}")
    if bs[0] != B or bs[-1] < 1 or np.any(bs[1:] > bs[:-1]):
        raise RuntimeError(f"Expected batch_sizes non-increasing from batch_size={B} down to at "
                           f"least 1, got {bs.tolist()}")
    return bs


def packing(seq, name):
    """What a module keeps of a PackedSequence input: its layout, checked where torch fails later
    or not at all (batch_sizes, N = Σ batch_sizes, indices of length B), RuntimeError naming it.
    "uniform": every sequence runs all T steps (a bucketed batch): its grid is then a plain (T, B)
    input, and the layers run as for one, with no row bookkeeping at all."""
    bs = np.asarray(seq.batch_sizes)
    if bs.ndim != 1 or bs.size == 0:
        raise RuntimeError(f"{name}: batch_sizes must be a non-empty 1-D array, got shape {bs.shape}")
    bs = check_batch_sizes(bs, bs.shape[0], int(bs[0]))
    if np.shape(seq.data)[0] != bs.sum():
        raise RuntimeError(f"{name}: the PackedSequence's data has {np.shape(seq.data)[0]} rows but its "
                           f"batch_sizes add up to {int(bs.sum())}")
    for field in ("sorted_indices", "unsorted_indices"):
        idx = getattr(seq, field)
        if idx is not None and np.shape(idx) != (bs[0],):
            raise RuntimeError(f"{name}: {field} must have one entry per sequence, shape "
                               f"({int(bs[0])},), got {np.shape(idx)}")
    return {"batch_sizes": seq.batch_sizes, "bs": bs, "lengths": lengths_of(bs), "uniform": bool(bs[-1] == bs[0]),
            "sorted": seq.sorted_indices, "unsorted": seq.unsorted_indices}


def grad_data(grad, packing, name):
    """A gradient given for a packed output: a PackedSequence packed like it (its data is taken),
    or already its data (N, ·), or None."""
    if not isinstance(grad, PackedSequence):
        return grad
    if not np.array_equal(np.asarray(grad.batch_sizes), packing["bs"]):
        raise RuntimeError(f"{name}.backward: grad_output must be packed like the output, batch_sizes "
                           f"{packing['bs'].tolist()}, got {np.asarray(grad.batch_sizes).tolist()}")
    return grad.data


def lengths_of(batch_sizes):
    """The sorted sequence lengths (B,) int64 behind batch_sizes (T,)."""
    return _lengths_of(np.asarray(batch_sizes, dtype=np.int64))


def layer_input(sequence):
    """PackedSequence -> (x (T, B, *) time-major in sorted order, zero padded; batch_sizes (T,)).
    The batch stays sorted longest first: that is the order the layer needs. Initial states
    given by the user are in the original order: take them with sort_batch."""
    bs = np.asarray(sequence.batch_sizes, dtype=np.int64)
    return to_grid(sequence.data, bs), bs


def packed_output(out, like):
    """A layer's output (T, B, *) on the sorted grid -> PackedSequence with `like`'s batch_sizes
    and indices (what torch's RNN modules return for a packed input)."""
    data = from_grid(out, np.asarray(like.batch_sizes, dtype=np.int64))
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def to_grid(data, batch_sizes):
    """Packed rows (N, *) -> (T, B, *) on the sorted grid, zeros at padding: a new array, or a view
    of data when every sequence runs all T steps (the packed order is then the grid's, row-major)."""
    T, B = batch_sizes.shape[0], int(batch_sizes[0])
    if batch_sizes[-1] == B:
        return data.reshape((T, B) + data.shape[1:])
    xp = array_module(data)
    x = xp.zeros((T, B) + data.shape[1:], data.dtype)
    x.reshape((T * B,) + data.shape[1:])[_index(xp, _rows(batch_sizes))] = data
    return x


def from_grid(x, batch_sizes):
    """(T, B, *) on the sorted grid -> its real rows (N, *) in packed order (a new array)."""
    T, B = batch_sizes.shape[0], int(batch_sizes[0])
    flat = x.reshape((T * B,) + x.shape[2:])
    if batch_sizes[-1] == B:
        return flat.copy()
    xp = array_module(x)
    return xp.take(flat, _index(xp, _rows(batch_sizes)), axis=0)


def _rows(batch_sizes):
    """The flat (T*B) grid indices of the real rows, in packed order."""
    return np.flatnonzero(_grid(_lengths_of(batch_sizes), batch_sizes.shape[0]))


def _grid(lengths, T):
    """(T, B) bool: step t of sequence b is real; its row-major order is the packed order."""
    return np.arange(T)[:, None] < lengths[None, :]


def sort_batch(state, sorted_indices, axis=1):
    """A state (…, B, H) given in the user's order -> the sorted order (no-op for None indices)."""
    if sorted_indices is None:
        return state
    xp = array_module(state)
    return xp.take(state, _index(xp, np.asarray(sorted_indices)), axis=axis)


def unsort_batch(state, unsorted_indices, axis=1):
    """A final state in sorted order -> the user's order, as torch's h_n / c_n are."""
    if unsorted_indices is None:
        return state
    xp = array_module(state)
    return xp.take(state, _index(xp, np.asarray(unsorted_indices)), axis=axis)


def reverse_within_lengths(x, lengths):
    """x (T, B, *): each sequence b reversed within its own lengths[b] steps, padding left where
    it is. out[t, b] = x[lengths[b] - 1 - t, b] for t < lengths[b]. Its own inverse."""
    T, B = x.shape[:2]
    t = np.arange(T)[:, None]
    src = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)     # (T, B) source step
    # one gather of whole rows over the flat (T*B, *) view: faster than indexing (T, B) pairs
    xp = array_module(x)
    flat = xp.take(x.reshape((T * B,) + x.shape[2:]), _index(xp, (src * B + np.arange(B)).reshape(-1)), axis=0)
    return flat.reshape(x.shape)


def segments(batch_sizes):
    """Runs of equal batch size: [(t0, t1, n)], steps t0 <= t < t1 all having batch_sizes[t] = n."""
    bs = np.asarray(batch_sizes)
    cuts = [0, *(np.flatnonzero(bs[1:] != bs[:-1]) + 1).tolist(), bs.shape[0]]
    return [(t0, t1, int(bs[t0])) for t0, t1 in zip(cuts[:-1], cuts[1:])]


def packed_layer_forward(forward, x, states, params, batch_sizes, *, save=True):
    """Run forward(x, *states, *params) -> (out, *final_states, cache), an ordinary layer, over a
    packed batch: x (T, B, I) sorted, states a tuple of (B, ·) arrays (h0, or h0 and c0).
    Returns (out (T, B, ·) with zeros at padding, *final_states, cache); final state row b is
    sequence b's state after its own last step. save=False is handed to the layer (its
    no-backward mode) and the cache is None."""
    extra = {} if save else {"save": False}    # layers without that mode still run
    T, B = x.shape[:2]
    bs = check_batch_sizes(batch_sizes, T, B)
    xp = array_module(x)
    state = [xp.array(s) for s in states]            # running state; rows [:n] advance per call
    out, caches = None, []
    for t0, t1, n in segments(bs):
        # Copies: the layer's cache keeps its initial state, and `state` is overwritten below.
        result = forward(x[t0:t1, :n], *(s[:n].copy() for s in state), *params, **extra)
        seg_out, seg_final, cache = result[0], result[1:-1], result[-1]
        if out is None:
            out = xp.zeros((T, B) + seg_out.shape[2:], seg_out.dtype)
        out[t0:t1, :n] = seg_out
        for s, final in zip(state, seg_final):
            s[:n] = final
        caches.append(cache)
    if not save:
        return (out, *state, None)
    cache = {"segments": segments(bs), "caches": caches, "x_shape": x.shape, "x_dtype": out.dtype,
             "state_shapes": [s.shape for s in state]}
    return (out, *state, cache)


def packed_layer_backward(backward, dout, dstates, cache):
    """Backward of packed_layer_forward: backward(dout, *dstates, cache) -> (dx, *dstates0,
    *dparams) is the layer's own. dstates: gradients at the final states (None = zeros).
    Returns (dx, *dstates0, *dparams); each dparam summed over the calls (None stays None).
    Going backwards over the calls, the rows [:n] of the running state gradient hold, for a
    sequence still running in the next call, that call's gradient at its initial state, and for
    one that ended here, the gradient given at its final state: nothing else reaches them."""
    dt = cache["x_dtype"]
    xp = array_module(dout)
    dstate = [xp.zeros(shape, dt) if d is None else xp.array(d, dtype=dt)
              for d, shape in zip(dstates, cache["state_shapes"])]
    dx = xp.zeros(cache["x_shape"], dt)
    dparams = None
    for (t0, t1, n), seg_cache in zip(reversed(cache["segments"]), reversed(cache["caches"])):
        result = backward(dout[t0:t1, :n], *(d[:n] for d in dstate), seg_cache)
        dx[t0:t1, :n] = result[0]
        for d, d0 in zip(dstate, result[1 : 1 + len(dstate)]):
            d[:n] = d0
        grads = result[1 + len(dstate):]
        dparams = grads if dparams is None else \
            [None if a is None else a + g for a, g in zip(dparams, grads)]
    return (dx, *dstate, *dparams)
