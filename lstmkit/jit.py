"""What every fused kernel is built from: Numba's settings, float32 tanh and sigmoid that
vectorise, and the small 1-D loops (dot, axpy) that LLVM turns into vector code.

The fused layers (lstm_fused.py, rnn_fused.py, gru.py) import from here; AVAILABLE is False when
Numba is not installed, and then none of the names below exist (the reference runs instead).

    * float32 tanh/sigmoid are a rational approximation (Eigen's float tanh; within a few float32
      ulps, tested) written in plain arithmetic, so LLVM vectorises the gate loop; math.tanh
      would be a scalar libm call per element (issue 4: 10x slower than NumPy's ufuncs).
      float64 keeps libm's tanh, so float64 results match the reference to ~1e-15.
    * float32 exp likewise (Cephes' expf: 2^n times a polynomial on [-ln2/2, ln2/2]), for the
      softmax (softmax_fused.py); float64 keeps libm's exp.
    * Every loop over j lives in its own small function that takes 1-D rows. Measured: the same
      loop written inline over rows of 2-D arrays stays scalar (6x slower); as a separate function
      on 1-D arguments LLVM vectorises it (8 floats per AVX2 instruction) and inlines it.
"""

import math

import numpy as np

try:
    from llvmlite import ir
    from numba import njit
    from numba.core import types
    from numba.extending import intrinsic, overload

    from . import jit_cache

    jit_cache.install()     # compiled kernels go to a per-user cache, never into the installed package
    AVAILABLE = True
except ImportError:  # the reference in functional.py is used instead
    AVAILABLE = False


