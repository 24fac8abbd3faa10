"""The LSTM and the plain RNN from their equations: one layer, one direction, forward and backward.

This is the readable reference. Every line of the backward pass is derived by hand from the
forward; nothing here knows about autograd. The fast path (kernels.py) has the same signatures
and is checked against this file.

Shape letters
    T   time steps
    B   batch
    I   input size
    H   hidden size (the cell state c always has H)
    P   size of h and of the output: proj_size when projecting, else H
    G   4H, the four gate pre-activations stacked in PyTorch's order i, f, g, o

LSTM forward, one step (exactly torch.nn.LSTM's definition):
    a_t = x_t W_ih^T + h_{t-1} W_hh^T + b                (B, G)   b = b_ih + b_hh
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)  (B, H) each
    c_t = f ⊙ c_{t-1} + i ⊙ g                            (B, H)
    m_t = o ⊙ tanh(c_t)                                  (B, H)
    h_t = m_t W_hr^T   if proj_size > 0, else h_t = m_t  (B, P)

LSTM backward, one step. dh_t arrives from the output at t and from step t+1; dc_t from step t+1:
    dm = dh_t W_hr  (projection)  else  dm = dh_t
    do = dm ⊙ tanh(c_t)
    dc = dc_t + dm ⊙ o ⊙ (1 - tanh²(c_t))
    di = dc ⊙ g     df = dc ⊙ c_{t-1}     dg = dc ⊙ i     dc_{t-1} = dc ⊙ f
    da = [di ⊙ i(1-i), df ⊙ f(1-f), dg ⊙ (1-g²), do ⊙ o(1-o)]   the local gradients σ' = σ(1-σ),
                                                                  tanh' = 1 - tanh²
    dh_{t-1} = da W_hh      dx_t = da W_ih
and, summed over all steps (done as single matrix products after the loop):
    dW_ih = Σ_t da_t^T x_t    dW_hh = Σ_t da_t^T h_{t-1}    db = Σ_t Σ_B da_t    dW_hr = Σ_t dh_t^T m_t

RNN (torch.nn.RNN):  h_t = φ(x_t W_ih^T + h_{t-1} W_hh^T + b),  φ = tanh or relu;
backward:  da = dh ⊙ φ'(a)  (1 - h² for tanh, [h > 0] for relu),  dh_{t-1} = da W_hh.

Devices: every function takes its array module from its input, `xp = array_module(x)` (device.py),
so the same lines run on NumPy arrays (CPU) and CuPy arrays (GPU); the GPU fast path with one fused
kernel per step is cuda_layers.py.

Packed batches (batch_sizes, see packed.py): the layers below stay the textbook loops over full
batches; with batch_sizes they are run by packed.packed_layer_forward, once per run of steps with
the same batch size over the rows still running, and the backward follows its cache there.
"""

from . import packed
from .device import array_module


def sigmoid(x):
    # The tanh form never overflows in exp() for large negative x, and equals 1 / (1 + e^-x).
    return 0.5 * (1.0 + array_module(x).tanh(0.5 * x))


