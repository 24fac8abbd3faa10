"""tile_gemm.py's register-tile product against float64 NumPy: both vector widths (the AVX2 tile
runs on an AVX-512 machine too), rows of X that are no multiple of the tile, K of 1 and odd K, row
strides wider than the rows, an M that ends in a partial panel; and that nothing outside C's
(n, M) block changes except the padding columns the caller gives room for."""

import numpy as np
import pytest

from lstmkit import tile_gemm

pytestmark = pytest.mark.skipif(not tile_gemm.AVAILABLE, reason="no AVX2+FMA or AVX-512 for the tile")

SHAPES = [(64, 1, 1), (128, 7, 13), (100, 65, 7), (256, 130, 32), (17, 3, 6), (64, 64, 50)]


def _product(f, mr, M, K, n, rng, pad_x=3, pad_c=5):
    A = rng.standard_normal((M, K)).astype(np.float32)
    X = rng.standard_normal((n, K + pad_x)).astype(np.float32)       # row stride K + pad_x
    P = tile_gemm.panels(M, mr)
    a = tile_gemm.pack(A, np.full(tile_gemm.packed_size(M, K, mr), np.nan, np.float32), mr)
    C = np.full((n + 1, P + pad_c), 0.5, np.float32)                 # one row more, and wider rows
    f(M, n, K, a.ctypes.data, X.ctypes.data, K + pad_x, C.ctypes.data, P + pad_c)
    want = X[:, :K].astype(np.float64) @ A.T.astype(np.float64) + 0.5
    return C, want, P


@pytest.mark.parametrize("vw, mv", [(16, 4), (8, 2)])
@pytest.mark.parametrize("M, K, n", SHAPES)
def test_tile_matches_numpy(vw, mv, M, K, n):
    if (vw, mv) == (tile_gemm.VW, tile_gemm.MV):
        f = tile_gemm.xwt_add
    else:
        f = tile_gemm.make_xwt_add(vw, mv, cache=False)
    C, want, P = _product(f, vw * mv, M, K, n, np.random.default_rng(M + K + n))
    np.testing.assert_allclose(C[:n, :M], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.all(C[:n, M:] == 0.5)        # padding columns get zeros added; past them, untouched
    assert np.all(C[n] == 0.5)             # the row after the last one is never written


def test_pack_pads_the_last_panel_with_zero_rows():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((20, 3)).astype(np.float32)
    a = tile_gemm.pack(A, np.full(tile_gemm.packed_size(20, 3, 16), np.nan, np.float32), 16)
    panels = a.reshape(2, 3, 16)                                     # (M / MR, K, MR)
    np.testing.assert_array_equal(panels[0], A[:16].T)
    np.testing.assert_array_equal(panels[1, :, :4], A[16:].T)
    assert np.all(panels[1, :, 4:] == 0)


def test_width_follows_the_cpu_numba_compiles_for(monkeypatch):
    import llvmlite.binding as llvm
    monkeypatch.setattr(tile_gemm.config, "CPU_NAME", None)
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: {"avx512f": True, "avx2": True, "fma": True})
    assert tile_gemm._width() == (16, 4)
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: {"avx2": True, "fma": True})
    assert tile_gemm._width() == (8, 2)
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: {"avx": True})
    assert tile_gemm._width() is None
    monkeypatch.setattr(tile_gemm.config, "CPU_NAME", "generic")         # a user's portable cache
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: {"avx512f": True})
    assert tile_gemm._width() is None
