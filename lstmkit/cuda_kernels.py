"""The GPU fast path's element-wise kernels: one CUDA C source, run by CuPy on the GPU and by g++ on
the CPU (for the tests), and the launch wrappers both share.

Why CUDA C through cupy.RawModule (and not numba.cuda or cupy.ElementwiseKernel):
    * Launch cost. Batch-1 generation and small training steps are bound by launches, not
      arithmetic; a RawModule function is launched by CuPy's Cython path (a few µs), while
      numba.cuda's launches go through Python argument marshalling (tens of µs), and numba.cuda in
      Numba 0.68 is deprecated in favour of the separate numba-cuda package, whose version on the
      GPU machine is unknown.
    * The same source is checked on a machine without a GPU. Each kernel is a `for each element`
      loop around a `__device__` function; the prelude below turns that loop into a CUDA thread
      index under nvcc/NVRTC (__CUDACC__) and into a plain C++ for-loop under g++, so the tests
      compile this exact text with g++ (CpuKernels) and run the GPU layers' whole algorithm
      (cuda_layers.py) on NumPy arrays against the reference, and compile it with `nvcc --ptx`
      to catch CUDA-only errors. ElementwiseKernel bodies are fragments that only CuPy can
      compile, so they could not be checked here.

Each kernel does one step's element-wise work for all B*H (b, j) pairs, thread k = b*H + j, and
reads the four (three) gate rows of unit j: i at j, f at H + j, g at 2H + j, o at 3H + j. The
equations are functional.py's (LSTM, RNN) and gru.py's (GRU); sigmoid is the same tanh form, so
float64 agrees with the reference to rounding. Shape letters: B batch, H hidden size, G gate rows.
"""

import ctypes
import os
import subprocess

import numpy as np

