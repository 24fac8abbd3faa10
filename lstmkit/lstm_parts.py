"""The LSTM layer for B > 1 in float32 without projection, on a matrix-product micro-kernel with the
weights packed once per call, the batch cut in parts that run side by side, one per core
(gemm_kernel.py says why). The kernel is tile_gemm.py's register tile wherever a product's output
columns are whole panels of its (G forward; H and I backward: with AVX-512, multiples of 64),
OpenBLAS's own elsewhere. The same equations as lstm_fused.py, whose fused row kernels it runs;
tests/test_lstm_parts.py holds the two paths against each other and the reference. A forward
without save may instead split each step by hidden units (lstm_units.py, which says when).

Shape letters
    T   time steps      B   batch        I   input size
    H   hidden size (= P: no projection here)                G   4H gate rows
    r0:r1  a part's rows of the batch;   g0:g1  a part's gate rows of the weight gradients

Forward, each step, for a part's rows (two kernel calls straight into gates[t, r0:r1]):
    a_t = b + x_t W_ih^T + h_{t-1} W_hh^T,  then the fused gate kernel: i, f, g, o, c_t, h_t
    (without save, one gate buffer for all steps, which the lean kernel leaves holding b)
Backward, each step in reverse, for a part's rows (da_t packed once for both products):
    da_t from the fused backward kernel with dm = dout_t + dh_t
    dh_{t-1} = da_t W_hh        dx_t = da_t W_ih
then the weight gradients, the parts split by gate rows: dW_ih = Σ_t da_t^T x_t,
    dW_hh = Σ_t da_t^T h_{t-1},  db = Σ da.
"""

import numpy as np
from numba import carray, cfunc, types

from . import gemm_kernel, lstm_units, scratch, tile_gemm
from .gemm_kernel import add_dt_y, kernel, pack_b_cols, packed_size
from .gemm_kernel import float32_at as at
from .jit import _JIT, _add2, njit
from .lstm_rows import _lstm_bwd_row, _lstm_fwd_row, _lstm_fwd_row_lean
from .tile_gemm import xwt_add

# A batch below this runs lstm_fused.py's path: with fewer rows than two parts' worth, one core
# would do the work that BLAS's two threads share there.
MIN_BATCH = 2 * gemm_kernel.MIN_PART_ROWS
ENABLED = True      # tests switch it off to compare with lstm_fused.py's path


def usable(dtype, B, proj):
    """Whether a layer call takes this path."""
    return ENABLED and gemm_kernel.AVAILABLE and dtype == np.float32 and not proj and B >= MIN_BATCH


@njit(**_JIT)
def _xwt_add(tile, M, n, K, a, x, ldx, c, ldc, b_pack):
    """C (n, M) += X (n, K) A^T with C's row stride ldc: tile_gemm's tile on its packed A (tile),
    or OpenBLAS's kernel on its own (X packed into b_pack first)."""
    if tile:
        xwt_add(M, n, K, a.ctypes.data, x.ctypes.data, ldx, c.ctypes.data, ldc)
    else:
        pack_b_cols(K, n, x.ctypes.data, ldx, b_pack.ctypes.data)
        kernel(M, n, K, np.float32(1.0), a.ctypes.data, b_pack.ctypes.data, c.ctypes.data, ldc)


@njit(**_JIT)
def _forward_rows(x, h0, c0, bias, a_ih, a_hh, gates, c, out, save, r0, r1, b_pack, zeros, tile):
    """Rows r0:r1, all T steps. gates (T, B, G) or (1, B, G) without save; c (T, B, H) or (2, B, H)
    without save, the steps taking turns so that the last one writes c[1] = c[-1]; out (T, B, H).
    tile: a_ih, a_hh packed by tile_gemm (else by OpenBLAS, for its kernel)."""
    T, B, I = x.shape
    P = out.shape[2]
    G = bias.shape[0]
    n = r1 - r0
    for t in range(T):
        a = gates[t] if save else gates[0]
        ct = c[t] if save else c[(t + T) % 2]
        hp = h0 if t == 0 else out[t - 1]
        cp = c0 if t == 0 else (c[t - 1] if save else c[(t + T - 1) % 2])
        if save or t == 0:      # without save the lean row kernel leaves b in a for the next step
            for r in range(r0, r1):
                a[r, :] = bias
        _xwt_add(tile, G, n, I, a_ih, x[t, r0], I, a[r0], G, b_pack)
        _xwt_add(tile, G, n, P, a_hh, hp[r0], P, a[r0], G, b_pack)
        for r in range(r0, r1):
            if save:
                _lstm_fwd_row(a[r], zeros, zeros, cp[r], ct[r], out[t, r])
            else:
                _lstm_fwd_row_lean(a[r], bias, cp[r], ct[r], out[t, r])


