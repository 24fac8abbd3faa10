"""Optimizers step for step against torch.optim, clipping against torch.nn.utils, the lr decay, and
optimizer state surviving a save/load."""

import numpy as np
import pytest
import torch

from lstmkit.optim import (SGD, Adagrad, Adam, RMSprop, clip_grad_norm, clip_grad_value, decayed_lr, global_norm,
                           make_optimizer)

CASES = [
    (lambda p: SGD(p, 0.1), lambda t: torch.optim.SGD(t, lr=0.1)),
    (lambda p: SGD(p, 0.1, momentum=0.9), lambda t: torch.optim.SGD(t, lr=0.1, momentum=0.9)),
    (lambda p: Adagrad(p, 0.1), lambda t: torch.optim.Adagrad(t, lr=0.1)),
    (lambda p: RMSprop(p, 0.01), lambda t: torch.optim.RMSprop(t, lr=0.01)),
    (lambda p: Adam(p, 0.01), lambda t: torch.optim.Adam(t, lr=0.01)),
]


@pytest.mark.parametrize("ours,theirs", CASES, ids=["sgd", "sgd-momentum", "adagrad", "rmsprop", "adam"])
def test_matches_torch_optim(ours, theirs):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tparams = [torch.tensor(params[k].copy(), requires_grad=True) for k in ("a", "b")]
    opt, topt = ours(params), theirs(tparams)
    for _ in range(6):
        grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
        for tp, k in zip(tparams, ("a", "b")):
            tp.grad = torch.from_numpy(grads[k].copy())
        opt.step(grads)
        topt.step()
    for tp, k in zip(tparams, ("a", "b")):
        np.testing.assert_allclose(params[k], tp.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_state_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    p1 = {"w": rng.standard_normal(4)}
    p2 = {"w": p1["w"].copy()}
    a = Adam(p1, 0.05)
    grads = [{"w": rng.standard_normal(4)} for _ in range(6)]
    for g in grads[:3]:
        a.step(g)
    b = Adam(p2, 0.05)
    p2["w"][...] = p1["w"]
    b.load_state({k: v.copy() for k, v in a.state_arrays().items()}, a.state_meta())
    for g in grads[3:]:
        a.step(g)
        b.step(g)
    np.testing.assert_array_equal(p1["w"], p2["w"])
    with pytest.raises(ValueError, match="adam"):
        SGD(p2, 0.1).load_state({}, a.state_meta())


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((3, 3)) * 4, "b": rng.standard_normal(7) * 4}
    ts = [torch.tensor(grads[k].copy(), requires_grad=True) for k in ("a", "b")]
    for t, k in zip(ts, ("a", "b")):
        t.grad = torch.from_numpy(grads[k].copy())
    norm = clip_grad_norm(grads, 1.5)
    tnorm = torch.nn.utils.clip_grad_norm_(ts, 1.5)
    assert norm == pytest.approx(tnorm.item(), rel=1e-12)
    for t, k in zip(ts, ("a", "b")):
        np.testing.assert_allclose(grads[k], t.grad.numpy(), rtol=1e-10)
    assert global_norm(grads) == pytest.approx(1.5, rel=1e-6)
    small = {"a": np.full(3, 0.1)}
    clip_grad_norm(small, 1.5)
    np.testing.assert_array_equal(small["a"], np.full(3, 0.1))      # below the limit: untouched


def test_clip_grad_value():
    g = {"a": np.array([-9.0, -1.0, 0.5, 7.0])}
    clip_grad_value(g, 5.0)
    np.testing.assert_array_equal(g["a"], [-5.0, -1.0, 0.5, 5.0])


def test_decayed_lr():
    assert decayed_lr(0.1, 0, 0.5, 10) == 0.1
    assert decayed_lr(0.1, 9, 0.5, 10) == 0.1
    assert decayed_lr(0.1, 25, 0.5, 10) == pytest.approx(0.025)


