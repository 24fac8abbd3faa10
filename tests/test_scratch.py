"""scratch.py: the fused LSTM layer's largest arrays are reused from step to step, and never while
something can still read them.

Shape letters: T steps, B batch, I input size, H hidden size.
"""

import gc
import threading
import weakref

import numpy as np
import pytest

from lstmkit import LSTM, scratch
from lstmkit import no_grad as lstmkit_no_grad

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


def test_an_array_read_by_two_caches_is_given_back_only_when_both_are_gone():
    a, b = scratch.Cache(), scratch.Cache()
    arr = np.empty((9, 11), np.float32)
    scratch.give_when_gone([a, b], arr)
    del a
    gc.collect()
    assert scratch.take((9, 11), np.float32) is not arr     # b still reads it
    del b
    gc.collect()
    assert scratch.take((9, 11), np.float32) is arr


def test_a_two_layer_stack_keeps_its_outputs_and_gradients_apart_from_the_callers():
    """rnn_base writes every layer's output into kept arrays and gives back the weight gradients
    and the upper layers' dx: over several steps the results must be a fresh module's, and what
    a step handed out (output, dx, parameter gradients) must not change when later steps run."""
    T, B, I, H = 5, 4, 3, 6
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((T, B, I)).astype(np.float32) for _ in range(3)]
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(I, H, num_layers=3, seed=5)
    handed = []
    for x in xs:
        out, dx, grads = _step(lstm, x, dy)
        handed.append((out, dx, out.copy(), dx.copy()))
        gc.collect()
        want = _step(LSTM(I, H, num_layers=3, seed=5), x, dy)
        np.testing.assert_array_equal(out, want[0])
        np.testing.assert_array_equal(dx, want[1])
        for k in want[2]:
            np.testing.assert_array_equal(grads[k], want[2][k])
    for out, dx, out_then, dx_then in handed:
        np.testing.assert_array_equal(out, out_then)
        np.testing.assert_array_equal(dx, dx_then)
    assert scratch._free.get(((T, B, H), np.dtype(np.float32).str)), "the outputs were kept"


