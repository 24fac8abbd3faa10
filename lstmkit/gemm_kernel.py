"""OpenBLAS's own matrix-product micro-kernel, called on weights packed once per layer call, and the
batch cut in parts that run side by side, one per core.

Why. A recurrent layer multiplies the same weights by a small matrix at every step: per step
h_{t-1} W_hh^T is (B, P) x (P, G) with B = 16-64. Every np.matmul call makes OpenBLAS re-pack the
whole weight matrix into its kernel's panel layout before it multiplies (GotoBLAS's design: pack A,
pack B, run the micro-kernel over the panels), so at these shapes a one-thread product ran at 63
GFLOP/s where the micro-kernel itself runs at 96-107 on this Zen 4 core (BENCHMARKS.md, issue 10).
Intel MKL sells exactly this reuse as cblas_sgemm_pack / cblas_sgemm_compute; OpenBLAS exports
its pieces: the copy routine that packs A, the one that packs B, and the kernel
    kernel(m, n, k, alpha, packed_A, packed_B, C, ldc):   C += alpha A B   (column-major C)
So a layer packs its weights once per call (pack_for_xwt, pack_for_dw) and each step only packs
the small B side. Where a product's output columns are whole panels of tile_gemm.py's register
tile, the layers run that kernel of ours instead (7-14% faster per core on Zen 4, and no B side to
pack); this one serves the other shapes, the weight gradients, and the parts runner below.

In column-major terms a row-major (B, G) result R = H W^T is the (G x B) matrix W H^T: the weights
are the m side (A, packed once), the B rows of H the n side (packed each step), and C can be any
(B, G) row-major block with ldc = its row stride, so a step writes straight into gates[t, r0:r1].

The parts. With its products cheap, a layer's batch is cut into parts of rows (a row never meets
another inside a recurrent layer) that run at the same time, each a whole time loop on one core
(run_parts): nothing waits for anything until the layer ends. The parts run on OpenBLAS's own
worker threads (its gotoblas_pthread), the threads NumPy's multi-threaded products use: threads of
our own competed with those workers, which spin ~0.1 s after every such product (a layer forward
right after one took 23 ms instead of 16).

Only for float32, NumPy linked to OpenBLAS 0.3.x with a known core (the symbols below), and after
a self-check against float64 NumPy; otherwise AVAILABLE is False and the layers use blas.py's
products.

Shape letters: M, N, K the product's (column-major) sizes; B batch rows.
"""

import ctypes
import os
import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import blas
from .jit import _JIT, njit

# OpenBLAS core name (its get_corename) -> the suffix of that core's kernel symbols. Zen 1-3 run
# the Haswell kernels in OpenBLAS's own dynamic dispatch; Zen 4 gets SkylakeX's.
_CORE_SUFFIX = {"skylakex": "SKYLAKEX", "cooperlake": "SKYLAKEX", "sapphirerapids": "SKYLAKEX",
                "haswell": "HASWELL", "zen": "HASWELL"}
# A packed buffer holds whole panels: m rounded up to the kernel's unroll (16 here, never above 64).
_PAD = 64
# The routines, in GotoBLAS's names: the kernel; the B side packed from column-major (oncopy) or
# row-major (otcopy) storage; the A side from column-major (itcopy) or row-major (incopy).
_ROUTINES = ("kernel", "oncopy", "otcopy", "itcopy", "incopy")


def packed_size(m, k):
    """Floats a packed m x k operand needs (whole panels)."""
    return (m + _PAD) * k


def _bind():
    """{routine: ctypes function} of NumPy's OpenBLAS for the running core, plus "lib"; or None."""
    found = blas._find_openblas()
    if found is None:
        return None
    lib, prefix, suffix = found
    corename = getattr(lib, f"{prefix}_get_corename{suffix}", None)
    config = getattr(lib, f"{prefix}_get_config{suffix}", None)
    if corename is None or config is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    corename.restype = config.restype = ctypes.c_char_p
    # the routines' signatures are internal to OpenBLAS: bound only for the 0.3 series, where they
    # have not changed (a later series falls back to NumPy's products until checked here)
    if not config().decode(errors="replace").startswith("OpenBLAS 0.3."):
        return None
    core = _CORE_SUFFIX.get(corename().decode(errors="replace").strip().lower())
    names = {r: f"sgemm_{r}_{core}" for r in _ROUTINES}
    if core is None or not all(hasattr(lib, n) for n in names.values()):
        return None
    L, F, V = ctypes.c_long, ctypes.c_float, ctypes.c_void_p     # BLASLONG is a C long on x86-64
    bound = {r: getattr(lib, n) for r, n in names.items()}
    bound["kernel"].argtypes = [L, L, L, F, V, V, V, L]      # (m, n, k, alpha, A, B, C, ldc)
    for r in _ROUTINES[1:]:
        bound[r].argtypes = [L, L, V, L, V]                   # (k, m or n, source, its ld, packed)
    for r in _ROUTINES:
        bound[r].restype = ctypes.c_int
    bound["lib"] = lib
    return bound


