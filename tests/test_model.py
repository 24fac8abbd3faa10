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
