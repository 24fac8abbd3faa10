"""The LSTM's fused step kernels: one batch row of one step, forward and backward, in one compiled
loop over the hidden units (lstm_fused.py's and lstm_parts.py's time loops run them; the equations are in
lstm_fused.py's docstring, the reference in functional.py).

Shape letters: H hidden size, G = 4H gate rows (PyTorch's order i, f, g, o), B batch.
"""

from .jit import _JIT, _sigmoid, _tanh, njit


# ---------------------------------------------------------------------- one step, fused
@njit(**_JIT)
def _lstm_fwd_row(a, r, bias, cp, cn, mn):
    """One batch row. a (G,): in x W_ih^T, out i, f, g, o; r (G,) = h_{t-1} W_hh^T;
    cp (H,) = c_{t-1}; out cn = c_t, mn = m_t."""
    H = cp.shape[0]
    for j in range(H):
        i = _sigmoid(a[j] + r[j] + bias[j])
        f = _sigmoid(a[H + j] + r[H + j] + bias[H + j])
        g = _tanh(a[2 * H + j] + r[2 * H + j] + bias[2 * H + j])
        o = _sigmoid(a[3 * H + j] + r[3 * H + j] + bias[3 * H + j])
        a[j] = i
        a[H + j] = f
        a[2 * H + j] = g
        a[3 * H + j] = o
        cj = f * cp[j] + i * g
        cn[j] = cj
        mn[j] = o * _tanh(cj)

@njit(**_JIT)
def _lstm_fwd_row_lean(a, bias, cp, cn, mn):
    """_lstm_fwd_row with no backward to follow (lstm_parts.py's forward without save): a (G,) in
    b + x W_ih^T + h_{t-1} W_hh^T, out b, the next step's starting value (the activations are read
    by nothing). Setting a row to b is then no pass of its own: 2.4% of a one-thread forward."""
    H = cp.shape[0]
    for j in range(H):
        i = _sigmoid(a[j])
        f = _sigmoid(a[H + j])
        g = _tanh(a[2 * H + j])
        o = _sigmoid(a[3 * H + j])
        a[j] = bias[j]
        a[H + j] = bias[H + j]
        a[2 * H + j] = bias[2 * H + j]
        a[3 * H + j] = bias[3 * H + j]
        cj = f * cp[j] + i * g
        cn[j] = cj
        mn[j] = o * _tanh(cj)

@njit(**_JIT)
def _lstm_fwd_step(gates, rec, bias, c_prev, c, m):
    """gates (B, G): in x W_ih^T, out the activations; rec (B, G) = h_{t-1} W_hh^T;
    c_prev (B, H) in; c, m (B, H) out."""
    for n in range(gates.shape[0]):
        _lstm_fwd_row(gates[n], rec[n], bias, c_prev[n], c[n], m[n])

@njit(**_JIT)
def _lstm_bwd_row(a, cn, cp, y, hn, dcn, da):
    """One batch row. cn = c_t, cp = c_{t-1}; dm = y + hn; dcn (H,) in: dc_t, out: dc_{t-1};
    da (G,) out. tanh(c_t) is recomputed rather than stored: one cheap vector tanh here saves
    a (T, B, H) array in the cache and a store stream in the forward."""
    H = cn.shape[0]
    one = a.dtype.type(1)   # a typed 1: an int literal would promote float32 to float64
    for j in range(H):
        i = a[j]
        f = a[H + j]
        g = a[2 * H + j]
        o = a[3 * H + j]
        t = _tanh(cn[j])
        dm = y[j] + hn[j]
        dc = dcn[j] + dm * o * (one - t * t)
        da[j] = dc * g * i * (one - i)
        da[H + j] = dc * cp[j] * f * (one - f)
        da[2 * H + j] = dc * i * (one - g * g)
        da[3 * H + j] = dm * t * o * (one - o)
        dcn[j] = dc * f

@njit(**_JIT)
def _lstm_bwd_step(gates, c, c_prev, dy, dh_next, dc, dgates):
    """c = c_t; dm = dy + dh_next (B, H); dc (B, H) in: dc_t, out: dc_{t-1}; dgates (B, G) out."""
    for n in range(gates.shape[0]):
        _lstm_bwd_row(gates[n], c[n], c_prev[n], dy[n], dh_next[n], dc[n], dgates[n])
