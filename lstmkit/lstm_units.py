"""The LSTM inference forward (no save) with each step split between the cores by hidden units
instead of by batch rows (oneDNN's split), for weights far bigger than one core's L2.

Why. Cut by rows (lstm_parts.py), every core multiplies its rows by all the weights at every step,
so weights past its L2 stream through each core every step. Cut by units, each core runs all B
rows on its share of the gate rows: only its share of the weights streams. The price: the next
step needs all of h_t, so the parts meet at a barrier every step (gemm_kernel.barrier, ~0.2 µs)
and each fetches the half the other core wrote. With tile_gemm's tile in both splits that pays
only from about four L2s of weights up (`preferred`, which has the measurements); with OpenBLAS's
kernel it had paid from one, but that kernel also wasted the rows' panels (it takes the batch in
fours: a part of 25 rows cost what 28 do). lstm_parts.forward takes this path when `preferred`
says so; tests/test_lstm_parts.py holds it to the reference like the row parts.

Part p owns the units j0:j1 (a multiple of 16 apart, so no two parts write one cache line of a row)
and the four gate rows of each: its weights are the rows g H + j for g in i, f, g, o, packed once
(pack_weights), and its gates a private (B, 4 (j1 - j0) + padding) buffer laid out i, f, g, o like a whole
layer of j1 - j0 units, so lstm_rows' lean kernel runs on it unchanged:

    a^p_t = b^p + x_t W_ih^p^T + h_{t-1} W_hh^p^T          (B, 4 n_p)  two tile products, all B rows
    c_t[:, j0:j1], h_t[:, j0:j1] = the fused gate kernel    then barrier: h_t is whole

Shape letters: T steps, B batch, I input size, H hidden size (= P), G = 4H; n_p = j1 - j0.
"""

import os

import numpy as np
from numba import carray

from . import gemm_kernel, scratch, tile_gemm
from .gemm_kernel import barrier
from .gemm_kernel import float32_at as at
from .jit import _JIT, njit
from .lstm_rows import _lstm_fwd_row_lean
from .tile_gemm import xwt_add

UNIT_STEP = 16  # units per part in multiples of 16 floats: one 64-byte line


def _l2_bytes():
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (AttributeError, ValueError, OSError):
        size = 0
    return size if size > 0 else 1 << 20


L2_BYTES = _l2_bytes()      # one core's L2 (1 MiB on Zen 4; 1-2 MiB on Intel's AVX-512 cores)


# Units only where the weights pass this many L2s: measured with tile_gemm's tile on two Zen 4
# cores (1 MiB L2 each), units against rows, alternating call by call (BENCHMARKS.md, "Ninth
# session"): 0.89x at 32 MiB of weights ((20,16,1024,1024)), 0.96-1.03x at 8 MiB ((50,50,512,512),
# (100,64,512,512), (50,16,512,512)), 1.06-1.08x at 2 MiB ((100,32,256,256)), 1.10x at 0.5 MiB.
UNITS_ABOVE_L2 = 4


def preferred(B, I, H, parts):
    """Whether to split a no-save forward of B rows by units rather than rows. Rows keep each core
    on its own rows of h (its own writes, in its cache); units fetch the other core's half of
    h_{t-1} every step and meet at a barrier, and pay back only where each core would otherwise
    stream weights far past its L2: four L2s' worth (UNITS_ABOVE_L2). Needs tile_gemm's tile (the
    parts' gate rows padded to its panels) and UNIT_STEP units a part."""
    if parts < 2 or H < UNIT_STEP * parts or not tile_gemm.AVAILABLE:
        return False
    weights = 4 * H * (I + H) * 4                       # float32 W_ih and W_hh
    return weights > UNITS_ABOVE_L2 * L2_BYTES


