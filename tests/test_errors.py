"""Bad input: the same exception type as torch.nn, and a message naming what was expected and given.

Each case runs in torch first (the oracle for the type), then in lstmkit.
"""

import warnings

import numpy as np
import pytest
import torch

from lstmkit import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell


def torch_raises(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - we want whatever torch raises
            return type(e)
    return None


def z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


# (id, lstmkit call, torch call, words the message must contain)
CONSTRUCTOR_CASES = [
    ("negative input_size", lambda: LSTM(-1, 5), lambda: torch.nn.LSTM(-1, 5), ["input_size"]),
    ("zero hidden_size", lambda: LSTM(3, 0), lambda: torch.nn.LSTM(3, 0), ["hidden_size"]),
    ("negative hidden_size", lambda: LSTM(3, -5), lambda: torch.nn.LSTM(3, -5), ["hidden_size"]),
    ("float hidden_size", lambda: LSTM(3, 5.0), lambda: torch.nn.LSTM(3, 5.0), ["hidden_size", "float"]),
    ("zero num_layers", lambda: LSTM(3, 5, num_layers=0), lambda: torch.nn.LSTM(3, 5, num_layers=0),
     ["num_layers"]),
    ("negative proj_size", lambda: LSTM(3, 5, proj_size=-1), lambda: torch.nn.LSTM(3, 5, proj_size=-1),
     ["proj_size", "-1"]),
    ("proj_size >= hidden_size", lambda: LSTM(3, 5, proj_size=5), lambda: torch.nn.LSTM(3, 5, proj_size=5),
     ["proj_size", "hidden_size", "5"]),
    ("dropout > 1", lambda: LSTM(3, 5, num_layers=2, dropout=1.5),
     lambda: torch.nn.LSTM(3, 5, num_layers=2, dropout=1.5), ["dropout", "1.5"]),
    ("dropout < 0", lambda: LSTM(3, 5, num_layers=2, dropout=-0.1),
     lambda: torch.nn.LSTM(3, 5, num_layers=2, dropout=-0.1), ["dropout", "-0.1"]),
    ("dropout bool", lambda: LSTM(3, 5, num_layers=2, dropout=True),
     lambda: torch.nn.LSTM(3, 5, num_layers=2, dropout=True), ["dropout", "True"]),
    ("RNN nonlinearity", lambda: RNN(3, 5, nonlinearity="sigmoid"),
     lambda: torch.nn.RNN(3, 5, nonlinearity="sigmoid"), ["sigmoid", "tanh", "relu"]),
    ("LSTMCell negative hidden", lambda: LSTMCell(3, -5), lambda: torch.nn.LSTMCell(3, -5), ["hidden_size"]),
    ("RNNCell negative input", lambda: RNNCell(-3, 5), lambda: torch.nn.RNNCell(-3, 5), ["input_size"]),
    ("GRU zero hidden_size", lambda: GRU(3, 0), lambda: torch.nn.GRU(3, 0), ["hidden_size"]),
    ("GRU negative input_size", lambda: GRU(-3, 5), lambda: torch.nn.GRU(-3, 5), ["input_size"]),
    ("GRU float hidden_size", lambda: GRU(3, 5.0), lambda: torch.nn.GRU(3, 5.0), ["hidden_size", "float"]),
    ("GRU zero num_layers", lambda: GRU(3, 5, num_layers=0), lambda: torch.nn.GRU(3, 5, num_layers=0),
     ["num_layers"]),
    ("GRU dropout > 1", lambda: GRU(3, 5, num_layers=2, dropout=1.5),
     lambda: torch.nn.GRU(3, 5, num_layers=2, dropout=1.5), ["dropout", "1.5"]),
    ("GRU proj_size", lambda: GRU(3, 5, proj_size=2), lambda: torch.nn.GRU(3, 5, proj_size=2),
     ["proj_size", "LSTM"]),
    ("GRU proj_size=0", lambda: GRU(3, 5, proj_size=0), lambda: torch.nn.GRU(3, 5, proj_size=0),
     ["proj_size", "LSTM"]),
    ("RNN proj_size", lambda: RNN(3, 5, proj_size=2), lambda: torch.nn.RNN(3, 5, proj_size=2),
     ["proj_size", "LSTM"]),
    ("GRUCell negative hidden", lambda: GRUCell(3, -5), lambda: torch.nn.GRUCell(3, -5), ["hidden_size"]),
]

lstm, tlstm = LSTM(3, 5, num_layers=2), torch.nn.LSTM(3, 5, num_layers=2)
rnn, trnn = RNN(3, 5), torch.nn.RNN(3, 5)
cell, tcell = LSTMCell(3, 5), torch.nn.LSTMCell(3, 5)
rcell, trcell = RNNCell(3, 5), torch.nn.RNNCell(3, 5)
gru, tgru = GRU(3, 5, num_layers=2), torch.nn.GRU(3, 5, num_layers=2)
gcell, tgcell = GRUCell(3, 5), torch.nn.GRUCell(3, 5)

FORWARD_CASES = [
    ("1-D input", lambda: lstm(z(3)), lambda: tlstm(t(3)), ["2D or 3D", "1D"]),
    ("4-D input", lambda: lstm(z(1, 2, 3, 3)), lambda: tlstm(t(1, 2, 3, 3)), ["2D or 3D", "4D"]),
    ("wrong input_size", lambda: lstm(z(4, 2, 7)), lambda: tlstm(t(4, 2, 7)), ["Expected 3", "got 7"]),
    ("wrong dtype", lambda: lstm(z(4, 2, 3, dtype=np.float64)),
     lambda: tlstm(t(4, 2, 3, dtype=torch.float64)), ["float64", "float32"]),
    ("integer input", lambda: lstm(np.zeros((4, 2, 3), dtype=np.int64)),
     lambda: tlstm(torch.zeros(4, 2, 3, dtype=torch.int64)), ["int64", "float32"]),
    ("empty sequence", lambda: lstm(z(0, 2, 3)), lambda: tlstm(t(0, 2, 3)), ["sequence length"]),
    ("h_0 wrong batch", lambda: lstm(z(4, 2, 3), (z(2, 3, 5), z(2, 2, 5))),
     lambda: tlstm(t(4, 2, 3), (t(2, 3, 5), t(2, 2, 5))), ["(2, 2, 5)", "[2, 3, 5]"]),
    ("c_0 wrong size", lambda: lstm(z(4, 2, 3), (z(2, 2, 5), z(2, 2, 4))),
     lambda: tlstm(t(4, 2, 3), (t(2, 2, 5), t(2, 2, 4))), ["(2, 2, 5)", "[2, 2, 4]"]),
    ("h_0 2-D for batched input", lambda: lstm(z(4, 2, 3), (z(2, 5), z(2, 5))),
     lambda: tlstm(t(4, 2, 3), (t(2, 5), t(2, 5))), ["3-D", "2-D"]),
    ("h_0 3-D for unbatched input", lambda: lstm(z(4, 3), (z(2, 1, 5), z(2, 1, 5))),
     lambda: tlstm(t(4, 3), (t(2, 1, 5), t(2, 1, 5))), ["2-D", "3-D"]),
    ("h_0 wrong dtype", lambda: lstm(z(4, 2, 3), (z(2, 2, 5, dtype=np.float64), z(2, 2, 5))),
     lambda: tlstm(t(4, 2, 3), (t(2, 2, 5, dtype=torch.float64), t(2, 2, 5))), ["float64", "float32"]),
    ("RNN h_0 wrong size", lambda: rnn(z(4, 2, 3), z(1, 3, 5)), lambda: trnn(t(4, 2, 3), t(1, 3, 5)),
     ["(1, 2, 5)", "[1, 3, 5]"]),
    ("RNN h_0 2-D for batched", lambda: rnn(z(4, 2, 3), z(1, 5)), lambda: trnn(t(4, 2, 3), t(1, 5)),
     ["3-D", "2-D"]),
    ("RNN 1-D input", lambda: rnn(z(3)), lambda: trnn(t(3)), ["2D or 3D", "1D"]),
    ("LSTMCell 3-D input", lambda: cell(z(1, 2, 3)), lambda: tcell(t(1, 2, 3)), ["1D or 2D", "3D"]),
    ("LSTMCell wrong input_size", lambda: cell(z(2, 7)), lambda: tcell(t(2, 7)), ["got 7", "expected 3"]),
    ("LSTMCell wrong hidden", lambda: cell(z(2, 3), (z(2, 4), z(2, 5))),
     lambda: tcell(t(2, 3), (t(2, 4), t(2, 5))), ["got 4", "expected 5"]),
    ("LSTMCell batch mismatch", lambda: cell(z(2, 3), (z(3, 5), z(3, 5))),
     lambda: tcell(t(2, 3), (t(3, 5), t(3, 5))), ["2", "3"]),
    ("LSTMCell 3-D hx", lambda: cell(z(2, 3), (z(1, 2, 5), z(1, 2, 5))),
     lambda: tcell(t(2, 3), (t(1, 2, 5), t(1, 2, 5))), ["1D or 2D", "3D"]),
    ("RNNCell wrong input_size", lambda: rcell(z(2, 7)), lambda: trcell(t(2, 7)), ["got 7", "expected 3"]),
    ("RNNCell wrong hidden", lambda: rcell(z(2, 3), z(2, 4)), lambda: trcell(t(2, 3), t(2, 4)),
     ["got 4", "expected 5"]),
    ("RNNCell 3-D input", lambda: rcell(z(1, 2, 3)), lambda: trcell(t(1, 2, 3)), ["1D or 2D", "3D"]),
    ("GRU 1-D input", lambda: gru(z(3)), lambda: tgru(t(3)), ["2D or 3D", "1D"]),
    ("GRU 4-D input", lambda: gru(z(1, 2, 3, 3)), lambda: tgru(t(1, 2, 3, 3)), ["2D or 3D", "4D"]),
    ("GRU wrong input_size", lambda: gru(z(4, 2, 7)), lambda: tgru(t(4, 2, 7)), ["Expected 3", "got 7"]),
    ("GRU wrong dtype", lambda: gru(z(4, 2, 3, dtype=np.float64)),
     lambda: tgru(t(4, 2, 3, dtype=torch.float64)), ["float64", "float32"]),
    ("GRU empty sequence", lambda: gru(z(0, 2, 3)), lambda: tgru(t(0, 2, 3)), ["sequence length"]),
    ("GRU h_0 wrong batch", lambda: gru(z(4, 2, 3), z(2, 3, 5)), lambda: tgru(t(4, 2, 3), t(2, 3, 5)),
     ["(2, 2, 5)", "[2, 3, 5]"]),
    ("GRU h_0 wrong layers", lambda: gru(z(4, 2, 3), z(1, 2, 5)), lambda: tgru(t(4, 2, 3), t(1, 2, 5)),
     ["(2, 2, 5)", "[1, 2, 5]"]),
    ("GRU h_0 2-D for batched", lambda: gru(z(4, 2, 3), z(2, 5)), lambda: tgru(t(4, 2, 3), t(2, 5)),
     ["3-D", "2-D"]),
    ("GRU h_0 3-D for unbatched", lambda: gru(z(4, 3), z(2, 1, 5)), lambda: tgru(t(4, 3), t(2, 1, 5)),
     ["2-D", "3-D"]),
    ("GRU h_0 wrong dtype", lambda: gru(z(4, 2, 3), z(2, 2, 5, dtype=np.float64)),
     lambda: tgru(t(4, 2, 3), t(2, 2, 5, dtype=torch.float64)), ["float64", "float32"]),
    ("GRUCell 3-D input", lambda: gcell(z(1, 2, 3)), lambda: tgcell(t(1, 2, 3)), ["1D or 2D", "3D"]),
    ("GRUCell 3-D hx", lambda: gcell(z(2, 3), z(1, 2, 5)), lambda: tgcell(t(2, 3), t(1, 2, 5)),
     ["1D or 2D", "3D"]),
    ("GRUCell wrong input_size", lambda: gcell(z(2, 7)), lambda: tgcell(t(2, 7)), ["got 7", "expected 3"]),
    ("GRUCell wrong hidden", lambda: gcell(z(2, 3), z(2, 4)), lambda: tgcell(t(2, 3), t(2, 4)),
     ["got 4", "expected 5"]),
    ("GRUCell batch mismatch", lambda: gcell(z(2, 3), z(3, 5)), lambda: tgcell(t(2, 3), t(3, 5)),
     ["2", "3"]),
    ("GRUCell 2-D hx for unbatched", lambda: gcell(z(3), z(1, 5)), lambda: tgcell(t(3), t(1, 5)),
     ["(5,)", "(1, 5)"]),
    ("GRUCell wrong dtype", lambda: gcell(z(2, 3, dtype=np.float64)),
     lambda: tgcell(t(2, 3, dtype=torch.float64)), ["float64", "float32"]),
    ("GRUCell hx wrong dtype", lambda: gcell(z(2, 3), z(2, 5, dtype=np.float64)),
     lambda: tgcell(t(2, 3), t(2, 5, dtype=torch.float64)), ["float64", "float32"]),
    ("LSTMCell wrong dtype", lambda: cell(z(2, 3, dtype=np.float64)),
     lambda: tcell(t(2, 3, dtype=torch.float64)), ["float64", "float32"]),
]


@pytest.mark.parametrize("ours, theirs, words", [c[1:] for c in CONSTRUCTOR_CASES + FORWARD_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES + FORWARD_CASES])
def test_same_exception_type_as_torch(ours, theirs, words):
    expected = torch_raises(theirs)
    assert expected is not None, "torch accepted this input; the case is wrong"
    with pytest.raises(expected) as info:
        ours()
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} does not mention {word!r}"