if AVAILABLE:
    # fastmath lets LLVM reassociate and use FMA; error_model="numpy" removes the Python-style
    # zero-division checks that would block vectorisation; boundscheck off is Numba's default.
    _JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

    # Coefficients of tanh(x) ~= x P(x²) / Q(x²) on [-7.9, 7.9] (Eigen's ptanh_float; outside
    # that range tanh(x) rounds to ±1 in float32). np.float32 globals keep the arithmetic in
    # float32: Python floats would promote every step to float64 and halve the vector width.
    _CLAMP = np.float32(7.90531110763549805)
    _A1 = np.float32(4.89352455891786e-03)
    _A3 = np.float32(6.37261928875436e-04)
    _A5 = np.float32(1.48572235717979e-05)
    _A7 = np.float32(5.12229709037114e-08)
    _A9 = np.float32(-8.60467152213735e-11)
    _A11 = np.float32(2.00018790482477e-13)
    _A13 = np.float32(-2.76076847742355e-16)
    _B0 = np.float32(4.89352518554385e-03)
    _B2 = np.float32(2.26843463243900e-03)
    _B4 = np.float32(1.18534705686654e-04)
    _B6 = np.float32(1.19825839466702e-06)
    _HALF32 = np.float32(0.5)

    def _tanh(x):  # pragma: no cover - replaced by the overload below inside compiled code
        return math.tanh(x)

    def _sigmoid(x):  # pragma: no cover
        return 0.5 * (1.0 + math.tanh(0.5 * x))

    @overload(_tanh, jit_options=dict(fastmath=True))
    def _tanh_ov(x):
        if isinstance(x, types.Float) and x.bitwidth == 32:
            def impl(x):
                x = min(max(x, -_CLAMP), _CLAMP)
                x2 = x * x
                p = x2 * _A13 + _A11
                p = p * x2 + _A9
                p = p * x2 + _A7
                p = p * x2 + _A5
                p = p * x2 + _A3
                p = p * x2 + _A1
                q = x2 * _B6 + _B4
                q = q * x2 + _B2
                q = q * x2 + _B0
                return x * p / q
            return impl
        return lambda x: math.tanh(x)

    @overload(_sigmoid, jit_options=dict(fastmath=True))
    def _sigmoid_ov(x):
        # σ(x) = (1 + tanh(x/2)) / 2: one vectorisable function for both, and no exp overflow.
        if isinstance(x, types.Float) and x.bitwidth == 32:
            return lambda x: _HALF32 + _HALF32 * _tanh(_HALF32 * x)
        return lambda x: 0.5 + 0.5 * math.tanh(0.5 * x)

    # exp(x) = 2^n e^r with n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (ln2 in two parts,
    # Cody and Waite, so r is exact to float32), e^r by Cephes' expf polynomial (~1 ulp). Clamped so
    # that 2^n stays a normal float: exp underflows to ~1e-38 and overflows to ~2.4e38, never inf.
    _LOG2E = np.float32(1.44269504088896341)
    _LN2_HI = np.float32(0.693359375)
    _LN2_LO = np.float32(-2.12194440e-4)
    _EXP_LO = np.float32(-87.3)
    _EXP_HI = np.float32(88.3)
    _E5 = np.float32(1.9875691500e-4)
    _E4 = np.float32(1.3981999507e-3)
    _E3 = np.float32(8.3334519073e-3)
    _E2 = np.float32(4.1665795894e-2)
    _E1 = np.float32(1.6666665459e-1)
    _E0 = np.float32(5.0000001201e-1)
    _ONE32 = np.float32(1.0)

    @intrinsic
    def _pow2(typingctx, n):
        """2^n for a float32 n holding an integer in [-126, 127]: the exponent bits set directly
        (plain integer ops, so a loop of them vectorises; math.ldexp is a libm call)."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            k = builder.fptosi(args[0], i32)
            bits = builder.shl(builder.add(k, ir.Constant(i32, 127)), ir.Constant(i32, 23))
            return builder.bitcast(bits, ir.FloatType())
        return types.float32(types.float32), codegen

    def _exp(x):  # pragma: no cover - replaced by the overload below inside compiled code
        return math.exp(x)

    # no reassociation here: it could fold n*_LN2_HI + n*_LN2_LO back into one rounded n*ln2
    @overload(_exp, jit_options=dict(fastmath={"nnan", "ninf", "nsz", "contract", "afn"}))
    def _exp_ov(x):
        if isinstance(x, types.Float) and x.bitwidth == 32:
            def impl(x):
                x = min(max(x, _EXP_LO), _EXP_HI)
                n = np.floor(x * _LOG2E + _HALF32)      # np.floor keeps float32 (math.floor: an int)
                r = (x - n * _LN2_HI) - n * _LN2_LO
                p = r * _E5 + _E4
                p = p * r + _E3
                p = p * r + _E2
                p = p * r + _E1
                p = p * r + _E0
                return (p * (r * r) + r + _ONE32) * _pow2(n)
            return impl
        return lambda x: math.exp(x)

    # Every loop over j below lives in its own small function that takes 1-D rows. Measured:
    # the same loop written inline over rows of 2-D arrays stays scalar (6x slower); as a separate

    @njit(**_JIT)
    def _dot(w, v):
        # The sum starts from a typed zero and the loop from k = 0. Starting from w[0] * v[0]
        # and k = 1 (an easy way to get the type) shifts the vector loop by one element and
        # leaves up to 31 to a scalar tail: measured 2x slower on the (4H, I) and (4H, H)
        # matrix-vector products of a batch-1 step at H = 128.
        s = w.dtype.type(0)
        for k in range(v.shape[0]):
            s += w[k] * v[k]
        return s

    @njit(**_JIT)
    def _add2(u, v, out):
        for k in range(out.shape[0]):
            out[k] = u[k] + v[k]

    @njit(**_JIT)
    def _axpy(a, w, out):
        for k in range(out.shape[0]):
            out[k] += a * w[k]

    @njit(**_JIT)
    def _axpy4(a0, a1, a2, a3, w0, w1, w2, w3, out):
        for k in range(out.shape[0]):
            out[k] += a0 * w0[k] + a1 * w1[k] + a2 * w2[k] + a3 * w3[k]

    @njit(**_JIT)
    def _vecmat_add(v, W, out):
        """out (K,) += v (R,) W (R, K): rows of W scaled and added (unit stride, vectorised), four
        rows per pass over out. A batch-1 step's matrix-vector product streams W from L2 and is
        bound by loads and stores, not by multiplies: one row per pass loads and stores out once
        per row; four per pass do it once per four. Measured on Zen 4 at (R, K) = (128, 512) and
        (256, 1024): 3.5 and 14.0 µs against 4.7 and 17.9 one row at a time (1.25-1.35x); equal at
        (512, 2048), where W no longer fits in L2."""
        R = W.shape[0]
        r = 0
        while r + 4 <= R:
            _axpy4(v[r], v[r + 1], v[r + 2], v[r + 3], W[r], W[r + 1], W[r + 2], W[r + 3], out)
            r += 4
        while r < R:
            _axpy(v[r], W[r], out)
            r += 1

    @njit(**_JIT)
    def _vecmat(v, W, out):
        """out (K,) = v (R,) W (R, K)."""
        out[:] = 0
        _vecmat_add(v, W, out)

    # ------------------------------------------------------------------ fingerprints (contexts.py)
    @njit(**_JIT)
    def _fingerprint_words(w):
        """A 64-bit fingerprint of 32-bit words w: each word xor its index goes through a
        multiply-xorshift mix, so an edit anywhere moves the sums pseudo-randomly; two sums make
        64 bits. All 32-bit arithmetic, so it vectorises: measured 14.6 GB/s against zlib's CRC-32
        at 4.2, which made hashing a training step's input ~2% of the step at (T, B, I) = (50, 32, 128)."""
        s1 = np.uint32(0)
        s2 = np.uint32(0)
        for i in range(w.shape[0]):
            v = w[i] ^ (np.uint32(i) * np.uint32(0x9E3779B1))
            v = (v ^ (v >> np.uint32(15))) * np.uint32(0x2C1B3C6D)
            v = (v ^ (v >> np.uint32(12))) * np.uint32(0x297A2D39)
            s1 += v
            s2 += v ^ (v >> np.uint32(15))
        return (np.uint64(s1) << np.uint64(32)) | np.uint64(s2)