SOURCE = r"""
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)   /* nvcc or NVRTC: one thread per element */
#define FOR_EACH(k, n) long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; if (k < n)
#define KERNEL extern "C" __global__
/* a warp (32 lanes) per unit j: each lane sums its share, the warp adds the 32 partial sums */
#define FOR_EACH_UNIT(j, n) long long j = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32; if (j < n)
#define FOR_EACH_LANE(lane) for (int lane = threadIdx.x % 32, end_ = lane + 1; lane < end_; ++lane)
#define WARP_SUM4(s) for (int q_ = 0; q_ < 4; ++q_) \
                         for (int o_ = 16; o_ > 0; o_ >>= 1) s[q_] += __shfl_down_sync(0xffffffffu, s[q_], o_)
#define LANE_ZERO (threadIdx.x % 32 == 0)
#else                                    /* g++ for the CPU tests: a loop over all elements */
#include <math.h>
#define __device__
#define FOR_EACH(k, n) for (long long k = 0; k < n; ++k)
#define KERNEL extern "C"
/* the 32 lanes of a unit one after another, their partial sums added as they go */
#define FOR_EACH_UNIT(j, n) for (long long j = 0; j < n; ++j)
#define FOR_EACH_LANE(lane) for (int lane = 0; lane < 32; ++lane)
#define WARP_SUM4(s)
#define LANE_ZERO true
#endif

__device__ inline float tanh_(float x) { return tanhf(x); }
__device__ inline double tanh_(double x) { return tanh(x); }
template <typename T> __device__ inline T sigmoid_(T x) { return T(0.5) * (T(1) + tanh_(T(0.5) * x)); }

/* LSTM forward, element (b, j). a: x W_ih^T + b in, the gates i, f, g, o out; r = h W_hh^T. */
template <typename T> __device__ inline void lstm_fwd(long long k, int H, T* a, const T* r,
                                                      const T* c_prev, T* c, T* m) {
    long long b = k / H, j = k % H, row = b * 4 * H;
    T i = sigmoid_(a[row + j] + r[row + j]);
    T f = sigmoid_(a[row + H + j] + r[row + H + j]);
    T g = tanh_(a[row + 2 * H + j] + r[row + 2 * H + j]);
    T o = sigmoid_(a[row + 3 * H + j] + r[row + 3 * H + j]);
    T ct = f * c_prev[k] + i * g;
    a[row + j] = i; a[row + H + j] = f; a[row + 2 * H + j] = g; a[row + 3 * H + j] = o;
    c[k] = ct;
    m[k] = o * tanh_(ct);                       /* h_t, or m_t before the projection */
}

/* LSTM backward, element (b, j). dm = dy (+ dr when has_dr); dc: dc_t in, dc_{t-1} out. */
template <typename T> __device__ inline void lstm_bwd(long long k, int H, const T* gates, const T* c,
                                                      const T* c_prev, const T* dy, const T* dr,
                                                      int has_dr, T* dc, T* da) {
    long long b = k / H, j = k % H, row = b * 4 * H;
    T i = gates[row + j], f = gates[row + H + j], g = gates[row + 2 * H + j], o = gates[row + 3 * H + j];
    T tc = tanh_(c[k]);
    T dm = has_dr ? dy[k] + dr[k] : dy[k];
    T dct = dc[k] + dm * o * (T(1) - tc * tc);
    da[row + j] = dct * g * i * (T(1) - i);
    da[row + H + j] = dct * c_prev[k] * f * (T(1) - f);
    da[row + 2 * H + j] = dct * i * (T(1) - g * g);
    da[row + 3 * H + j] = dm * tc * o * (T(1) - o);
    dc[k] = dct * f;
}

/* LSTM, batch 1, one step (generation; a cell at batch 1): a = W_ih x + W_hh h + b and the cell
   update in ONE launch, no cuBLAS. Unit j's four gate rows (i, f, g, o: rows j, H+j, 2H+j, 3H+j)
   are read by one warp, lane l taking columns l, l+32, ... (consecutive lanes, consecutive
   addresses: coalesced); at this size the step is bound by reading the weights, which stay in L2. */
template <typename T> __device__ inline void lstm_b1_partial(long long j, int lane, int H, int I, const T* x,
                                                             const T* hp, const T* W_ih, const T* W_hh, T* s) {
    for (int q = 0; q < 4; ++q) {
        const T* wi = W_ih + (q * H + j) * I;
        const T* wh = W_hh + (q * H + j) * H;
        T acc = T(0);
        for (int k = lane; k < I; k += 32) acc += wi[k] * x[k];
        for (int k = lane; k < H; k += 32) acc += wh[k] * hp[k];
        s[q] += acc;
    }
}
template <typename T> __device__ inline void lstm_b1_finish(long long j, int H, const T* s, const T* b, int has_b,
                                                            const T* c_prev, T* gates, T* c, T* h) {
    T i = sigmoid_(s[0] + (has_b ? b[j] : T(0)));
    T f = sigmoid_(s[1] + (has_b ? b[H + j] : T(0)));
    T g = tanh_(s[2] + (has_b ? b[2 * H + j] : T(0)));
    T o = sigmoid_(s[3] + (has_b ? b[3 * H + j] : T(0)));
    T ct = f * c_prev[j] + i * g;
    gates[j] = i; gates[H + j] = f; gates[2 * H + j] = g; gates[3 * H + j] = o;
    c[j] = ct;
    h[j] = o * tanh_(ct);
}

/* RNN forward: h = tanh or relu(a + r);  backward: da = (dy + dr) * phi'(h). */
template <typename T> __device__ inline void rnn_fwd(long long k, const T* a, const T* r, int relu, T* h) {
    T s = a[k] + r[k];
    h[k] = relu ? (s > T(0) ? s : T(0)) : tanh_(s);
}
template <typename T> __device__ inline void rnn_bwd(long long k, const T* h, const T* dy, const T* dr,
                                                     int relu, T* da) {
    T d = dy[k] + dr[k];
    da[k] = relu ? (h[k] > T(0) ? d : T(0)) : d * (T(1) - h[k] * h[k]);
}

/* GRU forward, element (b, j). a: x W_ih^T + b_ih in, r, z, n out; r_ = h W_hh^T; bh = b_hh. */
template <typename T> __device__ inline void gru_fwd(long long k, int H, T* a, const T* r_, const T* bh,
                                                     const T* h_prev, T* ha_n, T* h) {
    long long b = k / H, j = k % H, row = b * 3 * H;
    T r = sigmoid_(a[row + j] + r_[row + j] + bh[j]);
    T z = sigmoid_(a[row + H + j] + r_[row + H + j] + bh[H + j]);
    T hn = r_[row + 2 * H + j] + bh[2 * H + j];
    T n = tanh_(a[row + 2 * H + j] + r * hn);
    a[row + j] = r; a[row + H + j] = z; a[row + 2 * H + j] = n;
    ha_n[k] = hn;
    h[k] = n + z * (h_prev[k] - n);             /* (1 - z) n + z h_{t-1} */
}

/* GRU backward, element (b, j). dh_t = dy + dhz + dhr; dhz out: dh_t * z (the direct part of dh_{t-1}). */
template <typename T> __device__ inline void gru_bwd(long long k, int H, const T* gates, const T* ha_n,
                                                     const T* h_prev, const T* dy, T* dhz, const T* dhr,
                                                     T* dxa, T* dha) {
    long long b = k / H, j = k % H, row = b * 3 * H;
    T r = gates[row + j], z = gates[row + H + j], n = gates[row + 2 * H + j];
    T dh = dy[k] + dhz[k] + dhr[k];
    T dan = dh * (T(1) - z) * (T(1) - n * n);
    T dar = dan * ha_n[k] * r * (T(1) - r);
    T daz = dh * (h_prev[k] - n) * z * (T(1) - z);
    dxa[row + j] = dar; dxa[row + H + j] = daz; dxa[row + 2 * H + j] = dan;
    dha[row + j] = dar; dha[row + H + j] = daz; dha[row + 2 * H + j] = dan * r;
    dhz[k] = dh * z;
}

#define INSTANTIATE(T, S)                                                                          \
KERNEL void lstm_fwd_##S(long long n, int H, T* a, const T* r, const T* cp, T* c, T* m)             \
    { FOR_EACH(k, n) lstm_fwd<T>(k, H, a, r, cp, c, m); }                                          \
KERNEL void lstm_bwd_##S(long long n, int H, const T* gt, const T* c, const T* cp, const T* dy,     \
                         const T* dr, int has_dr, T* dc, T* da)                                    \
    { FOR_EACH(k, n) lstm_bwd<T>(k, H, gt, c, cp, dy, dr, has_dr, dc, da); }                       \
KERNEL void rnn_fwd_##S(long long n, const T* a, const T* r, int relu, T* h)                        \
    { FOR_EACH(k, n) rnn_fwd<T>(k, a, r, relu, h); }                                               \
KERNEL void rnn_bwd_##S(long long n, const T* h, const T* dy, const T* dr, int relu, T* da)         \
    { FOR_EACH(k, n) rnn_bwd<T>(k, h, dy, dr, relu, da); }                                         \
KERNEL void gru_fwd_##S(long long n, int H, T* a, const T* r, const T* bh, const T* hp, T* hn, T* h) \
    { FOR_EACH(k, n) gru_fwd<T>(k, H, a, r, bh, hp, hn, h); }                                      \
KERNEL void gru_bwd_##S(long long n, int H, const T* gt, const T* hn, const T* hp, const T* dy,     \
                        T* dhz, const T* dhr, T* dxa, T* dha)                                      \
    { FOR_EACH(k, n) gru_bwd<T>(k, H, gt, hn, hp, dy, dhz, dhr, dxa, dha); }                       \
KERNEL void lstm_b1_##S(long long n, int H, int I, const T* x, const T* hp, const T* cp, const T* W_ih, \
                        const T* W_hh, const T* b, int has_b, T* gates, T* c, T* h) {              \
    FOR_EACH_UNIT(j, n) {                                                                          \
        T s[4] = {T(0), T(0), T(0), T(0)};                                                         \
        FOR_EACH_LANE(lane) lstm_b1_partial<T>(j, lane, H, I, x, hp, W_ih, W_hh, s);               \
        WARP_SUM4(s);                                                                              \
        if (LANE_ZERO) lstm_b1_finish<T>(j, H, s, b, has_b, cp, gates, c, h);                      \
    }                                                                                              \
}

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
"""