def _product(f, M, N, K, pack_a, a, lda, pack_b, b, ldb):
    """The (N, M) row-major result of C = A B through the bound routines, C starting at 0.5."""
    pa = np.zeros(packed_size(M, K), np.float32)
    pb = np.zeros(packed_size(N, K), np.float32)
    C = np.full((N + 1, M), 0.5, np.float32)          # one row more, which must stay untouched
    f[pack_a](K, M, a.ctypes.data, lda, pa.ctypes.data)
    f[pack_b](K, N, b.ctypes.data, ldb, pb.ctypes.data)
    f["kernel"](M, N, K, 1.0, pa.ctypes.data, pb.ctypes.data, C.ctypes.data, M)
    return C


def _self_check(f):
    """The three products the layers make (X W^T, D W, D^T Y) agree with float64 NumPy at sizes
    that are no multiples of any unroll: a wrong panel layout or signature shows here, not in a
    layer."""
    rng = np.random.default_rng(0)
    for n, k, m in ((5, 37, 83), (16, 64, 256), (33, 130, 520)):
        W = rng.standard_normal((m, k)).astype(np.float32)
        X = rng.standard_normal((n, k)).astype(np.float32)
        Dn = rng.standard_normal((n, m)).astype(np.float32)
        D = rng.standard_normal((k, m + 3)).astype(np.float32)[:, :m]      # a row stride > m
        Y = rng.standard_normal((k, n)).astype(np.float32)
        W64 = W.astype(np.float64)
        got_want = [(_product(f, m, n, k, "incopy", W, k, "oncopy", X, k), X.astype(np.float64) @ W64.T),
                    (_product(f, k, n, m, "itcopy", W, k, "oncopy", Dn, m), Dn.astype(np.float64) @ W64),
                    (_product(f, n, m, k, "itcopy", Y, n, "otcopy", D, D.strides[0] // 4),
                     D.astype(np.float64).T @ Y.astype(np.float64))]
        for got, want in got_want:
            if not (np.allclose(got[:-1], want + 0.5, rtol=1e-4, atol=1e-4 * np.abs(want).max())
                    and np.all(got[-1] == 0.5)):
                return False
    return True


def _setup():
    try:
        bound = _bind()
        if bound is None or not _self_check(bound):
            return None
        import llvmlite.binding as llvm
        for r in _ROUTINES:
            # compiled loops call these names; Numba links them by name, so its cache stays valid
            llvm.add_symbol(f"lstmkit_sgemm_{r}", ctypes.cast(bound[r], ctypes.c_void_p).value)
        return bound
    except Exception:  # noqa: BLE001 - a faster product is an optimisation, never a requirement
        return None


_BOUND = _setup()
AVAILABLE = _BOUND is not None


def pack_for_xwt(W, out):
    """W (G, K) packed as the A side of R = X W^T (each step's x_t W_ih^T, h_{t-1} W_hh^T) into
    out (float32, at least packed_size(G, K)). Returns out."""
    G, K = W.shape
    _BOUND["incopy"](K, G, W.ctypes.data, K, out.ctypes.data)
    return out


def pack_for_dw(W, out):
    """W (G, K) packed as the A side of R = D W (each step's da_t W_hh, da_t W_ih) into out
    (at least packed_size(K, G)). Returns out."""
    G, K = W.shape
    _BOUND["itcopy"](G, K, W.ctypes.data, K, out.ctypes.data)
    return out


# ---------------------------------------------------------------------- from compiled loops
# The routines as compiled code calls them (by the names _setup gave them); pointers as integers.
_i64, _f32 = types.int64, types.float32
kernel = types.ExternalFunction("lstmkit_sgemm_kernel", types.int32(_i64, _i64, _i64, _f32, _i64, _i64,
                                                                      _i64, _i64))
pack_b_cols = types.ExternalFunction("lstmkit_sgemm_oncopy", types.int32(_i64, _i64, _i64, _i64, _i64))
pack_b_rows = types.ExternalFunction("lstmkit_sgemm_otcopy", types.int32(_i64, _i64, _i64, _i64, _i64))
pack_a_cols = types.ExternalFunction("lstmkit_sgemm_itcopy", types.int32(_i64, _i64, _i64, _i64, _i64))
# The K block of add_dt_y: a packed (N x KC) block of Y stays in the core's L2 while the kernel
# streams D's block past it (GotoBLAS's blocking, one level of it).
KC = 256


@njit(**_JIT)
def add_dt_y(D, Y, C, a_buf, b_buf):
    """C += D^T Y for D (K, M) with any row stride (a column slice of a wider array), Y (K, N) and
    C (M, N) C-contiguous: a weight gradient over K rows. a_buf, b_buf: packed_size(N, KC) and
    packed_size(M, KC) floats. In column-major terms C^T (N x M) += Y^T D."""
    K, M = D.shape
    N = Y.shape[1]
    ldd = D.strides[0] // D.itemsize
    for k0 in range(0, K, KC):
        kc = min(KC, K - k0)
        pack_a_cols(kc, N, Y[k0].ctypes.data, N, a_buf.ctypes.data)
        pack_b_rows(kc, M, D[k0].ctypes.data, ldd, b_buf.ctypes.data)
        kernel(N, M, kc, np.float32(1.0), a_buf.ctypes.data, b_buf.ctypes.data, C.ctypes.data, N)


# ---------------------------------------------------------------------- the parts, one per core
MIN_PART_ROWS = 8       # a part of fewer rows runs the kernel's n side below its best width


@intrinsic
def float32_at(typingctx, address):
    """The float32 pointer at an integer address (compiled code only), for numba.carray: how a
    part rebuilds its arrays from the addresses in its argument row."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return types.CPointer(types.float32)(types.int64), codegen


# ---------------------------------------------------------------------- a barrier between parts
# Parts that split a step's work (lstm_units.py) meet once per step on a shared int64 counter:
# each adds 1 when its share of the step is written, then spins until all parts of that step have.
# The parts run at the same time on OpenBLAS's threads (run_parts), so a spin is a short wait.
@intrinsic
def _atomic_add(typingctx, address, value):
    """*address += value as one atomic step (sequentially consistent); returns the old value."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")
    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _atomic_load(typingctx, address):
    """*address read atomically (acquire: what the other parts wrote before their add is seen)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(types.int64), codegen


@intrinsic
def _spin_pause(typingctx):
    """x86's pause: a spinning core yields its pipeline to the other hyper-thread and saves power."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@njit(**_JIT)
