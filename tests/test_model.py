"""The language model's own layers (embedding, linear, softmax cross-entropy) by central differences in
float64, the whole model against a PyTorch twin with the same weights, and an overfit test.

Shape letters: V vocabulary, E embedding size, H hidden size, T time steps, B batch, N = T*B.
"""

import numpy as np
import pytest
import torch

from lstmkit.model import (LanguageModel, embedding_backward, embedding_forward, linear_backward, linear_forward,
                           softmax_cross_entropy_backward, softmax_cross_entropy_forward)
from lstmkit.optim import Adam
from oracle import numerical_grad


def test_softmax_cross_entropy_gradcheck():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((7, 5)) * 3
    y = rng.integers(0, 5, 7)
    loss, cache = softmax_cross_entropy_forward(z, y)
    dz = softmax_cross_entropy_backward(cache)
    num = numerical_grad(lambda: softmax_cross_entropy_forward(z, y)[0], z)
    np.testing.assert_allclose(dz, num, rtol=1e-6, atol=1e-9)
    # the loss itself: -mean log softmax
    ref = -np.mean(np.log(np.exp(z)[np.arange(7), y] / np.exp(z).sum(1)))
    assert loss == pytest.approx(ref, rel=1e-12)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0]])
    loss, cache = softmax_cross_entropy_forward(z, np.array([0]))
    assert loss == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(softmax_cross_entropy_backward(cache)).all()


def test_embedding_gradcheck_with_repeated_ids():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 3))
    ids = np.array([[0, 2], [2, 5], [2, 0]])      # id 2 three times, id 0 twice, ids 1, 3, 4 never
    w_out = rng.standard_normal((3, 2, 3))       # loss = sum(w_out * x)
    x, cache = embedding_forward(ids, W)
    dW = embedding_backward(w_out, cache)
    num = numerical_grad(lambda: float(np.sum(w_out * embedding_forward(ids, W)[0])), W)
    np.testing.assert_allclose(dW, num, rtol=1e-6, atol=1e-9)
    assert np.all(dW[[1, 3, 4]] == 0)


def test_linear_gradcheck():
    rng = np.random.default_rng(2)
    x, W, b = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal(5)
    w_out = rng.standard_normal((4, 5))
    z, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(w_out, cache)
    f = lambda: float(np.sum(w_out * linear_forward(x, W, b)[0]))  # noqa: E731
    np.testing.assert_allclose(dx, numerical_grad(f, x), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dW, numerical_grad(f, W), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(db, numerical_grad(f, b), rtol=1e-6, atol=1e-9)


def test_whole_model_gradcheck_float64():
    m = LanguageModel(7, hidden_size=4, num_layers=2, embed_size=3, seed=3, dtype=np.float64)
    rng = np.random.default_rng(4)
    ids, y = rng.integers(0, 7, (5, 2)), rng.integers(0, 7, (5, 2))
    state = tuple(rng.standard_normal((2, 2, 4)) * 0.5 for _ in range(2))
    m.zero_grad()
    m.loss(ids, y, state)
    m.backward()
    for name in ("embedding.weight", "decoder.weight", "decoder.bias", "lstm.weight_hh_l1", "lstm.bias_ih_l0"):
        num = numerical_grad(lambda: m.loss(ids, y, state)[0], m.params[name])
        np.testing.assert_allclose(m.grads[name], num, rtol=1e-5, atol=1e-8, err_msg=name)


class TorchLM(torch.nn.Module):
    def __init__(self, V, E, H, L):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, E)
        self.lstm = torch.nn.LSTM(E, H, L)
        self.decoder = torch.nn.Linear(H, V)

    def forward(self, ids, state):
        out, state = self.lstm(self.embedding(ids), state)
        return self.decoder(out), state


def torch_twin(m: LanguageModel):
    t = TorchLM(m.vocab_size, m.embed_size, m.hidden_size, m.num_layers).double()
    t.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in m.params.items()})
    return t