def lstm_layer_forward(x, h0, c0, W_ih, W_hh, b=None, W_hr=None, *, save=True, W_hh_T=None,
                       batch_sizes=None):
    """Run one LSTM layer in one direction over all T steps.

    x (T, B, I), h0 (B, P), c0 (B, H), W_ih (G, I), W_hh (G, P), b (G,) or None, W_hr (P, H) or None.
    Returns out (T, B, P), h_T (B, P), c_T (B, H) and the cache that lstm_layer_backward needs
    (None when save is False: a forward that no backward will follow, under lstmkit.no_grad()).
    The cache references x, h0, c0 and the weights, not copies: the caller keeps them unchanged
    until backward (modules.py checks that they were). W_hh_T, a transposed copy of W_hh that
    the fast path may be given, is not needed here: accepted so that both files share one signature.
    batch_sizes (T,) or None: x is a packed batch on its sorted grid (packed.py); h_T, c_T row b
    are then sequence b's at its own last step, and out is zero at padding.
    """
    if batch_sizes is not None:
        return packed.packed_layer_forward(lstm_layer_forward, x, (h0, c0), (W_ih, W_hh, b, W_hr),
                                           batch_sizes, save=save)
    xp = array_module(x)
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    # The input projection of every step at once: one big product instead of T small ones.
    xa = (x.reshape(T * B, I) @ W_ih.T).reshape(T, B, G)
    if b is not None:
        xa += b
    gates = xp.empty((T, B, G), dtype=x.dtype)  # i, f, g, o after their nonlinearities
    c = xp.empty((T, B, H), dtype=x.dtype)
    tanh_c = xp.empty((T, B, H), dtype=x.dtype)
    m = xp.empty((T, B, H), dtype=x.dtype) if W_hr is not None else None
    h = xp.empty((T, B, P), dtype=x.dtype)
    h_prev, c_prev = h0, c0
    for t in range(T):
        a = xa[t] + h_prev @ W_hh.T                                  # (B, G)
        gates[t, :, : 2 * H] = sigmoid(a[:, : 2 * H])                # i, f
        gates[t, :, 2 * H : 3 * H] = xp.tanh(a[:, 2 * H : 3 * H])    # g
        gates[t, :, 3 * H :] = sigmoid(a[:, 3 * H :])                # o
        i, f, g, o = xp.split(gates[t], 4, axis=1)
        c[t] = f * c_prev + i * g
        tanh_c[t] = xp.tanh(c[t])
        if W_hr is None:
            h[t] = o * tanh_c[t]
        else:
            m[t] = o * tanh_c[t]
            h[t] = m[t] @ W_hr.T
        h_prev, c_prev = h[t], c[t]
    if not save:
        return h, h[-1].copy(), c[-1].copy(), None
    cache = {"x": x, "h0": h0, "c0": c0, "W_ih": W_ih, "W_hh": W_hh, "W_hr": W_hr,
             "has_bias": b is not None, "gates": gates, "c": c, "tanh_c": tanh_c, "m": m, "h": h}
    return h, h[-1].copy(), c[-1].copy(), cache


def lstm_layer_backward(dout, dh_T, dc_T, cache):
    """Backpropagation through time for lstm_layer_forward.

    dout (T, B, P) is dLoss/dout; dh_T (B, P) and dc_T (B, H) are the gradients arriving at the
    final states (None means zeros). Returns dx, dh0, dc0, dW_ih, dW_hh, db, dW_hr; db is None when
    the forward had no bias and dW_hr is None when it had no projection.
    """
    if "segments" in cache:      # a packed batch: the segment runner's cache
        return packed.packed_layer_backward(lstm_layer_backward, dout, (dh_T, dc_T), cache)
    x, h0, c0 = cache["x"], cache["h0"], cache["c0"]
    xp = array_module(x)
    W_ih, W_hh, W_hr = cache["W_ih"], cache["W_hh"], cache["W_hr"]
    gates, c, tanh_c, m, h = cache["gates"], cache["c"], cache["tanh_c"], cache["m"], cache["h"]
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    dgates = xp.empty((T, B, G), dtype=x.dtype)   # dLoss/da: the four gate gradients, stacked
    dh_all = xp.empty((T, B, P), dtype=x.dtype) if W_hr is not None else None
    dh_next = xp.zeros((B, P), dtype=x.dtype) if dh_T is None else xp.array(dh_T, dtype=x.dtype)
    dc_next = xp.zeros((B, H), dtype=x.dtype) if dc_T is None else xp.array(dc_T, dtype=x.dtype)
    for t in reversed(range(T)):
        dh = dout[t] + dh_next                    # from the output, and from step t+1
        if W_hr is not None:
            dh_all[t] = dh
            dm = dh @ W_hr                        # (B, H)
        else:
            dm = dh
        i, f, g, o = xp.split(gates[t], 4, axis=1)
        c_prev = c[t - 1] if t > 0 else c0
        do = dm * tanh_c[t]
        dc = dc_next + dm * o * (1.0 - tanh_c[t] ** 2)
        di = dc * g
        df = dc * c_prev
        dg = dc * i
        dc_next = dc * f                          # becomes dc_prev for step t-1
        dgates[t, :, :H] = di * i * (1.0 - i)
        dgates[t, :, H : 2 * H] = df * f * (1.0 - f)
        dgates[t, :, 2 * H : 3 * H] = dg * (1.0 - g * g)
        dgates[t, :, 3 * H :] = do * o * (1.0 - o)
        dh_next = dgates[t] @ W_hh                # becomes dh_prev for step t-1
    # The weight gradients, summed over all steps, each as one product over T*B rows.
    dG = dgates.reshape(T * B, G)
    h_prev = xp.concatenate([h0[None], h[:-1]], axis=0)   # (T, B, P): the h each step received
    dx = (dG @ W_ih).reshape(T, B, I)
    dW_ih = dG.T @ x.reshape(T * B, I)
    dW_hh = dG.T @ h_prev.reshape(T * B, P)
    db = dG.sum(axis=0) if cache["has_bias"] else None
    dW_hr = dh_all.reshape(T * B, P).T @ m.reshape(T * B, H) if W_hr is not None else None
    return dx, dh_next, dc_next, dW_ih, dW_hh, db, dW_hr