def unit_ranges(H, parts):
    """Each part's units [(j0, j1), ...]: multiples of UNIT_STEP, as even as that allows."""
    blocks = -(-H // UNIT_STEP)
    edges = [min(H, UNIT_STEP * (blocks * p // parts)) for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _rows_of(H, j0, j1):
    """The gate rows of units j0:j1, in the order i, f, g, o."""
    return np.concatenate([np.arange(g * H + j0, g * H + j1) for g in range(4)])


def pack_weights(W_ih, W_hh, parts):
    """[(packed W_ih^p, packed W_hh^p) for each part]: each part's gate rows packed for the tile."""
    H = W_hh.shape[1]
    out = []
    for j0, j1 in unit_ranges(H, parts):
        rows = _rows_of(H, j0, j1)
        out.append(tuple(tile_gemm.pack(W[rows], scratch.empty(tile_gemm.packed_size(len(rows), W.shape[1]), W.dtype))
                         for W in (W_ih, W_hh)))
    return out


@njit(**_JIT)
def _forward_units(x, h0, c0, c, out, counter, bias, a_ih, a_hh, gates, parts, j0, j1):
    """Part of units j0:j1, all T steps. c (2, B, H) taking turns as in lstm_parts (the last step
    writes c[1]); out (T, B, H); counter: the barrier's address; bias (4 n,) the part's own, gates
    (B, tile_gemm.panels(4 n)) too (columns past 4 n: the tile's padding, never read)."""
    T, B, I = x.shape
    H = out.shape[2]
    G = bias.shape[0]
    ldc = gates.shape[1]
    gates[:, G:] = 0
    # h_{t-1}'s other half was written by the other core: copied in one streaming pass each step,
    # as the tile's six-row reads fetched it line by line (units 1.23x the rows' time, 1.06x copied)
    hcopy = np.empty((B, H), np.float32)
    for r in range(B):
        gates[r, :G] = bias
    for t in range(T):
        hp = h0 if t == 0 else out[t - 1]
        cp = c0 if t == 0 else c[(t + T - 1) % 2]
        ct = c[(t + T) % 2]
        xwt_add(G, B, I, a_ih.ctypes.data, x[t].ctypes.data, I, gates.ctypes.data, ldc)
        hcopy[:, :] = hp
        xwt_add(G, B, H, a_hh.ctypes.data, hcopy.ctypes.data, H, gates.ctypes.data, ldc)
        for r in range(B):     # the lean kernel leaves b in gates for the next step
            _lstm_fwd_row_lean(gates[r], bias, cp[r, j0:j1], ct[r, j0:j1], out[t, r, j0:j1])
        barrier(counter, parts, t)


def _forward_part(arg):
    """x, h0, c0, c, out, counter; bias, a_ih, a_hh, gates; T, B, I, H, parts, ldc; j0, j1."""
    a = carray(arg, 18)
    T, B, I, H, parts, ldc, j0, j1 = a[10], a[11], a[12], a[13], a[14], a[15], a[16], a[17]
    n = 4 * (j1 - j0)
    _forward_units(carray(at(a[0]), (T, B, I)), carray(at(a[1]), (B, H)), carray(at(a[2]), (B, H)),
                   carray(at(a[3]), (2, B, H)), carray(at(a[4]), (T, B, H)), a[5],
                   carray(at(a[6]), (n,)), carray(at(a[7]), (1,)), carray(at(a[8]), (1,)),
                   carray(at(a[9]), (B, ldc)), parts, j0, j1)


def forward(x, h0, c0, W_ih, W_hh, bias, out, parts, packed=None):
    """lstm_parts.forward's contract without save (h0, c0, bias C-contiguous of x's dtype, as it
    passes them), in `parts` parts (all at once: at most
    OpenBLAS's threads): gates (a (1, B, G) array of no meaning, as that path's), c (2, B, H) with
    c[-1] = c_T, out. packed: pack_weights(W_ih, W_hh, parts), when the caller keeps it."""
    from .lstm_parts import _part, _rows         # (lstm_parts imports this module)
    T, B, I = x.shape
    H = W_hh.shape[1]
    dt = x.dtype
    if not 2 <= parts <= gemm_kernel.POOL_THREADS:     # a part that waits for a free thread never meets
        raise RuntimeError(f"lstm_units: {parts} parts need as many OpenBLAS threads at once, "
                           f"{gemm_kernel.POOL_THREADS} in its pool")
    ranges = unit_ranges(H, parts)
    if packed is None:
        packed = pack_weights(W_ih, W_hh, parts)
    c = scratch.take((2, B, H), dt)                 # returned; lstm_fused gives it back
    counter = scratch.take((8,), np.int64)          # one cache line of its own
    counter[:] = 0
    ldc = max(tile_gemm.panels(4 * (j1 - j0)) for j0, j1 in ranges)     # room for the tile's padding
    gates = [scratch.take((B, ldc), dt) for _ in ranges]
    own = [(bias[_rows_of(H, j0, j1)], a_ih, a_hh, g) for (j0, j1), (a_ih, a_hh), g in zip(ranges, packed, gates)]
    rows = _rows((x, h0, c0, c, out, counter), own, (T, B, I, H, parts, ldc), ranges)
    gemm_kernel.run_parts(_part(_forward_part), rows, together=True)
    for a in (*gates, counter):
        scratch.give(a)
    # lstm_parts.forward's gates without save: a (1, B, G) array that the caller gives back
    return scratch.take((B, 4 * H), dt).reshape(1, B, 4 * H), c, out
