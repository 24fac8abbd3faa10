"""A matrix-product micro-kernel of our own for the recurrent products: a register tile of sums
kept in vector registers over the whole K loop (BLIS's design), written as LLVM vector code that
Numba compiles for the running CPU.

    C (n, M) += X (n, K) A^T        A (M, K) packed once in panels of MR rows: (M / MR, K, MR)

Why. gemm_kernel.py calls OpenBLAS's own micro-kernel on weights packed once per layer. On Zen 4
(AVX-512 run as two 256-bit halves; 117 GFLOP/s per core measured with a pure FMA loop) that
kernel ran the per-step shapes at 95-107 GFLOP/s; this tile runs them at 106-114 (BENCHMARKS.md,
"Ninth session"), and it reads X's rows where they lie, so a step packs nothing on the X side.

The tile. MR = MV vectors of VW floats (rows of A), NR rows of X. For each k it loads the MV
vectors of the panel's column k, broadcasts X[r, k] for each of the NR rows and adds MV * NR
fused multiply-adds into MV * NR accumulators, which stay in registers until k = K; then it adds
them into C. With AVX-512 (32 registers of 16 floats): MV = 4, NR = 6, 24 accumulators + 4 + 1
broadcast; with AVX2 and FMA (16 registers of 8 floats): MV = 2, NR = 6, 12 + 2 + 1. Measured
on Zen 4 at (M, K, n) = (1024, 256, 32): MV x NR = 4 x 6 at 110 GFLOP/s, 2 x 12 at 68-85
(two loop orders), 1 x 24 at 103; panels outer and X's rows inner (each panel read from L2 once per
NR rows of X, the NR rows of X from L1).

Shape letters: M the product's output columns (gate rows of the weights), K the reduction
(input or hidden size), n the rows of X and C (batch rows); MR, NR the tile; VW the vector width.
"""

import numpy as np

from .jit import AVAILABLE as _JIT_AVAILABLE

if _JIT_AVAILABLE:
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba import config, njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

NR = 6      # rows of X per tile


def _width():
    """(VW, MV) for the CPU Numba compiles for, or None where the tile would not pay: vectors of
    16 floats with AVX-512, of 8 with AVX2 and FMA (the register counts fix MV)."""
    if not _JIT_AVAILABLE or config.CPU_NAME not in (None, "host"):
        return None         # a user's NUMBA_CPU_NAME (a generic cache): no known vector width
    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        return 16, 4
    if features.get("avx2") and features.get("fma"):
        return 8, 2
    return None


_WIDTH = _width()
AVAILABLE = _WIDTH is not None
VW, MV = _WIDTH if AVAILABLE else (16, 4)
MR = VW * MV    # rows of A per panel: 64 with AVX-512, 16 with AVX2


