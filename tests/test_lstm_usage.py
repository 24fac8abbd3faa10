"""How users combine the layer: chaining calls through their states, gradient accumulation,
torch tensors as weights, and the PyTorch tutorial's example.

Shape letters: L sequence length, N batch, I input size, H hidden size.
"""

import numpy as np
import torch

from lstmkit import LSTM, RNN, LSTMCell


def test_two_chained_calls_equal_one_call_forward_and_backward(backend):
    L1, L2, N, I, H = 3, 4, 2, 3, 5
    kw = dict(num_layers=2, bidirectional=False, proj_size=3, dtype=np.float64, seed=0)
    whole, first, second = LSTM(I, H, **kw), LSTM(I, H, **kw), LSTM(I, H, **kw)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((L1 + L2, N, I))
    out, (h_n, c_n) = whole(x)
    out1, state1 = first(x[:L1])
    out2, (h2, c2) = second(x[L1:], state1)
    np.testing.assert_allclose(np.concatenate([out1, out2]), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h2, h_n, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c2, c_n, rtol=1e-12, atol=1e-12)

    g_out, g_h, g_c = rng.standard_normal(out.shape), rng.standard_normal(h_n.shape), rng.standard_normal(c_n.shape)
    dx, (dh0, dc0) = whole.backward(g_out, (g_h, g_c))
    dx2, (dh_mid, dc_mid) = second.backward(g_out[L1:], (g_h, g_c))
    dx1, (dh0_, dc0_) = first.backward(g_out[:L1], (dh_mid, dc_mid))
    np.testing.assert_allclose(np.concatenate([dx1, dx2]), dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh0_, dh0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dc0_, dc0, rtol=1e-10, atol=1e-12)
    for name in whole.grads:
        np.testing.assert_allclose(first.grads[name] + second.grads[name], whole.grads[name],
                                   rtol=1e-10, atol=1e-12, err_msg=name)


def test_gradients_accumulate_until_zero_grad(backend):
    rnn = RNN(3, 4, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _ = rnn(x)
    rnn.backward(np.ones_like(out))
    once = {k: v.copy() for k, v in rnn.grads.items()}
    rnn(x)
    rnn.backward(np.ones_like(out))
    for k in once:
        np.testing.assert_allclose(rnn.grads[k], 2 * once[k])
    rnn.zero_grad()
    assert all(not g.any() for g in rnn.grads.values())


def test_torch_weights_move_in_and_out():
    theirs = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True)
    ours = LSTM(4, 6, num_layers=2, batch_first=True)
    ours.load_state_dict({k: v.detach() for k, v in theirs.state_dict().items()})  # tensors taken as they are
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    out, _ = ours(x)
    with torch.no_grad():
        t_out, _ = theirs(torch.from_numpy(x))
    np.testing.assert_allclose(out, t_out.numpy(), rtol=1e-5, atol=1e-6)


def test_pytorch_tutorial_example_shapes():
    # The PyTorch tutorial this project grows from: 3-layer bidirectional LSTM with projection.
    lstm = LSTM(128, 256, num_layers=3, batch_first=True, bidirectional=True, proj_size=64, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 128)).astype(np.float32)
    h0 = rng.standard_normal((6, 4, 64)).astype(np.float32)
    c0 = rng.standard_normal((6, 4, 256)).astype(np.float32)
    output, (h_n, c_n) = lstm(x, (h0, c0))
    assert output.shape == (4, 6, 128)
    assert h_n.shape == (6, 4, 64)
    assert c_n.shape == (6, 4, 256)
    assert output.dtype == h_n.dtype == c_n.dtype == np.float32
    dx, (dh0, dc0) = lstm.backward(np.ones_like(output))
    assert dx.shape == x.shape and dh0.shape == h0.shape and dc0.shape == c0.shape


def test_backward_uses_the_backend_its_forward_ran_on(monkeypatch):
    # Caches differ between the reference and the fused kernels: a backward must not pick the
    # backend afresh when LSTMKIT_REFERENCE changes between the two calls.
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    grads = []
    for forward_env, backward_env in (("1", "1"), ("0", "1"), ("1", "0")):
        lstm = LSTM(3, 5, num_layers=2, proj_size=2, dtype=np.float64, seed=0)
        cell = LSTMCell(3, 5, dtype=np.float64, seed=0)
        rnn = RNN(3, 5, dtype=np.float64, seed=0)
        monkeypatch.setenv("LSTMKIT_REFERENCE", forward_env)
        out, _ = lstm(x)
        h, _ = cell(x[0])
        r, _ = rnn(x)
        monkeypatch.setenv("LSTMKIT_REFERENCE", backward_env)
        dx, _ = lstm.backward(np.ones_like(out))
        dxc, _ = cell.backward((np.ones_like(h), None))
        dxr, _ = rnn.backward(np.ones_like(r))
        grads.append((dx, dxc, dxr))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