def test_a_kept_context_of_a_stack_survives_other_steps():
    """The layers' outputs are read by the context's caches (as h, and as the next layer's x):
    steps run in between must not reuse them while the context lives."""
    T, B, I, H = 4, 3, 5, 5
    rng = np.random.default_rng(6)
    x, other = (rng.standard_normal((T, B, I)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(I, H, num_layers=2, seed=7)
    _, _, ctx = lstm(x, return_ctx=True)
    for _ in range(3):
        o, _ = lstm(other)
        lstm.backward(np.ones_like(o))
    lstm.zero_grad()
    dx, _ = lstm.backward(dy, ctx=ctx)
    ref = LSTM(I, H, num_layers=2, seed=7)
    ref(x)
    want, _ = ref.backward(dy)
    np.testing.assert_array_equal(dx, want)
    np.testing.assert_array_equal(lstm.grads["weight_hh_l0"], ref.grads["weight_hh_l0"])


@pytest.mark.parametrize("T,B,lengths", [(5, 3, None), (6, 1, None), (5, 3, [5, 3, 2])])
def test_the_layer_writes_into_out_when_given_one(T, B, lengths):
    rng = np.random.default_rng(T + B)
    I, H = 4, 6
    r = lambda *s: rng.standard_normal(s).astype(np.float32)   # noqa: E731
    args = (r(T, B, I), r(B, H), r(B, H), r(4 * H, I), r(4 * H, H), r(4 * H))
    bs = None if lengths is None else np.array([sum(n > t for n in lengths) for t in range(T)])
    want = K.lstm_layer_forward(*args, batch_sizes=bs)
    buf = np.full((T, B, H), 1e30, np.float32)      # a value no output has: unwritten shows
    got = K.lstm_layer_forward(*args, batch_sizes=bs, out=buf)
    assert got[0] is buf
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(g, w)
    dout = r(T, B, H)
    for g, w in zip(K.lstm_layer_backward(dout, None, None, got[3]),
                    K.lstm_layer_backward(dout, None, None, want[3])):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous .* array of float32, got"):
        K.lstm_layer_forward(*args, batch_sizes=bs, out=np.empty((T, B, H + 1), np.float32))


def test_a_layer_output_stays_while_the_next_layers_cache_reads_it():
    """Without dropout the second layer's cache holds the first layer's output as its x: keeping
    that cache alone (as a lesson looking inside one layer would) must keep the array from reuse."""
    T, B, I, H = 4, 3, 5, 5
    rng = np.random.default_rng(8)
    x, other = (rng.standard_normal((T, B, I)).astype(np.float32) for _ in range(2))
    lstm = LSTM(I, H, num_layers=2, seed=9)
    _, _, ctx = lstm(x, return_ctx=True)
    upper = ctx.saved["caches"][1][0]
    x_of_upper = upper["x"].copy()
    del ctx
    gc.collect()
    for _ in range(3):
        o, _ = lstm(other)
        lstm.backward(np.ones_like(o))
    np.testing.assert_array_equal(upper["x"], x_of_upper)


needs_counts = pytest.mark.skipif(scratch._ALONE is None, reason="no exact reference counts here")


@needs_counts
def test_a_held_array_is_reclaimed_only_when_nothing_else_refers_to_it():
    held = {}
    a = np.empty((3, 4))
    scratch.hold(held, "out", a)
    scratch.reclaim(held, "out")
    assert "out" in held                       # the caller still has it
    view = a[1:]
    del a
    scratch.reclaim(held, "out")
    assert "out" in held                       # a view of it is alive
    del view
    m = memoryview(held["out"])
    scratch.reclaim(held, "out")
    assert "out" in held                       # so is a buffer export
    del m
    scratch.reclaim(held, "out")
    assert "out" not in held                   # now only the pool has it
    assert scratch.take((3, 4), np.float64) is not None


@needs_counts
def test_an_output_the_caller_let_go_of_is_reused_and_one_it_keeps_is_not():
    """The module holds what it handed out; the next call reuses it only if the caller dropped it
    (and every view of it): kept outputs, dx and views keep their values."""
    T, B, I, H = 5, 3, 4, 6
    rng = np.random.default_rng(10)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(I, H, num_layers=2, seed=11)
    out, _ = lstm(x)
    dx, _ = lstm.backward(dy)
    gone_out, gone_dx = weakref.ref(out), weakref.ref(dx)
    del out, dx
    out2, _ = lstm(x + 1)
    dx2, _ = lstm.backward(dy)
    # reclaimed into the pool (and reused there), not freed: the module no longer holds them itself
    assert gone_out() is not None and gone_dx() is not None
    kept_out, kept_dx, tail = out2.copy(), dx2.copy(), out2[2:]
    del out2
    for _ in range(2):                                 # dx2 kept, out2 only through a view
        o, _ = lstm(x - 1)
        lstm.backward(dy)
    np.testing.assert_array_equal(tail, kept_out[2:])
    np.testing.assert_array_equal(dx2, kept_dx)
    with lstmkit_no_grad():                            # inference hands out and reclaims the same way
        a, _ = lstm(x)
        first = a.copy()
        b, _ = lstm(x - 2)
    np.testing.assert_array_equal(a, first)
    assert b is not a


@needs_counts
def test_an_output_fed_back_as_the_next_input_is_not_reclaimed_under_it():
    """lstm(lstm(x)[0]): the inner output is referenced only by the call that reads it; the outer
    call must not hand its memory to its own layers while reading it."""
    T, B, H = 4, 3, 5
    x = np.random.default_rng(12).standard_normal((T, B, H)).astype(np.float32)
    lstm = LSTM(H, H, num_layers=2, seed=13)
    got, _ = lstm(lstm(x)[0])
    ref = LSTM(H, H, num_layers=2, seed=13)
    inner = ref(x)[0].copy()
    want, _ = ref(inner)
    np.testing.assert_array_equal(got, want)
    with lstmkit_no_grad():
        got, _ = lstm(lstm(x)[0])
    np.testing.assert_array_equal(got, want)


def test_a_cache_dying_while_the_pool_is_busy_in_the_same_thread_does_not_deadlock():
    """A collection set off by an allocation inside take() or give() can run give_when_gone's
    finalizer in the thread that holds the pool's lock (seen as a CI run hanging): it must go on."""
    done = []

    def body():
        arr = np.empty((2, 3), np.float32)
        with scratch._lock:                      # as inside take() or give()
            c = scratch.Cache()
            scratch.give_when_gone(c, arr)
            del c                                # its finalizer runs here, lock held
        done.append(scratch.take((2, 3), np.float32) is arr)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(10)
    assert done == [True], "the finalizer's give() blocked on the pool's lock"


def test_taken_arrays_start_on_a_cache_line_and_come_back_through_reshapes_and_base():
    """take() hands out arrays that start on a 64-byte line (views of a larger byte buffer, since
    NumPy cannot own memory it did not allocate); give() keeps one given as itself, as a whole-array
    reshape or as its .base (what the layers give), and refuses a view of part of it."""
    a = scratch.take((7, 13), np.float32)
    assert a.ctypes.data % scratch.LINE == 0 and a.shape == (7, 13) and a.dtype == np.float32
    scratch.give(a.reshape(13, 7).base)                   # the byte buffer under it
    assert scratch.take((7, 13), np.float32) is a
    scratch.give(a.reshape(91))                           # a reshape covering all of it
    assert scratch.take((7, 13), np.float32) is a
    scratch.give(a[1:])                                   # part of it: never kept
    scratch.give(a.reshape(91)[:90])
    assert scratch.take((7, 13), np.float32) is not a
    b = scratch.take((5, 3), np.float64)
    r = b.reshape(15)
    del b                                                 # the first view is gone, a reshape lives
    scratch.give(r)
    again = scratch.take((5, 3), np.float64)
    assert again.shape == (5, 3) and np.shares_memory(again, r)


@needs_counts
def test_an_aligned_held_array_is_not_reclaimed_while_the_caller_has_a_view_of_it():
    """A view the caller made of an aligned array holds the byte buffer under it, not the array
    itself: reclaim must see that reference too."""
    held = {}
    a = scratch.take((4, 6), np.float32)
    scratch.hold(held, "out", a)
    assert "out" in held
    view = a[1:]
    del a
    scratch.reclaim(held, "out")
    assert "out" in held                       # only the view refers to its memory now
    del view
    scratch.reclaim(held, "out")
    assert "out" not in held