@njit(**_JIT)
def _backward_rows(dout, gates, c, c0, a_hh, a_ih, dgates, dx, dh, dc, r0, r1, b_pack, tile_h, tile_x):
    """Rows r0:r1, all T steps in reverse. dh, dc (B, H) in: the gradients at h_T, c_T; out: at
    h0, c0. dgates (T, B, G), dx (T, B, I) out. tile_h, tile_x: a_hh, a_ih packed by tile_gemm."""
    T, B, G = gates.shape
    I = dx.shape[2]
    P = dh.shape[1]
    n = r1 - r0
    one = np.float32(1.0)
    for t in range(T - 1, -1, -1):
        cp = c0 if t == 0 else c[t - 1]
        for r in range(r0, r1):
            _lstm_bwd_row(gates[t, r], c[t, r], cp[r], dout[t, r], dh[r], dc[r], dgates[t, r])
            dh[r, :] = 0
            dx[t, r, :] = 0
        if not (tile_h and tile_x):     # OpenBLAS's kernel reads da_t packed, once for both
            pack_b_cols(G, n, dgates[t, r0].ctypes.data, G, b_pack.ctypes.data)
        if tile_h:
            xwt_add(P, n, G, a_hh.ctypes.data, dgates[t, r0].ctypes.data, G, dh[r0].ctypes.data, P)
        else:
            kernel(P, n, G, one, a_hh.ctypes.data, b_pack.ctypes.data, dh[r0].ctypes.data, P)
        if tile_x:
            xwt_add(I, n, G, a_ih.ctypes.data, dgates[t, r0].ctypes.data, G, dx[t, r0].ctypes.data, I)
        else:
            kernel(I, n, G, one, a_ih.ctypes.data, b_pack.ctypes.data, dx[t, r0].ctypes.data, I)


@njit(**_JIT)
def _weight_rows(dgates, x, h0, h, dW_ih, dW_hh, db, g0, g1, a_buf, b_buf, h0_term):
    """Gate rows g0:g1 of dW_ih = Σ da^T x, dW_hh = Σ da_t^T h_{t-1} (h0 at t = 0, skipped when
    h0 is all zeros: it adds exactly nothing) and db = Σ da, each over all T*B rows."""
    T, B, G = dgates.shape
    I = x.shape[2]
    P = h.shape[2]
    dA = dgates.reshape(T * B, G)[:, g0:g1]
    dW_ih[g0:g1] = 0
    dW_hh[g0:g1] = 0
    add_dt_y(dA, x.reshape(T * B, I), dW_ih[g0:g1], a_buf, b_buf)
    add_dt_y(dA[B:], h[:T - 1].reshape((T - 1) * B, P), dW_hh[g0:g1], a_buf, b_buf)
    if h0_term:
        add_dt_y(dA[:B], h0, dW_hh[g0:g1], a_buf, b_buf)
    if db.shape[0] > 0:
        db[g0:g1] = 0
        for n in range(T * B):
            _add2(db[g0:g1], dA[n], db[g0:g1])


# ---------------------------------------------------------------------- the parts as C callables
# run_parts hands each part one int64 row: its arrays' addresses, then its sizes and rows. These
# functions, compiled as cfuncs (_part), rebuild the arrays (numba.carray) and run the loops above
# on them; forward() and backward() below keep every array alive until run_parts returns.
_PART = types.void(types.CPointer(types.int64))
_compiled = {}


def _part(fn):
    """fn as a C callable, compiled at its first use and cached by Numba. A cfunc compiles when it
    is made: made at import, these took a first import with an empty Numba cache from 0.25 s to
    7.5 s, also for programs that never run a part. Two threads compiling at once both get one."""
    c = _compiled.get(fn)
    if c is None:
        c = _compiled[fn] = cfunc(_PART, cache=True)(fn)
    return c


def _forward_part(arg):
    """x, h0, c0, bias, a_ih, a_hh, gates, c, out, b_pack, zeros; T, B, I, H, save, tile, r0, r1."""
    a = carray(arg, 19)
    T, B, I, H, save, tile, r0, r1 = a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18]
    G = 4 * H
    _forward_rows(carray(at(a[0]), (T, B, I)), carray(at(a[1]), (B, H)), carray(at(a[2]), (B, H)),
                  carray(at(a[3]), (G,)), carray(at(a[4]), (1,)), carray(at(a[5]), (1,)),
                  carray(at(a[6]), (T if save else 1, B, G)), carray(at(a[7]), (T if save else 2, B, H)),
                  carray(at(a[8]), (T, B, H)), save != 0, r0, r1, carray(at(a[9]), (1,)), carray(at(a[10]), (G,)),
                  tile != 0)