def test_dropout_on_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        LSTM(3, 5, dropout=0.5)


def test_backward_before_forward_is_a_clear_error():
    for module in (LSTM(3, 5), RNN(3, 5), GRU(3, 5), LSTMCell(3, 5), RNNCell(3, 5), GRUCell(3, 5)):
        with pytest.raises(RuntimeError, match="before any forward"):
            module.backward(z(4, 2, 5))


def test_backward_with_a_grad_of_the_wrong_shape():
    m = LSTM(3, 5, num_layers=2)
    m(z(4, 2, 3))
    with pytest.raises(RuntimeError, match=r"\(4, 2, 5\).*\(4, 2, 6\)"):
        m.backward(z(4, 2, 6))
    with pytest.raises(RuntimeError, match=r"grad_h_n.*\(2, 2, 5\).*\(1, 2, 5\)"):
        m.backward(z(4, 2, 5), (z(1, 2, 5), z(2, 2, 5)))
    c = LSTMCell(3, 5)
    c(z(2, 3))
    with pytest.raises(RuntimeError, match=r"grad_h.*\(2, 5\).*\(2, 4\)"):
        c.backward((z(2, 4), None))
    g = GRU(3, 5, bidirectional=True)
    g(z(4, 2, 3))
    with pytest.raises(RuntimeError, match=r"grad_h_n.*\(2, 2, 5\).*\(1, 2, 5\)"):
        g.backward(z(4, 2, 10), z(1, 2, 5))
    gc = GRUCell(3, 5)
    gc(z(3))
    with pytest.raises(RuntimeError, match=r"grad_h.*\(5,\).*\(1, 5\)"):
        gc.backward(z(1, 5))


def test_load_state_dict_rejects_wrong_keys_and_shapes_without_changing_anything():
    m = LSTM(3, 5, num_layers=2, seed=0)
    before = m.state_dict()
    bad = dict(before)
    bad.pop("bias_hh_l1")
    bad["weight_ih_l0"] = np.zeros((20, 4), dtype=np.float32)
    bad["extra"] = np.zeros(1)
    assert torch_raises(lambda: torch.nn.LSTM(3, 5, num_layers=2).load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in bad.items()})) is RuntimeError
    with pytest.raises(RuntimeError) as info:
        m.load_state_dict(bad)
    msg = str(info.value)
    assert '"bias_hh_l1"' in msg and '"extra"' in msg and "(20, 4)" in msg and "(20, 3)" in msg
    assert all(np.array_equal(v, m.state_dict()[k]) for k, v in before.items())


def test_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="float16"):
        LSTM(3, 5, dtype=np.float16)