def barrier(counter, parts, step):
    """Part's arrival at the end of `step` (0, 1, ...): returns once all `parts` parts have arrived.
    counter: the address of an int64 that starts at 0, shared by the parts of one call."""
    _atomic_add(counter, 1)
    target = parts * (step + 1)
    while _atomic_load(counter) < target:
        _spin_pause()


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blas_threads():
    """The threads NumPy's OpenBLAS may use now (the user's OPENBLAS_NUM_THREADS, or its default)."""
    return blas._BLAS_THREADS[0]() if blas._BLAS_THREADS is not None else 1


def parts_for(B):
    """How many parts a batch of B rows is cut into: one per thread OpenBLAS may use (its count is
    the user's choice, OPENBLAS_NUM_THREADS=1 included), at most one per core, each at least
    MIN_PART_ROWS rows."""
    if _RUN_ON_POOL is None:
        return 1
    return max(1, min(_cores(), _blas_threads(), B // MIN_PART_ROWS))


def row_ranges(B, parts):
    """The parts' row ranges [(r0, r1), ...], as even as B allows."""
    edges = [B * p // parts for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _pool_runner():
    """OpenBLAS's gotoblas_pthread(n, function, args, stride): function(args + p * stride) for
    p < n, part 0 on the calling thread and the others on OpenBLAS's own worker threads, returning
    when all are done (its pthread_create-like entry, exported by its pthreads builds)."""
    fn = getattr(_BOUND["lib"], "gotoblas_pthread", None) if _BOUND is not None else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


_RUN_ON_POOL = _pool_runner()


# OpenBLAS's thread count when lstmkit was imported: its pool of workers has at least that many
# (a later openblas_set_num_threads lowers the count it uses, not the workers it made)
POOL_THREADS = _blas_threads()


def run_parts(part, rows, together=False):
    """part(row p of rows) for every part at once: `part` a Numba cfunc taking a pointer to one
    int64 row (its arrays' addresses and its sizes), rows an int64 array (parts, fields) kept alive
    by the caller. The parts run on OpenBLAS's own threads: its workers are the ones NumPy's
    multi-threaded products use, so nothing else competes for the cores (threads of our own lost up
    to 2x to those workers, which spin ~0.1 s after every such product), and a worker still
    spinning takes its part at once. Parts must not call NumPy's BLAS (they run inside it).
    together: all parts at once whatever OpenBLAS's thread count is now, for parts that wait for
    each other (lstm_units' barrier): blas._single_blas_thread in another Python thread lowers that
    count for a moment, and parts run in waves of it would leave the first wave waiting forever.
    The caller keeps them at most POOL_THREADS."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    threads = (rows.shape[0] if together else _blas_threads()) if _RUN_ON_POOL is not None else 1
    # never more parts at once than OpenBLAS has threads: more waited for a free worker forever
    for first in range(0, rows.shape[0], threads):
        n = min(threads, rows.shape[0] - first)
        if n == 1:
            part.ctypes(ctypes.cast(rows[first].ctypes.data, part.ctypes.argtypes[0]))
        else:
            _RUN_ON_POOL(n, part.address, rows[first].ctypes.data, rows.strides[0])