def test_bad_lr_and_name():
    with pytest.raises(ValueError, match="learning rate"):
        Adam({"w": np.zeros(1)}, 0.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("lbfgs", {"w": np.zeros(1)}, 0.1)


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: Adam(p, 0.01, betas=(0.8, 0.99), weight_decay=0.1),
     lambda w, b: torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                                    lr=0.01, betas=(0.8, 0.99))),
    (lambda p: SGD(p, 0.1, momentum=0.9, weight_decay=0.1),
     lambda w, b: torch.optim.SGD([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                                  lr=0.1, momentum=0.9)),
    (lambda p: RMSprop(p, 0.01, weight_decay=0.1),
     lambda w, b: torch.optim.RMSprop([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                                      lr=0.01)),
], ids=["adamw-betas", "sgd-l2", "rmsprop-l2"])
def test_weight_decay_matches_torch_on_matrices_and_spares_biases(ours, theirs):
    rng = np.random.default_rng(2)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tw, tb = (torch.tensor(params[k].copy(), requires_grad=True) for k in ("w", "b"))
    opt, topt = ours(params), theirs(tw, tb)
    for _ in range(5):
        grads = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
        tw.grad, tb.grad = torch.from_numpy(grads["w"].copy()), torch.from_numpy(grads["b"].copy())
        opt.step(grads)
        topt.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_schedules():
    from lstmkit.optim import scheduled_lr
    assert [scheduled_lr(1.0, t, "constant", warmup=4) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert scheduled_lr(0.1, 25, "step", decay=0.5, every=10) == pytest.approx(0.025)
    assert scheduled_lr(1.0, 10, "cosine", progress=0.0, min_lr=0.1) == pytest.approx(1.0)
    assert scheduled_lr(1.0, 10, "cosine", progress=0.5, min_lr=0.1) == pytest.approx(0.55)
    assert scheduled_lr(1.0, 10, "cosine", progress=1.0, min_lr=0.1) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 10, "cosine", progress=2.0, min_lr=0.1) == pytest.approx(0.1)   # past the budget
    # torch's CosineAnnealingLR gives the same curve
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.1)
    for t in range(20):
        assert scheduled_lr(1.0, t, "cosine", progress=t / 20, min_lr=0.1) == pytest.approx(sched.get_last_lr()[0])
        opt.step()
        sched.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_fused_pass_equals_the_numpy_form(monkeypatch, dtype, weight_decay):
    """optim_fused's one-pass Adam against optim.Adam's readable NumPy lines, 5 steps: float64 to
    1e-12; float32 to a few ulps (the fused pass computes each element in float64, the NumPy form
    rounds after every operation)."""
    from lstmkit import optim_fused
    if not optim_fused.AVAILABLE:
        pytest.skip("Numba is not importable: there is no fused pass")
    rng = np.random.default_rng(3)
    shapes = {"w": (7, 5), "b": (5,), "e": (3, 4, 2)}
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(5)]

    def run(fused):
        if not fused:
            monkeypatch.setattr(optim_fused, "adam_update", lambda *a: False)
        params = {k: v.copy() for k, v in start.items()}
        opt = Adam(params, lr=0.01, weight_decay=weight_decay)
        for g in grads:
            opt.step({k: v.copy() for k, v in g.items()})
        monkeypatch.undo()
        return params, opt.state

    (p1, s1), (p2, s2) = run(True), run(False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-7)
    for k in shapes:
        np.testing.assert_allclose(p1[k], p2[k], **tol)
        for slot in s1:
            np.testing.assert_allclose(s1[slot][k], s2[slot][k], **tol)
    assert not np.array_equal(p1["w"], start["w"])


def test_adam_fused_pass_counts_as_a_write_to_a_module_parameter():
    """The fused pass writes through memory NumPy does not see; a module's arrays derived from a
    weight (W_hh^T for the time loops) must still follow the update, or the next forward would run
    on the old weights."""
    from lstmkit import LSTM
    lstm = LSTM(3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    y0, _ = lstm(x)
    lstm.backward(np.ones_like(y0))
    opt = Adam(dict(lstm.named_parameters()), lr=0.1)
    opt.step(lstm.grads)
    y1, _ = lstm(x)
    fresh = LSTM(3, 4, seed=1)
    fresh.load_state_dict(lstm.state_dict())
    y2, _ = fresh(x)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y0, y1)
