"""The sequence classifier (classifier.py) against the same model written in PyTorch: embedding,
torch.nn.LSTM/GRU/RNN over pack_padded_sequence, the same pooling, a linear head, cross-entropy;
values and every gradient in float64, for each cell, pooling, direction and depth. Plus central
differences through the pooling and the checkpoint round trip.

Shape letters: T longest sequence, B batch, E embedding, H hidden, D directions, C classes.
"""

import numpy as np
import pytest
import torch

from lstmkit.classifier import SequenceClassifier, pool_backward, pool_forward

V, C, E, H = 17, 3, 5, 4
LENGTHS = (6, 2, 1, 4, 6)


def torch_twin(m):
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[m.cell]
    rnn = cls(m.embed_size, m.hidden_size, m.num_layers, bidirectional=m.bidirectional, dtype=torch.float64)
    rnn.load_state_dict({k[4:]: torch.from_numpy(v.copy()) for k, v in m.params.items() if k.startswith("rnn.")})
    emb = torch.nn.Parameter(torch.from_numpy(m.embedding.copy()))
    W = torch.nn.Parameter(torch.from_numpy(m.head_weight.copy()))
    b = torch.nn.Parameter(torch.from_numpy(m.head_bias.copy()))
    return rnn, emb, W, b


def torch_loss(m, twin, seqs, labels):
    rnn, emb, W, b = twin
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max())
    ids = torch.zeros((T, len(seqs)), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[:len(s), j] = torch.from_numpy(s)
    packed = torch.nn.utils.rnn.pack_padded_sequence(emb[ids], lengths, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)       # (T, B, D*H)
    valid = (torch.arange(T)[:, None] < lengths[None, :])[:, :, None]
    if m.pool == "max":
        v = out.masked_fill(~valid, -torch.inf).max(dim=0).values
    elif m.pool == "mean":
        v = out.sum(dim=0) / lengths[:, None]
    else:
        v = out[lengths - 1, torch.arange(len(seqs))]
        if m.bidirectional:
            v = torch.cat([v[:, :m.hidden_size], out[0, :, m.hidden_size:]], dim=1)
    return torch.nn.functional.cross_entropy(v @ W.T + b, torch.from_numpy(labels))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("pool", ["last", "max", "mean"])
@pytest.mark.parametrize("bidirectional,layers", [(False, 1), (True, 2)])
def test_values_and_gradients_equal_torch(cell, pool, bidirectional, layers):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, V, n) for n in LENGTHS]
    labels = rng.integers(0, C, len(seqs))
    m = SequenceClassifier(V, C, cell, H, layers, bidirectional, 0.0, E, pool, seed=1, dtype=np.float64)
    twin = torch_twin(m)
    m.zero_grad()
    loss = m.loss(seqs, labels)
    m.backward()
    tl = torch_loss(m, twin, seqs, labels)
    tl.backward()
    assert loss == pytest.approx(tl.item(), abs=1e-12)
    rnn, emb, W, b = twin
    theirs = {"embedding.weight": emb.grad, "head.weight": W.grad, "head.bias": b.grad}
    theirs.update({"rnn." + k: p.grad for k, p in rnn.named_parameters()})
    assert set(theirs) == set(m.grads)
    for k, g in theirs.items():
        np.testing.assert_allclose(m.grads[k], g.numpy(), rtol=1e-9, atol=1e-11, err_msg=k)
    logits, _ = m.forward(seqs)
    z = logits - logits.max(axis=1, keepdims=True)
    np.testing.assert_allclose(m.predict_proba(seqs), np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("mode,D", [("last", 1), ("last", 2), ("max", 2), ("mean", 1)])
def test_pooling_backward_by_central_differences(mode, D):
    rng = np.random.default_rng(3)
    lengths = np.array([4, 1, 3])
    out = rng.standard_normal((4, 3, 2 * D))
    out *= (np.arange(4)[:, None] < lengths[None, :])[:, :, None]          # zeros past each length
    w = rng.standard_normal((3, 2 * D))
    v, cache = pool_forward(out, lengths, mode, D)
    dout = pool_backward(w, cache)
    eps = 1e-6
    for idx in np.ndindex(out.shape):
        if idx[0] >= lengths[idx[1]]:
            assert dout[idx] == 0.0                                          # padding gets nothing
            continue
        plus, minus = out.copy(), out.copy()
        plus[idx] += eps
        minus[idx] -= eps
        num = ((pool_forward(plus, lengths, mode, D)[0] - pool_forward(minus, lengths, mode, D)[0]) * w).sum() / (2 * eps)
        assert dout[idx] == pytest.approx(num, abs=1e-7), idx


def test_dropout_on_the_pooled_features_only_in_training():
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, V, n) for n in LENGTHS]
    m = SequenceClassifier(V, C, "lstm", H, 1, True, 0.5, E, "max", seed=2, dtype=np.float64)
    a = m.predict_proba(seqs)
    np.testing.assert_array_equal(a, m.predict_proba(seqs))                 # eval: deterministic
    m.train()
    z1, _ = m.forward(seqs)
    z2, _ = m.forward(seqs)
    assert not np.allclose(z1, z2)                                           # training: masks differ


def test_checkpoint_round_trip(tmp_path):
    from lstmkit.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from lstmkit.checkpoint import CheckpointError
    from lstmkit.tokenizers import build_tokenizer
    tok = build_tokenizer("char", "abcdefghijklmnop", unknown=True)
    m = SequenceClassifier(tok.vocab_size, 2, "gru", 6, 2, True, 0.0, 5, "last", seed=4)
    save_checkpoint(str(tmp_path / "run"), model=m, tokenizer=tok, config={"classes": ["neg", "pos"]},
                    run_id="r", step=0)
    ck = read_checkpoint(str(tmp_path / "run"), format=SequenceClassifier.FORMAT)
    assert ck["config"]["classes"] == ["neg", "pos"] and ck["tokenizer"].unk_id == tok.unk_id
    for k, p in m.params.items():
        np.testing.assert_array_equal(ck["model"].params[k], p, err_msg=k)
    with pytest.raises(CheckpointError, match="holds a classifier"):
        load_checkpoint(str(tmp_path / "run"))                                # as a language model
    # torch's own GRU takes the saved RNN file as it is
    from safetensors.torch import load_file
    twin = torch.nn.GRU(5, 6, 2, bidirectional=True)
    twin.load_state_dict(load_file(str(tmp_path / "run" / ck["dir"].split("/")[-1] / "rnn.safetensors")))