def _backward_part(arg):
    """dout, gates, c, c0, a_hh, a_ih, dgates, dx, dh, dc, b_pack; T, B, I, H, tile_h, tile_x, r0, r1."""
    a = carray(arg, 19)
    T, B, I, H, tile_h, tile_x, r0, r1 = a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18]
    G = 4 * H
    _backward_rows(carray(at(a[0]), (T, B, H)), carray(at(a[1]), (T, B, G)), carray(at(a[2]), (T, B, H)),
                   carray(at(a[3]), (B, H)), carray(at(a[4]), (1,)), carray(at(a[5]), (1,)),
                   carray(at(a[6]), (T, B, G)), carray(at(a[7]), (T, B, I)), carray(at(a[8]), (B, H)),
                   carray(at(a[9]), (B, H)), r0, r1, carray(at(a[10]), (1,)), tile_h != 0, tile_x != 0)


def _weight_part(arg):
    """dgates, x, h0, h, dW_ih, dW_hh, db, a_buf, b_buf; T, B, I, H, h0_term, db size, g0, g1."""
    a = carray(arg, 17)
    T, B, I, H, h0_term, n_db, g0, g1 = a[9], a[10], a[11], a[12], a[13], a[14], a[15], a[16]
    G = 4 * H
    _weight_rows(carray(at(a[0]), (T, B, G)), carray(at(a[1]), (T, B, I)), carray(at(a[2]), (B, H)),
                 carray(at(a[3]), (T, B, H)), carray(at(a[4]), (G, I)), carray(at(a[5]), (G, H)),
                 carray(at(a[6]), (n_db,)), g0, g1, carray(at(a[7]), (1,)), carray(at(a[8]), (1,)), h0_term != 0)


def _rows(shared, private, sizes, ranges):
    """The parts' argument rows: the shared arrays' addresses, the part's own arrays' addresses,
    the sizes, the part's range."""
    common = [a.ctypes.data for a in shared]
    return np.array([common + [a.ctypes.data for a in own] + list(sizes) + [lo, hi]
                     for own, (lo, hi) in zip(private, ranges)], np.int64)


# ---------------------------------------------------------------------- the layer
class PackedWeights:
    """A layer's W_ih and W_hh packed for the kernel, for a caller that keeps them while the weights
    stay the same (rnn_base does, for calls without save): each layout made at its first use."""

    def __init__(self, W_ih, W_hh):
        self._weights = (W_ih, W_hh)
        self._layouts = {}

    def rows(self):
        """(W_ih, W_hh) packed whole, as the row parts read them (_pack_rows)."""
        if "rows" not in self._layouts:
            self._layouts["rows"] = tuple(_pack_rows(W, scratch.empty) for W in self._weights)
        return self._layouts["rows"]

    def units(self, parts):
        """lstm_units.pack_weights for `parts` parts."""
        key = ("units", parts)
        if key not in self._layouts:
            self._layouts[key] = lstm_units.pack_weights(*self._weights, parts)
        return self._layouts[key]


def _tile_rows(M):
    """Whether a row part's product into rows of M columns (G gates forward; H or I backward) runs
    tile_gemm's tile: it writes whole panels of MR columns, so M must be a multiple of MR
    (OpenBLAS's kernel otherwise)."""
    return tile_gemm.AVAILABLE and M % tile_gemm.MR == 0


def _pack_rows(W, new):
    """W (G, K) packed for the row parts' products, into new((size,), dtype) (scratch's empty or take)."""
    (G, K), dt = W.shape, W.dtype
    if _tile_rows(G):
        return tile_gemm.pack(W, new((tile_gemm.packed_size(G, K),), dt))
    return gemm_kernel.pack_for_xwt(W, new((packed_size(G, K),), dt))


def _pack_dw(W):
    """W (G, K) packed for the backward's da W (the A side is W^T, (K, G)), from scratch's pool."""
    (G, K), dt = W.shape, W.dtype
    if _tile_rows(K):
        return tile_gemm.pack(W.T, scratch.take((tile_gemm.packed_size(K, G),), dt))
    return gemm_kernel.pack_for_dw(W, scratch.take((packed_size(K, G),), dt))


def pack_weights(W_ih, W_hh):
    """What forward() takes as `packed`: the weights packed at first use, then kept."""
    return PackedWeights(W_ih, W_hh)


