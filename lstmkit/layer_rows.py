"""What the fused layers share about their rows after the time loop: the input and weight gradients
as one product over all T*B rows (or the N real rows of a packed batch), and the packed layout.

Shape letters
    T   time steps    B   batch    I   input size    P   size of h    G   gate rows (4H LSTM, H RNN)
    N   real rows of a packed batch: Σ_t batch_sizes[t]
"""

import numpy as np

from . import scratch
from .blas import _mm


def _input_and_weight_grads(da, x, h0, h, W_ih, has_bias, limit=None):
    """After the backward loop, from the pre-activation gradients da (T, B, G) of every step:
    dx = da W_ih, dW_ih = Σ_t da_t^T x_t, dW_hh = Σ_t da_t^T h_{t-1}, db = Σ da; each one product
    over all T*B rows. h_{t-1} is h0 for t = 0 and the output h[t-1] after, so dW_hh is two
    products instead of concatenating a (T, B, P) copy of the outputs. limit: blas._mm's."""
    T, B, G = da.shape
    I, P = x.shape[2], h0.shape[1]
    dt = da.dtype
    dA = da.reshape(T * B, G)
    # new arrays for the caller, taken from scratch.py's pool: rnn_base gives the weight gradients
    # back once added into .grads, and a layer's dx once the layer below has used it
    dx = scratch.take((T, B, I), dt)
    _mm(dA, W_ih, out=dx.reshape(T * B, I), limit=limit)
    dW_ih = _mm(dA.T, x.reshape(T * B, I), out=scratch.take((G, I), dt), limit=limit)
    dW_hh = scratch.take((G, P), dt)
    if T > 1:
        _mm(da[1:].reshape((T - 1) * B, G).T, h[:-1].reshape((T - 1) * B, P), out=dW_hh, limit=limit)
    else:
        dW_hh[...] = 0
    _add_initial_state_term(dW_hh, da[0], h0)
    db = dA.sum(axis=0) if has_bias else None
    return dx, dW_ih, dW_hh, db


def _add_initial_state_term(dW_hh, da0, h0):
    """dW_hh += da_0^T h0, the first step's share. Skipped when h0 is all zeros (no initial state
    given, the usual case), where it adds exactly nothing; with one row it is an outer product,
    which NumPy's OpenBLAS took 77 µs for at (4H, H) = (512, 128) through matmul (a K = 1 product)
    against a few µs for np.outer: 6% of a batch-1 training step at (50, 1, 65, 128, 2)."""
    if not h0.any():
        return
    if h0.shape[0] == 1:
        dW_hh += np.outer(da0[0], h0[0])
    else:
        dW_hh += _mm(da0.T, h0)



# ---------------------------------------------------------------------- packed batches
# A packed batch (batch_sizes, sorted longest first) is run over its real rows only, kept packed
# (N, ·) as gru.py's fused layer keeps them: step t is rows [start[t], start[t+1]), and the rows
# still running are a prefix of the previous step's, so every per-step product reads h_{t-1} as a
# contiguous slice and the weight gradients stay one product each over the N real rows. A finished
# sequence keeps its state; row b of h_T, c_T is its state at its own last step. In backward the
# gradient given at a final state waits in dh, dc until its sequence's last step is reached.
def _packing(bs, B):
    """start (T+1,), rows (N,): the flat (T*B) grid indices of the real rows, and each sequence's
    last row (B,)."""
    start = np.concatenate([[0], np.cumsum(bs)])
    rows = np.flatnonzero(np.arange(B)[None, :] < bs[:, None])
    lengths = (bs[None, :] > np.arange(B)[:, None]).sum(axis=1)
    return start, rows, start[lengths - 1] + np.arange(B)


def _scatter(rows_data, rows, T, B):
    """(N, F) packed rows -> (T, B, F), zeros at padding."""
    out = np.zeros((T * B, rows_data.shape[1]), rows_data.dtype)
    out[rows] = rows_data
    return out.reshape(T, B, -1)

def _packed_weight_grads(da, xr, h0, h, W_ih, cache):
    """_input_and_weight_grads over packed rows: da, xr, h (N, ·). h_{t-1} of a row of step t >= 1
    is the row bs[t-1] places earlier (the same sequence one step back)."""
    T, B, I = cache["x_shape"]
    bs, N = cache["bs"], da.shape[0]
    dx = _scatter(_mm(da, W_ih), cache["rows"], T, B)
    dW_ih = _mm(da.T, xr)
    if T > 1:
        dW_hh = _mm(da[B:].T, h[np.arange(B, N) - np.repeat(bs[:-1], bs[1:])])
    else:
        dW_hh = np.zeros((da.shape[1], h0.shape[1]), da.dtype)
    _add_initial_state_term(dW_hh, da[:B], h0)
    db = da.sum(axis=0) if cache["has_bias"] else None
    return dx, dW_ih, dW_hh, db

