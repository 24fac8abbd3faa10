"""The GPU fast path: the LSTM, RNN and GRU layers of functional.py / gru.py on CuPy arrays, each
step's element-wise work fused into one kernel (cuda_kernels.py), the matrix products through
cuBLAS (cupy.matmul with out= into buffers allocated once per call).

Same functions, signatures and return values as functional.py (lstm_layer_*, rnn_layer_*) and
gru.py (gru_layer_*): module._backend(cupy) picks this module, and tests hold it against the
reference. Nothing is copied between host and device inside the time loops: every array here is
on the device, and the loops only launch work (cuBLAS, then one kernel, per step).

Shape letters
    T   time steps      B   batch       I   input size      H   hidden size
    P   size of h: proj_size when projecting, else H
    G   gate rows: 4H (LSTM, order i, f, g, o), 3H (GRU, order r, z, n), H (RNN)

Per step, forward:   rec = h_{t-1} W_hh^T (cuBLAS, into a reused (B, G) buffer), then one kernel
                     turning x_t W_ih^T + b (all T steps done before the loop as one product) and
                     rec into the gates, c_t and h_t (LSTM: then h_t = m_t W_hr^T with projection).
Per step, backward:  one kernel for all the local gradients (tanh(c_t) recomputed, as the CPU's
                     fast path does), then dh_{t-1} = da W_hh (cuBLAS) into a reused buffer.
After the loops, the weight gradients are one product each over all T*B rows, as on the CPU.

The kernels index raw memory, so every array they get is C-contiguous (checked at launch).
Packed batches (batch_sizes): packed.py's segment runner calls these layers once per run of
steps with the same batch size, over the rows still running (the reference's way; the CPU's
fused layers keep the real rows packed instead, which the GPU path does not do yet).
"""

from . import cuda_kernels, packed
from .device import array_module


# ====================================================================== LSTM
def lstm_layer_forward(x, h0, c0, W_ih, W_hh, b=None, W_hr=None, *, save=True, W_hh_T=None,
                       batch_sizes=None):
    """functional.lstm_layer_forward's contract on the GPU (W_hh_T is not needed here: cuBLAS
    reads W_hh transposed as it is). Returns out (T, B, P), h_T, c_T, cache (None without save)."""
    if batch_sizes is not None:
        return packed.packed_layer_forward(lstm_layer_forward, x, (h0, c0), (W_ih, W_hh, b, W_hr),
                                           batch_sizes, save=save)
    xp = array_module(x)
    run = cuda_kernels.kernels_for(xp)
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    if B == 1 and T == 1 and W_hr is None:      # a generated token: one launch
        return _lstm_step_b1(xp, run, x, h0, c0, W_ih, W_hh, b, save)
    gates = xp.matmul(x.reshape(T * B, I), W_ih.T).reshape(T, B, G)   # x_t W_ih^T + b, then the gates
    if b is not None:
        gates += b
    c = xp.empty((T, B, H), x.dtype)
    m = xp.empty((T, B, H), x.dtype) if W_hr is not None else None
    h = xp.empty((T, B, P), x.dtype)
    rec = xp.empty((B, G), x.dtype)
    h0, c0 = xp.ascontiguousarray(h0), xp.ascontiguousarray(c0)
    h_prev, c_prev = h0, c0
    for t in range(T):
        xp.matmul(h_prev, W_hh.T, out=rec)
        run("lstm_fwd", B * H, H, gates[t], rec, c_prev, c[t], h[t] if m is None else m[t])
        if m is not None:
            xp.matmul(m[t], W_hr.T, out=h[t])
        h_prev, c_prev = h[t], c[t]
    if not save:
        return h, h[-1].copy(), c[-1].copy(), None
    cache = {"x": x, "h0": h0, "c0": c0, "W_ih": W_ih, "W_hh": W_hh, "W_hr": W_hr, "has_bias": b is not None,
             "gates": gates, "c": c, "m": m, "h": h}
    return h, h[-1].copy(), c[-1].copy(), cache


def _lstm_step_b1(xp, run, x, h0, c0, W_ih, W_hh, b, save):
    """One step of one sequence (generation, a cell at batch 1): both products and the cell update
    in ONE kernel launch (lstm_b1), since at this size launches, not arithmetic, cost the time.
    The same returns and cache as the loop's, so the backward is the same. Without save, h_T and
    c_T are views of the new buffers: the callers (rnn_base, cells) copy or hand them out, and
    nothing else holds those buffers."""
    G, H = W_hh.shape
    gates = xp.empty((1, 1, G), x.dtype)
    c = xp.empty((1, 1, H), x.dtype)
    h = xp.empty((1, 1, H), x.dtype)
    h0, c0 = xp.ascontiguousarray(h0), xp.ascontiguousarray(c0)
    W_ih, W_hh = xp.ascontiguousarray(W_ih), xp.ascontiguousarray(W_hh)    # no-ops for parameters
    run("lstm_b1", H, H, x.shape[2], x, h0, c0, W_ih, W_hh, W_ih if b is None else b, int(b is not None),
        gates, c, h)
    if not save:
        return h, h[0], c[0], None
    cache = {"x": x, "h0": h0, "c0": c0, "W_ih": W_ih, "W_hh": W_hh, "W_hr": None,
             "has_bias": b is not None, "gates": gates, "c": c, "m": None, "h": h}
    return h, h[0].copy(), c[0].copy(), cache