# Each kernel's arguments after n (the element count, long long): "i" an int, "p" an array.
SIGNATURES = {
    "lstm_fwd": "ippppp",
    "lstm_bwd": "ipppppipp",
    "rnn_fwd": "ppip",
    "rnn_bwd": "pppip",
    "gru_fwd": "ipppppp",
    "gru_bwd": "ipppppppp",
    "lstm_b1": "iippppppippp",
}
LANES = {"lstm_b1": 32}   # threads per element (unit) where a warp shares one; 1 elsewhere
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
THREADS = 256     # per block: a multiple of the warp, enough blocks at B*H >= 64k to fill an H200


def _check_args(name, args):
    """The arrays a kernel gets must be C-contiguous and of one dtype: it indexes raw memory."""
    kinds = SIGNATURES[name]
    if len(args) != len(kinds):
        raise TypeError(f"kernel {name} takes {len(kinds)} arguments after n, got {len(args)}")
    dtype = None
    for kind, a in zip(kinds, args):
        if kind == "p":
            if not a.flags.c_contiguous:
                raise ValueError(f"kernel {name}: an array argument is not C-contiguous, shape {a.shape}")
            if dtype is None:
                dtype = a.dtype
            elif a.dtype != dtype:
                raise TypeError(f"kernel {name}: arrays of dtypes {dtype} and {a.dtype}")
    return dtype