def test_model_matches_torch_loss_and_every_gradient():
    m = LanguageModel(11, hidden_size=6, num_layers=2, embed_size=5, seed=5, dtype=np.float64)
    t = torch_twin(m)
    rng = np.random.default_rng(6)
    ids, y = rng.integers(0, 11, (7, 3)), rng.integers(0, 11, (7, 3))
    m.zero_grad()
    loss, (h, c) = m.loss(ids, y)
    m.backward()
    z, (th, tc) = t(torch.from_numpy(ids), None)
    tl = torch.nn.functional.cross_entropy(z.reshape(-1, 11), torch.from_numpy(y).reshape(-1))
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-12)
    np.testing.assert_allclose(h, th.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(c, tc.detach().numpy(), atol=1e-12)
    for k, p in t.named_parameters():
        np.testing.assert_allclose(m.grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def test_grads_accumulate_until_zero_grad():
    m = LanguageModel(5, hidden_size=3, seed=0, dtype=np.float64)
    ids, y = np.array([[0], [1], [2]]), np.array([[1], [2], [3]])
    m.zero_grad()
    m.loss(ids, y)
    m.backward()
    once = {k: g.copy() for k, g in m.grads.items()}
    m.loss(ids, y)
    m.backward()
    for k in once:
        np.testing.assert_allclose(m.grads[k], 2 * once[k], err_msg=k)
    m.zero_grad()
    assert all(not g.any() for g in m.grads.values())


def test_same_seed_same_model_and_different_seed_differs():
    a, b, c = (LanguageModel(9, 4, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["lstm.weight_ih_l0"], c.params["lstm.weight_ih_l0"])
    assert a.params["embedding.weight"].dtype == np.float32


def test_backward_before_loss_is_a_clear_error():
    with pytest.raises(RuntimeError, match="before loss"):
        LanguageModel(3, 2, seed=0).backward()


def test_forward_exposes_lstm_caches_for_the_lessons():
    m = LanguageModel(6, hidden_size=4, num_layers=2, seed=0)
    logits, (h, c), cache = m.forward(np.zeros((5, 2), dtype=np.int64))
    assert logits.shape == (5, 2, 6) and h.shape == (2, 2, 4)
    assert len(cache["lstm"]) == 2
    assert cache["lstm"][1][0]["gates"].shape == (5, 2, 16)
    assert cache["lstm"][1][0]["c"].shape == (5, 2, 4)


def test_overfits_a_short_text():
    """A short text is learned to near-zero loss: the whole chain learns, not just runs."""
    text = "hello world, the lstm remembers. "
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text])
    x, y = ids[:-1, None], ids[1:, None]                      # (T, 1)
    m = LanguageModel(len(vocab), hidden_size=32, seed=0)
    opt = Adam(m.params, lr=0.02)
    for _ in range(150):
        m.zero_grad()
        loss, _ = m.loss(x, y)
        m.backward()
        opt.step(m.grads)
    assert loss < 0.05, loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("id_dtype", [np.int64, np.int32])
def test_embedding_backward_fused_rows_equal_np_add_at(dtype, id_dtype):
    """embedding_fused's compiled loop against np.add.at (the readable form it replaces), with ids
    repeated many times and some never used: the same sums, element for element."""
    from lstmkit import embedding_fused
    if not embedding_fused.AVAILABLE:
        pytest.skip("Numba is not importable: there is no fused loop")
    rng = np.random.default_rng(5)
    V, E = 11, 7
    ids = rng.integers(0, 6, size=(9, 4)).astype(id_dtype)          # ids 6..10 never used
    dx = rng.standard_normal((9, 4, E)).astype(dtype)
    want = np.zeros((V, E), dtype)
    np.add.at(want, ids.reshape(-1), dx.reshape(-1, E))
    got = embedding_backward(dx, {"ids": ids, "V": V})
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0)
    assert not got[6:].any() and got[:6].any()


