"""scratch.py: the fused LSTM layer's largest arrays are reused from step to step, and never while
something can still read them.

Shape letters: T steps, B batch, I input size, H hidden size.
"""

import gc

import numpy as np
import pytest

from lstmkit import LSTM, scratch

K = pytest.importorskip("lstmkit.kernels")
if not K.AVAILABLE:  # pragma: no cover - numba is a run-time dependency
    pytest.skip("numba not importable: the fused layers are off", allow_module_level=True)


def test_take_gives_back_what_was_given_and_refuses_views():
    a = scratch.take((3, 5), np.float32)
    scratch.give(a)
    assert scratch.take((3, 5), np.float32) is a
    assert scratch.take((3, 5), np.float64) is not a          # another dtype is another key
    view = np.empty((4, 5), np.float32)[1:]
    scratch.give(view)                                        # a view may share memory: never kept
    assert scratch.take((3, 5), np.float32) is not view


def test_kept_arrays_are_bounded_per_shape_and_in_shapes():
    for n in range(scratch.SHAPES + 3):
        for _ in range(scratch.KEEP + 2):
            scratch.give(np.empty((n + 1, 7), np.float32))
    assert len(scratch._free) <= scratch.SHAPES
    assert all(len(v) <= scratch.KEEP for v in scratch._free.values())


def _step(lstm, x, dy):
    lstm.zero_grad()
    out, _ = lstm(x)
    dx, _ = lstm.backward(dy)
    return out, dx, {k: g.copy() for k, g in lstm.grads.items()}


def test_a_training_step_reuses_its_gates_and_gives_the_same_results():
    """Step 2 runs on the arrays step 1 gave back (the point: no fresh pages), and the results are
    those of a fresh module: nothing of step 1 leaks into step 2."""
    T, B, I, H = 6, 4, 3, 5
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((T, B, I)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(I, H, seed=0)
    _step(lstm, x1, dy)
    gc.collect()
    kept = [a for a in scratch._free.get(((T * B, 4 * H), np.dtype(np.float32).str), [])]
    assert kept, "the step gave its gates and dgates back"
    got = _step(lstm, x2, dy)
    want = _step(LSTM(I, H, seed=0), x2, dy)
    for g, w in zip(got[:2], want[:2]):
        np.testing.assert_array_equal(g, w)
    for k in want[2]:
        np.testing.assert_array_equal(got[2][k], want[2][k])


def test_a_retained_context_keeps_its_gates_while_other_steps_run():
    """retain=True keeps the cache for a second backward; forwards and backwards in between (which
    take and give scratch arrays of the same shape) must not touch it."""
    T, B, I, H = 5, 3, 4, 6
    rng = np.random.default_rng(1)
    x, other = (rng.standard_normal((T, B, I)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(I, H, seed=2)
    out, _, ctx = lstm(x, return_ctx=True)
    first, _ = lstm.backward(dy, ctx=ctx, retain=True)
    for _ in range(3):                                   # other steps of the same shape in between
        o, _ = lstm(other)
        lstm.backward(np.ones_like(o))
    second, _ = lstm.backward(dy, ctx=ctx)
    np.testing.assert_array_equal(first, second)


def test_two_live_contexts_never_share_their_gates():
    T, B, I, H = 4, 3, 2, 5
    rng = np.random.default_rng(2)
    xa, xb = (rng.standard_normal((T, B, I)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(I, H, seed=3)
    _, _, ctx_a = lstm(xa, return_ctx=True)
    _, _, ctx_b = lstm(xb, return_ctx=True)
    dxa, _ = lstm.backward(dy, ctx=ctx_a)
    dxb, _ = lstm.backward(dy, ctx=ctx_b)
    ref = LSTM(I, H, seed=3)
    ref(xa)
    want_a, _ = ref.backward(dy)
    ref(xb)
    want_b, _ = ref.backward(dy)
    np.testing.assert_array_equal(dxa, want_a)
    np.testing.assert_array_equal(dxb, want_b)