def forward(x, h0, c0, W_ih, W_hh, bias, save, out=None, packed=None):
    """lstm_fused._lstm_forward_loop's contract (no projection): gates, c, out. packed: what
    pack_weights(W_ih, W_hh) returns, when the caller keeps it; else the weights are packed here.
    Without save, a layer whose weights pass four L2s (lstm_units.preferred) runs lstm_units.py's
    split by units instead."""
    T, B, I = x.shape
    G, P = W_hh.shape
    dt = x.dtype
    parts = gemm_kernel.parts_for(B)
    if out is None:
        out = scratch.empty((T, B, P), dt)
    h0, c0, bias = (np.ascontiguousarray(v, dtype=dt) for v in (h0, c0, bias))
    # (the units' parts wait for each other: never more than OpenBLAS's pool is sure to run at once)
    if not save and parts <= gemm_kernel.POOL_THREADS and lstm_units.preferred(B, I, P, parts):
        return lstm_units.forward(x, h0, c0, W_ih, W_hh, bias, out, parts,
                                  None if packed is None else packed.units(parts))
    if packed is None:
        a_ih, a_hh = _pack_rows(W_ih, scratch.take), _pack_rows(W_hh, scratch.take)
    else:
        a_ih, a_hh = packed.rows()
    # kept arrays (scratch.py), as lstm_fused's loop takes them: the cache's gates and c
    gates = scratch.take((T * B if save else B, G), dt).reshape(-1, B, G)
    c = scratch.take((T, B, G // 4) if save else (2, B, G // 4), dt)
    ranges = gemm_kernel.row_ranges(B, parts)
    tile = _tile_rows(G)
    zeros = np.zeros(G, dt)
    # OpenBLAS's kernel reads x_t and h_{t-1} packed into a part's buffer; the tile reads none
    # (then any array stands in for it)
    packs = [] if tile else [scratch.take((packed_size(hi - lo, max(I, P)),), dt) for lo, hi in ranges]
    b_packs = packs or [zeros] * parts
    rows = _rows((x, h0, c0, bias, a_ih, a_hh, gates, c, out), [(p, zeros) for p in b_packs],
                 (T, B, I, P, int(save), int(tile)), ranges)
    gemm_kernel.run_parts(_part(_forward_part), rows)
    for a in packs if packed is not None else (*packs, a_ih, a_hh):
        scratch.give(a)
    return gates, c, out


def backward(dout, dh_T, dc_T, cache):
    """lstm_fused.lstm_layer_backward's contract for a cache of forward(): dx, dh0, dc0, dW_ih,
    dW_hh, db (None without bias)."""
    x, h0, c0, h = cache["x"], cache["h0"], cache["c0"], cache["h"]
    W_ih, W_hh, gates, c = cache["W_ih"], cache["W_hh"], cache["gates"], cache["c"]
    T, B, I = x.shape
    G, P = W_hh.shape
    dt = x.dtype
    dout = np.ascontiguousarray(dout, dtype=dt)
    a_hh, a_ih = _pack_dw(W_hh), _pack_dw(W_ih)
    dgates = scratch.take((T * B, G), dt).reshape(T, B, G)
    dx = scratch.take((T, B, I), dt)     # given back by rnn_base once the layer below has used it
    dh, dc = scratch.empty((B, P), dt), scratch.empty((B, G // 4), dt)     # the parts write their rows
    dh[...] = 0 if dh_T is None else dh_T
    dc[...] = 0 if dc_T is None else dc_T
    ranges = gemm_kernel.row_ranges(B, gemm_kernel.parts_for(B))
    tile_h, tile_x = _tile_rows(P), _tile_rows(I)
    # da_t packed for OpenBLAS's kernel, unless the tile runs both products (then any array
    # stands in for the buffer)
    packs = [] if tile_h and tile_x else [scratch.take((packed_size(hi - lo, G),), dt) for lo, hi in ranges]
    b_packs = packs or [dc] * len(ranges)
    rows = _rows((dout, gates, c, c0, a_hh, a_ih, dgates, dx, dh, dc), [(p,) for p in b_packs],
                 (T, B, I, P, int(tile_h), int(tile_x)), ranges)
    gemm_kernel.run_parts(_part(_backward_part), rows)
    for a in (a_hh, a_ih, *packs):
        scratch.give(a)
    dW_ih, dW_hh = scratch.take((G, I), dt), scratch.take((G, P), dt)
    db = scratch.empty(G if cache["has_bias"] else 0, dt)
    g_ranges = gemm_kernel.row_ranges(G, len(ranges))
    bufs = [(scratch.take((packed_size(max(I, P), gemm_kernel.KC),), dt),
             scratch.take((packed_size(hi - lo, gemm_kernel.KC),), dt))
            for lo, hi in g_ranges]
    rows = _rows((dgates, x, h0, h, dW_ih, dW_hh, db), bufs, (T, B, I, P, int(h0.any()), db.size), g_ranges)
    gemm_kernel.run_parts(_part(_weight_part), rows)
    for a in (dgates.base, *(a for pair in bufs for a in pair)):
        scratch.give(a)
    return dx, dh, dc, dW_ih, dW_hh, (db if cache["has_bias"] else None)