def panels(M, mr=MR):
    """M rounded up to whole panels: the rows a packed A holds and a C row must have room for."""
    return -(-M // mr) * mr


def packed_size(M, K, mr=MR):
    """Floats that pack() writes for an (M, K) A."""
    return panels(M, mr) * K


def pack(A, out, mr=MR):
    """A (M, K) into out (at least packed_size(M, K) floats) as panels (M / MR, K, MR), rows past
    M zero (they add nothing to C's padding columns). Returns out. Once per weight version: a
    copy with a transpose per panel, which NumPy does in one pass."""
    M, K = A.shape
    whole = M // mr * mr
    dst = out[:panels(M, mr) * K].reshape(-1, K, mr)
    dst[:M // mr] = A[:whole].reshape(M // mr, mr, K).transpose(0, 2, 1)
    if whole < M:
        tail = np.zeros((mr, K), A.dtype)
        tail[:M - whole] = A[whole:]
        dst[-1] = tail.T
    return out


# Defined wherever Numba is (the layers' compiled loops name xwt_add and compile it with them), run
# only where AVAILABLE: elsewhere LLVM splits the vectors into narrower ones, correct but slower.
if _JIT_AVAILABLE:
    def _emit_tile(builder, nr, K, pa, px, ldx, pc, ldc, vw, mv):
        """The IR of one tile with nr rows of X (1 <= nr <= NR): C[0:nr, 0:MR] += X[0:nr] A_panel^T.
        pa the panel (K, MR), px X's first row, pc C's; ldx, ldc their row strides in floats."""
        f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
        vec = ir.VectorType(f32, vw)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                             f"llvm.fma.v{vw}f32")
        # the sums: allocas in the entry block, which LLVM's mem2reg turns into registers
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(mv)]
               for _ in range(nr)]
        rows = [builder.gep(px, [builder.mul(ldx, ir.Constant(i64, r))]) for r in range(nr)]
        spread = ir.Constant(ir.VectorType(i32, vw), [0] * vw)      # lane 0 into every lane
        undef = ir.Constant(vec, ir.Undefined)
        with cgutils.for_range(builder, K) as loop:
            k = loop.index
            column = builder.gep(pa, [builder.mul(k, ir.Constant(i64, vw * mv))])
            a = [builder.load(builder.bitcast(builder.gep(column, [ir.Constant(i64, vw * v)]),
                                              vec.as_pointer()), align=4) for v in range(mv)]
            for r in range(nr):
                x = builder.load(builder.gep(rows[r], [k]))
                xb = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)),
                                            undef, spread)
                for v in range(mv):
                    builder.store(builder.call(fma, [a[v], xb, builder.load(acc[r][v])]), acc[r][v])
        for r in range(nr):
            row = builder.gep(pc, [builder.mul(ldc, ir.Constant(i64, r))])
            for v in range(mv):
                p = builder.bitcast(builder.gep(row, [ir.Constant(i64, vw * v)]), vec.as_pointer())
                builder.store(builder.fadd(builder.load(p, align=4), builder.load(acc[r][v])), p, align=4)

    def make_tile(vw, mv):
        """The tile as a Numba intrinsic, tile(nr, K, a, x, ldx, c, ldc) with addresses as int64:
        a switch on nr over NR copies of _emit_tile (each keeps its own registers)."""
        @intrinsic
        def tile(typingctx, nr, K, a, x, ldx, c, ldc):
            def codegen(context, builder, signature, args):
                nr, K, a, x, ldx, c, ldc = args
                f32p = ir.FloatType().as_pointer()
                pa, px, pc = (builder.inttoptr(v, f32p) for v in (a, x, c))
                done = builder.append_basic_block("tile.done")
                switch = builder.switch(nr, done)
                for n in range(1, NR + 1):
                    block = builder.append_basic_block(f"tile.nr{n}")
                    switch.add_case(ir.Constant(nr.type, n), block)
                    builder.position_at_end(block)
                    _emit_tile(builder, n, K, pa, px, ldx, pc, ldc, vw, mv)
                    builder.branch(done)
                builder.position_at_end(done)
                return context.get_dummy_value()
            return types.void(*([types.int64] * 7)), codegen
        return tile

    def make_xwt_add(vw, mv, cache=True):
        """xwt_add for tiles of mv vectors of vw floats (tests build the other width with it)."""
        tile, mr = make_tile(vw, mv), vw * mv

        @njit(cache=cache, nogil=True)
        def xwt_add(M, n, K, a, x, ldx, c, ldc):
            """C (n, M) += X (n, K) A^T. a: pack(A)'s address; x, c: addresses of X's and C's
            first rows (float32), ldx, ldc their row strides in floats. C's rows must have room
            for panels(M) columns: the padding rows of a packed A add zeros there."""
            for p in range((M + mr - 1) // mr):
                ap = a + 4 * p * mr * K
                cp = c + 4 * p * mr
                for r in range(0, n, NR):
                    tile(min(NR, n - r), K, ap, x + 4 * r * ldx, ldx, cp + 4 * r * ldc, ldc)
        return xwt_add

    xwt_add = make_xwt_add(VW, MV)