def rnn_layer_forward(x, h0, W_ih, W_hh, b=None, nonlinearity="tanh", *, save=True, batch_sizes=None):
    """Run one Elman RNN layer in one direction. x (T, B, I), h0 (B, H) -> out (T, B, H), h_T, cache
    (None when save is False). batch_sizes as in lstm_layer_forward."""
    if batch_sizes is not None:
        return packed.packed_layer_forward(rnn_layer_forward, x, (h0,), (W_ih, W_hh, b, nonlinearity),
                                           batch_sizes, save=save)
    xp = array_module(x)
    T, B, I = x.shape
    H = W_hh.shape[0]
    xa = (x.reshape(T * B, I) @ W_ih.T).reshape(T, B, H)
    if b is not None:
        xa += b
    h = xp.empty((T, B, H), dtype=x.dtype)
    h_prev = h0
    for t in range(T):
        a = xa[t] + h_prev @ W_hh.T
        h[t] = xp.tanh(a) if nonlinearity == "tanh" else xp.maximum(a, 0.0)
        h_prev = h[t]
    if not save:
        return h, h[-1].copy(), None
    cache = {"x": x, "h0": h0, "W_ih": W_ih, "W_hh": W_hh, "has_bias": b is not None,
             "nonlinearity": nonlinearity, "h": h}
    return h, h[-1].copy(), cache


def rnn_layer_backward(dout, dh_T, cache):
    """Backpropagation through time for rnn_layer_forward. Returns dx, dh0, dW_ih, dW_hh, db."""
    if "segments" in cache:
        return packed.packed_layer_backward(rnn_layer_backward, dout, (dh_T,), cache)
    x, h0, W_ih, W_hh, h = cache["x"], cache["h0"], cache["W_ih"], cache["W_hh"], cache["h"]
    xp = array_module(x)
    T, B, I = x.shape
    H = W_hh.shape[0]
    da_all = xp.empty((T, B, H), dtype=x.dtype)
    dh_next = xp.zeros((B, H), dtype=x.dtype) if dh_T is None else xp.array(dh_T, dtype=x.dtype)
    for t in reversed(range(T)):
        dh = dout[t] + dh_next
        if cache["nonlinearity"] == "tanh":
            da_all[t] = dh * (1.0 - h[t] * h[t])
        else:
            da_all[t] = dh * (h[t] > 0)
        dh_next = da_all[t] @ W_hh
    da = da_all.reshape(T * B, H)
    h_prev = xp.concatenate([h0[None], h[:-1]], axis=0)
    dx = (da @ W_ih).reshape(T, B, I)
    dW_ih = da.T @ x.reshape(T * B, I)
    dW_hh = da.T @ h_prev.reshape(T * B, H)
    db = da.sum(axis=0) if cache["has_bias"] else None
    return dx, dh_next, dW_ih, dW_hh, db