class CupyKernels:
    """The source compiled by NVRTC through cupy.RawModule (CuPy caches the binary per user)."""

    def __init__(self, cupy):
        self._cupy = cupy
        self._module = cupy.RawModule(code=SOURCE)
        self._functions = {}

    def __call__(self, name, n, *args):
        """Run kernel `name` over n elements, args as SIGNATURES lists them."""
        dtype = _check_args(name, args)
        key = (name, dtype)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = self._module.get_function(f"{name}_{_SUFFIX[dtype]}")
        values = [np.int32(a) if kind == "i" else a for kind, a in zip(SIGNATURES[name], args)]
        threads = n * LANES.get(name, 1)
        fn(((threads + THREADS - 1) // THREADS,), (THREADS,), (np.int64(n), *values))


class CpuKernels:
    """The same source compiled by g++ into build_dir and called through ctypes on NumPy arrays:
    the tests' stand-in for the GPU (cuda_layers.py runs on it unchanged)."""

    def __init__(self, build_dir, compiler="g++"):
        src = os.path.join(build_dir, "lstmkit_cuda_kernels.cpp")
        lib = os.path.join(build_dir, "lstmkit_cuda_kernels.so")
        with open(src, "w", encoding="utf-8") as f:
            f.write(SOURCE)
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", lib, src], check=True,
                       capture_output=True, text=True)
        self._lib = ctypes.CDLL(lib)
        for name, kinds in SIGNATURES.items():
            for suffix in _SUFFIX.values():
                fn = getattr(self._lib, f"{name}_{suffix}")
                fn.restype = None
                fn.argtypes = [ctypes.c_longlong] + [ctypes.c_int if k == "i" else ctypes.c_void_p
                                                     for k in kinds]

    def __call__(self, name, n, *args):
        dtype = _check_args(name, args)
        fn = getattr(self._lib, f"{name}_{_SUFFIX[dtype]}")
        fn(int(n), *(int(a) if kind == "i" else a.ctypes.data for kind, a in zip(SIGNATURES[name], args)))


_runners = {}     # array module -> kernel runner


def kernels_for(xp):
    """The kernel runner for arrays of `xp`: CuPy's, built on first use; for numpy only the one a
    test installed with use_cpu_kernels (the GPU layers never run on NumPy arrays otherwise)."""
    runner = _runners.get(xp)
    if runner is None:
        if xp is np:
            raise RuntimeError("cuda_layers got NumPy arrays: the GPU path runs on CuPy arrays "
                               "(cuda_kernels.use_cpu_kernels installs the g++ build for tests)")
        runner = _runners[xp] = CupyKernels(xp)
    return runner


def use_cpu_kernels(runner):
    """Run cuda_layers on NumPy arrays with `runner` (a CpuKernels), or None to stop: for tests
    and the benchmark scripts' --cpu dry run."""
    if runner is None:
        _runners.pop(np, None)
    else:
        _runners[np] = runner
