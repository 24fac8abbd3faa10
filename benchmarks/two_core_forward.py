"""An experiment, not part of lstmkit: the batched LSTM forward time loop run on both cores at once.

    python benchmarks/two_core_forward.py                  # all sizes, against lstmkit's forward
    python benchmarks/two_core_forward.py --sizes 0,5 --pause 0.05 --seconds 0

What it tries (issue 4, third session; the results are in BENCHMARKS.md). On this 2-core machine
OpenBLAS runs the per-step product (32,128)x(128,512) as fast on one thread as on two (~70 µs), so
at small sizes the second core does nothing useful. Here the whole time loop is one compiled Numba
function with `parallel=True`, and every step is two OpenMP regions of two parts each:
    region 1: part p computes columns [p G/2, (p+1) G/2) of  h_{t-1} W_hh^T  with a one-thread
              OpenBLAS sgemm called from compiled code;
    region 2: part p runs the fused gate kernel (lstm_fused._lstm_fwd_row) on its half of the batch.
The input projection stays one product before the loop, on one BLAS thread, so that no OpenBLAS
worker is left spinning beside the OpenMP threads.

How compiled code calls NumPy's OpenBLAS without SciPy: llvmlite's `add_symbol` gives the C
function's address a name, and `numba.types.ExternalFunction` declares it by that name, so the
compiled function links to it by name and can be cached (checked: a second process loads it from
Numba's cache). The signature below is the ILP64 one of NumPy's scipy-openblas64 (64-bit ints).

Float32 only, no projection, forward only, results checked against lstmkit's forward.
Shape letters: T steps, B batch, I input size, H hidden size, P = H, G = 4H.
"""

import argparse
import ctypes
import statistics
import sys
import time

import numpy as np

SIZES = [(50, 32, 64, 128), (100, 32, 256, 256), (50, 50, 128, 128), (100, 64, 512, 512),
         (50, 50, 512, 512), (50, 8, 128, 128)]   # (T, B, I, H)


def build(K):
    """The two-core forward, or None where this NumPy's BLAS is not the ILP64 scipy-openblas."""
    from lstmkit import blas, lstm_fused
    import llvmlite.binding as llvm
    from numba import njit, prange, types

    found = blas._find_openblas()
    if found is None or found[1:] != ("scipy_openblas", "64_"):
        return None
    name = "scipy_cblas_sgemm64_"
    llvm.add_symbol(name, ctypes.cast(getattr(found[0], name), ctypes.c_void_p).value)
    i32, i64, f32 = types.int32, types.int64, types.float32
    # order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc (pointers passed as ints)
    sgemm = types.ExternalFunction(name, types.void(i32, i32, i32, i64, i64, i64, f32, i64, i64,
                                                    i64, i64, f32, i64, i64))
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
    fwd_row = lstm_fused._lstm_fwd_row

    @njit(nogil=True, fastmath=True, error_model="numpy", parallel=True)
    def loop(gates, bias, h0, c0, c, out, W_hh, rec):
        """gates (T, B, G) in: x W_ih^T, out: the activations; c (T, B, H), out (T, B, P) out;
        rec (B, G) a workspace for h_{t-1} W_hh^T."""
        T, B, G = gates.shape
        P = W_hh.shape[1]
        G2, B2 = G // 2, B // 2
        for t in range(T):
            hp = h0 if t == 0 else out[t - 1]
            cp = c0 if t == 0 else c[t - 1]
            for p in prange(2):
                sgemm(ROW_MAJOR, NO_TRANS, TRANS, B, G2, P, np.float32(1.0), hp.ctypes.data, P,
                      W_hh[p * G2].ctypes.data, P, np.float32(0.0), rec[0, p * G2:].ctypes.data, G)
            for p in prange(2):
                for r in range(p * B2, B2 if p == 0 else B):
                    fwd_row(gates[t, r], rec[r], bias, cp[r], c[t, r], out[t, r])

    def forward(x, h0, c0, W_ih, W_hh, b):
        T, B, I = x.shape
        G, P = W_hh.shape
        with blas._single_blas_thread(0):      # macs 0: always one BLAS thread inside
            gates = np.matmul(x.reshape(T * B, I), W_ih.T).reshape(T, B, G)
            c = np.empty((T, B, G // 4), x.dtype)
            out = np.empty((T, B, P), x.dtype)
            loop(gates, b, h0, c0, c, out, W_hh, np.empty((B, G), x.dtype))
        return out

    return forward


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(str(i) for i in range(len(SIZES))),
                    help="comma-separated indices into SIZES (default: all)")
    ap.add_argument("--repeats", type=int, default=9, help="samples per side (default 9)")
    ap.add_argument("--seconds", type=float, default=0.25,
                    help="each sample repeats the call for at least this long (default 0.25; 0: one call)")
    ap.add_argument("--pause", type=float, default=0.15,
                    help="sleep before each sample, as bench_lstm.py does (default 0.15 s)")
    args = ap.parse_args(argv)

    from lstmkit import kernels as K
    forward = build(K)
    if forward is None:
        print("two_core_forward: NumPy's BLAS is not the ILP64 scipy-openblas this experiment binds to",
              file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    for i in (int(s) for s in args.sizes.split(",")):
        T, B, I, H = SIZES[i]
        G = 4 * H
        r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)   # noqa: E731
        x, h0, c0, W_ih, W_hh, b = r(T, B, I), r(B, H), r(B, H), r(G, I), r(G, H), r(G)
        want = K.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b)[0]
        got = forward(x, h0, c0, W_ih, W_hh, b)
        if not np.allclose(got, want, rtol=1e-4, atol=2e-5):
            print(f"{SIZES[i]}: results differ from lstmkit's forward", file=sys.stderr)
            return 1
        sides = {"lstmkit": lambda: K.lstm_layer_forward(x, h0, c0, W_ih, W_hh, b),
                 "two-core": lambda: forward(x, h0, c0, W_ih, W_hh, b)}
        times = {k: [] for k in sides}
        for rep in range(args.repeats):
            for k in (list(sides) if rep % 2 else list(sides)[::-1]):
                time.sleep(args.pause)
                t0, n = time.perf_counter(), 0
                while n == 0 or time.perf_counter() - t0 < args.seconds:
                    sides[k]()
                    n += 1
                times[k].append((time.perf_counter() - t0) / n)
        pairs = [a / b for a, b in zip(times["two-core"], times["lstmkit"])]
        q = statistics.quantiles(pairs, n=4)
        print(f"T,B,I,H={T},{B},{I},{H}  forward lstmkit {statistics.median(times['lstmkit']) * 1e3:.2f} ms"
              f"  two-core {statistics.median(times['two-core']) * 1e3:.2f} ms"
              f"  paired two-core/lstmkit median {statistics.median(pairs):.2f} (IQR {q[0]:.2f}-{q[2]:.2f})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