def _readable_cross_entropy(monkeypatch, z, y):
    """The readable NumPy form of the loss and its gradient (softmax_fused switched off)."""
    from lstmkit import softmax_fused
    with monkeypatch.context() as m:
        m.setattr(softmax_fused, "AVAILABLE", False)
        loss, cache = softmax_cross_entropy_forward(z, y)
        assert "p" in cache                         # the readable path did run
        return loss, softmax_cross_entropy_backward(cache)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_fused_equals_readable_and_torch(monkeypatch, dtype):
    """softmax_fused's one-pass loss and gradient against the readable NumPy passes and against
    torch's cross_entropy, at the main job's vocabulary with logits spread over a wide range
    (rows of very different scale, a target that is the row's maximum and one far below it)."""
    from lstmkit import softmax_fused
    if not softmax_fused.AVAILABLE:
        pytest.skip("Numba is not importable: there is no fused loop")
    rng = np.random.default_rng(6)
    N, V = 37, 1669
    z = (rng.standard_normal((N, V)) * rng.uniform(0.1, 30, (N, 1))).astype(dtype)
    y = rng.integers(0, V, N)
    y[0] = z[0].argmax()
    y[1] = z[1].argmin()
    z_before = z.copy()
    loss, cache = softmax_cross_entropy_forward(z, y)
    assert "dz" in cache and np.array_equal(z, z_before)          # the fast path ran; z kept
    dz = softmax_cross_entropy_backward(cache)
    want_loss, want_dz = _readable_cross_entropy(monkeypatch, z, y)
    tol = dict(rtol=2e-5, atol=1e-9) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-17)
    assert loss == pytest.approx(want_loss, rel=tol["rtol"])
    np.testing.assert_allclose(dz, want_dz, **tol)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(y))
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=tol["rtol"])
    np.testing.assert_allclose(dz, zt.grad.numpy(), **tol)
    # each row of dz sums to 0 (softmax sums to 1, minus the one-hot)
    np.testing.assert_allclose(dz.astype(np.float64).sum(axis=1), 0, atol=10 * np.finfo(dtype).eps / N)


def test_softmax_cross_entropy_fused_overwrite_and_bad_targets():
    """overwrite=True writes the gradient over the logits (what the language model asks: its
    logits are its own); a target outside 0..V-1 is an IndexError naming it, on either path."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((5, 9)).astype(np.float32)
    y = np.array([0, 8, 3, 3, 1])
    loss, cache = softmax_cross_entropy_forward(z.copy(), y)
    z2 = z.copy()
    loss2, cache2 = softmax_cross_entropy_forward(z2, y, overwrite=True)
    dz2 = softmax_cross_entropy_backward(cache2)
    assert loss2 == loss
    np.testing.assert_array_equal(dz2, softmax_cross_entropy_backward(cache))
    if "dz" in cache2:
        assert dz2 is z2
    with pytest.raises(IndexError, match="target 9 is out of range: the logits have 9 classes"):
        softmax_cross_entropy_forward(z.copy(), np.array([0, 9, 3, 3, 1]))
    with pytest.raises(IndexError, match="target -6"):           # not wrapped round as NumPy would
        softmax_cross_entropy_forward(z.copy(), np.array([0, -6, 3, 3, 1]))


def test_float32_exp_accuracy():
    """jit._exp (the softmax's vectorised float32 exp) within 2 ulps of float64 exp over the
    float32 range, finite and >= 0 beyond it (clamped, never inf or NaN)."""
    from lstmkit import jit
    if not jit.AVAILABLE:
        pytest.skip("Numba is not importable")

    @jit.njit(cache=False, fastmath=True)
    def run(x, out):
        for k in range(x.shape[0]):
            out[k] = jit._exp(x[k])

    x = np.concatenate([np.linspace(-87, 88, 400001), [-1e30, -100.0, 0.0, 100.0, 1e30]]).astype(np.float32)
    got = np.empty_like(x)
    run(x, got)
    want = np.exp(x[:-5].astype(np.float64))
    np.testing.assert_allclose(got[:-5], want, rtol=2 * np.finfo(np.float32).eps, atol=0)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    assert got[-5] < 1e-37 and got[-3] == 1.0 and got[-1] > 1e38