def lstm_layer_backward(dout, dh_T, dc_T, cache):
    """functional.lstm_layer_backward's contract: dx, dh0, dc0, dW_ih, dW_hh, db, dW_hr."""
    if "segments" in cache:      # a packed batch: the segment runner's cache
        return packed.packed_layer_backward(lstm_layer_backward, dout, (dh_T, dc_T), cache)
    x, h0, c0 = cache["x"], cache["h0"], cache["c0"]
    W_ih, W_hh, W_hr = cache["W_ih"], cache["W_hh"], cache["W_hr"]
    gates, c, m, h = cache["gates"], cache["c"], cache["m"], cache["h"]
    xp = array_module(x)
    run = cuda_kernels.kernels_for(xp)
    T, B, I = x.shape
    G, P = W_hh.shape
    H = G // 4
    dout = xp.ascontiguousarray(dout, dtype=x.dtype)
    da = xp.empty((T, B, G), x.dtype)                        # dLoss/da, the four gates stacked
    dh_rec = _state(xp, dh_T, (B, P), x.dtype)               # dh_{t-1} through W_hh: da W_hh
    dc = _state(xp, dc_T, (B, H), x.dtype)                   # dc_t in, dc_{t-1} out, in place
    dh_all = xp.empty((T, B, P), x.dtype) if W_hr is not None else None
    dm = xp.empty((B, H), x.dtype) if W_hr is not None else None
    for t in range(T - 1, -1, -1):
        c_prev = c[t - 1] if t > 0 else c0
        if W_hr is None:      # dm = dh_t = dout_t + dh_rec, summed inside the kernel
            run("lstm_bwd", B * H, H, gates[t], c[t], c_prev, dout[t], dh_rec, 1, dc, da[t])
        else:                 # dh_t kept for dW_hr, and dm = dh_t W_hr
            xp.add(dout[t], dh_rec, out=dh_all[t])
            xp.matmul(dh_all[t], W_hr, out=dm)
            run("lstm_bwd", B * H, H, gates[t], c[t], c_prev, dm, dm, 0, dc, da[t])
        xp.matmul(da[t], W_hh, out=dh_rec)
    dG = da.reshape(T * B, G)
    h_prev = xp.concatenate([h0[None], h[:-1]], axis=0).reshape(T * B, P)
    dx = xp.matmul(dG, W_ih).reshape(T, B, I)
    dW_ih = xp.matmul(dG.T, x.reshape(T * B, I))
    dW_hh = xp.matmul(dG.T, h_prev)
    db = dG.sum(axis=0) if cache["has_bias"] else None
    dW_hr = xp.matmul(dh_all.reshape(T * B, P).T, m.reshape(T * B, H)) if W_hr is not None else None
    return dx, dh_rec, dc, dW_ih, dW_hh, db, dW_hr


def _state(xp, given, shape, dtype):
    """A gradient given at a final state as a new contiguous buffer the loop may overwrite (zeros for None)."""
    return xp.zeros(shape, dtype) if given is None else xp.array(given, dtype=dtype, order="C")


# ====================================================================== RNN
def rnn_layer_forward(x, h0, W_ih, W_hh, b=None, nonlinearity="tanh", *, save=True, batch_sizes=None):
    """functional.rnn_layer_forward's contract: out (T, B, H), h_T, cache (None without save)."""
    if batch_sizes is not None:
        return packed.packed_layer_forward(rnn_layer_forward, x, (h0,), (W_ih, W_hh, b, nonlinearity),
                                           batch_sizes, save=save)
    xp = array_module(x)
    run = cuda_kernels.kernels_for(xp)
    T, B, I = x.shape
    H = W_hh.shape[0]
    relu = int(nonlinearity == "relu")
    xa = xp.matmul(x.reshape(T * B, I), W_ih.T).reshape(T, B, H)
    if b is not None:
        xa += b
    h = xp.empty((T, B, H), x.dtype)
    rec = xp.empty((B, H), x.dtype)
    h_prev = xp.ascontiguousarray(h0)
    for t in range(T):
        xp.matmul(h_prev, W_hh.T, out=rec)
        run("rnn_fwd", B * H, xa[t], rec, relu, h[t])
        h_prev = h[t]
    if not save:
        return h, h[-1].copy(), None
    cache = {"x": x, "h0": xp.ascontiguousarray(h0), "W_ih": W_ih, "W_hh": W_hh,
             "has_bias": b is not None, "nonlinearity": nonlinearity, "h": h}
    return h, h[-1].copy(), cache


def rnn_layer_backward(dout, dh_T, cache):
    """functional.rnn_layer_backward's contract: dx, dh0, dW_ih, dW_hh, db."""
    if "segments" in cache:
        return packed.packed_layer_backward(rnn_layer_backward, dout, (dh_T,), cache)
    x, h0, W_ih, W_hh, h = cache["x"], cache["h0"], cache["W_ih"], cache["W_hh"], cache["h"]
    xp = array_module(x)
    run = cuda_kernels.kernels_for(xp)
    T, B, I = x.shape
    H = W_hh.shape[0]
    relu = int(cache["nonlinearity"] == "relu")
    dout = xp.ascontiguousarray(dout, dtype=x.dtype)
    da = xp.empty((T, B, H), x.dtype)
    dh_rec = _state(xp, dh_T, (B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        run("rnn_bwd", B * H, h[t], dout[t], dh_rec, relu, da[t])
        xp.matmul(da[t], W_hh, out=dh_rec)
    dA = da.reshape(T * B, H)
    h_prev = xp.concatenate([h0[None], h[:-1]], axis=0).reshape(T * B, H)
    dx = xp.matmul(dA, W_ih).reshape(T, B, I)
    db = dA.sum(axis=0) if cache["has_bias"] else None
    return dx, dh_rec, xp.matmul(dA.T, x.reshape(T * B, I)), xp.matmul(dA.T, h_prev), db


# ====================================================================== GRU
def gru_layer_forward(x, h0, W_ih, W_hh, b_ih=None, b_hh=None, batch_sizes=None, *, save=True):
    """gru.gru_layer_forward's contract: out (T, B, H), h_T, cache (None without save). b_hh is
    added inside the kernel, since r scales W_hn h + b_hn (gru.py)."""
    if batch_sizes is not None:   # "path" routes gru.gru_layer_backward back here
        out, h_T, cache = packed.packed_layer_forward(gru_layer_forward, x, (h0,), (W_ih, W_hh, b_ih, b_hh),
                                                      batch_sizes, save=save)
        return out, h_T, None if cache is None else dict(cache, path="cuda")
    xp = array_module(x)
    run = cuda_kernels.kernels_for(xp)
    T, B, I = x.shape
    G, H = W_hh.shape
    gates = xp.matmul(x.reshape(T * B, I), W_ih.T).reshape(T, B, G)   # x_t W_ih^T + b_ih, then r, z, n
    if b_ih is not None:
        gates += b_ih
    bh = xp.zeros(G, x.dtype) if b_hh is None else xp.ascontiguousarray(b_hh)
    ha_n = xp.empty((T, B, H), x.dtype)
    h = xp.empty((T, B, H), x.dtype)
    rec = xp.empty((B, G), x.dtype)
    h_prev = xp.ascontiguousarray(h0)
    for t in range(T):
        xp.matmul(h_prev, W_hh.T, out=rec)
        run("gru_fwd", B * H, H, gates[t], rec, bh, h_prev, ha_n[t], h[t])
        h_prev = h[t]
    if not save:
        return h, h[-1].copy(), None
    cache = {"path": "cuda", "x": x, "h0": xp.ascontiguousarray(h0), "W_ih": W_ih, "W_hh": W_hh,
             "has_b_ih": b_ih is not None, "has_b_hh": b_hh is not None,
             "gates": gates, "ha_n": ha_n, "h": h}
    return h, h[-1].copy(), cache


def gru_layer_backward(dout, dh_T, cache):
    """gru.gru_layer_backward's contract: dx, dh0, dW_ih, dW_hh, db_ih, db_hh (None without)."""
    if "segments" in cache:
        return packed.packed_layer_backward(gru_layer_backward, dout, (dh_T,), cache)
    x, h0, W_ih, W_hh = cache["x"], cache["h0"], cache["W_ih"], cache["W_hh"]
    gates, ha_n, h = cache["gates"], cache["ha_n"], cache["h"]
    xp = array_module(x)
    run = cuda_kernels.kernels_for(xp)
    T, B, I = x.shape
    G, H = W_hh.shape
    dout = xp.ascontiguousarray(dout, dtype=x.dtype)
    dxa, dha = xp.empty((T, B, G), x.dtype), xp.empty((T, B, G), x.dtype)
    # dh_{t-1} in two halves (gru.py's fused path): dhz = dh_t ⊙ z from the kernel, dhr = dha W_hh.
    dhz = _state(xp, dh_T, (B, H), x.dtype)
    dhr = xp.zeros((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        h_prev = h[t - 1] if t > 0 else h0
        run("gru_bwd", B * H, H, gates[t], ha_n[t], h_prev, dout[t], dhz, dhr, dxa[t], dha[t])
        xp.matmul(dha[t], W_hh, out=dhr)
    dXA, dHA = dxa.reshape(T * B, G), dha.reshape(T * B, G)
    h_prev = xp.concatenate([h0[None], h[:-1]], axis=0).reshape(T * B, H)
    dx = xp.matmul(dXA, W_ih).reshape(T, B, I)
    return (dx, dhz + dhr, xp.matmul(dXA.T, x.reshape(T * B, I)), xp.matmul(dHA.T, h_prev),
            dXA.sum(axis=0) if cache["has_b_ih"] else None, dHA.sum(axis=0) if cache["has_b_hh"] else None)
