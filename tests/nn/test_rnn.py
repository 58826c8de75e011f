"""attnkit.nn.rnn: the packed route (eager) and the padded route (traced) give the outputs of each
row run alone, without its padding; zeros past each length."""

import pytest
import torch
import torch._dynamo as dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.nn.rnn import last_state, padded_rnn, run_rnn

RNNS = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def _alone(rnn, x, lengths):
    """Each row through the RNN by itself, cut to its length, zero-padded: the oracle."""
    D = 2 if rnn.bidirectional else 1
    out = x.new_zeros(x.shape[0], x.shape[1], D * rnn.hidden_size)
    for n, L in enumerate(lengths.tolist()):
        if L:
            out[n, :L] = rnn(x[n:n + 1, :L])[0][0]
    return out


def _traced_route(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=5), kind=st.sampled_from(list(RNNS)),
       bidirectional=st.booleans(), seed=st.integers(0, 2**16))
def test_both_routes_equal_each_row_run_alone(lengths, kind, bidirectional, seed):
    torch.manual_seed(seed)
    rnn = RNNS[kind](3, 4, batch_first=True, bidirectional=bidirectional).double()
    x = torch.randn(len(lengths), 7, 3, dtype=torch.float64)
    n = torch.tensor(lengths)
    want = _alone(rnn, x, n)
    torch.testing.assert_close(padded_rnn(rnn, x, n), want)
    with pytest.MonkeyPatch.context() as mp:
        _traced_route(mp)
        torch.testing.assert_close(padded_rnn(rnn, x, n), want)


def test_eager_route_cuts_to_total_length_and_traced_route_keeps_t(monkeypatch):
    rnn = torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True)
    x, n = torch.randn(2, 9, 3), torch.tensor([4, 2])
    assert padded_rnn(rnn, x, n, total_length=4).shape == (2, 4, 8)
    _traced_route(monkeypatch)
    y = padded_rnn(rnn, x, n, total_length=4)
    assert y.shape == (2, 9, 8) and bool((y[:, 4:] == 0).all())


def test_gradients_of_the_traced_route_equal_the_packed_route(monkeypatch):
    torch.manual_seed(0)
    rnn = torch.nn.GRU(3, 4, batch_first=True, bidirectional=True).double()
    x, n = torch.randn(3, 6, 3, dtype=torch.float64), torch.tensor([6, 1, 3])
    w = torch.randn(3, 6, 8, dtype=torch.float64)
    want = torch.autograd.grad((padded_rnn(rnn, x, n) * w).sum(), list(rnn.parameters()))
    _traced_route(monkeypatch)
    got = torch.autograd.grad((padded_rnn(rnn, x, n) * w).sum(), list(rnn.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_run_rnn_feeds_the_real_positions_in_order_wherever_the_padding_sits(monkeypatch):
    torch.manual_seed(1)
    rnn = torch.nn.GRU(3, 4, batch_first=True, bidirectional=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    keep = torch.tensor([[False, True, False, True, True], [False] * 5])
    want = torch.zeros(2, 5, 8, dtype=torch.float64)
    want[0, keep[0]] = rnn(x[0:1, keep[0]])[0][0]
    torch.testing.assert_close(run_rnn(rnn, x, keep), want)
    _traced_route(monkeypatch)
    torch.testing.assert_close(run_rnn(rnn, x, keep), want)


def test_last_state_is_the_packed_final_state():
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    x, n = torch.randn(3, 6, 3), torch.tensor([6, 1, 4])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, n, batch_first=True, enforce_sorted=False)
    torch.testing.assert_close(last_state(lstm, x, n), lstm(packed)[1][0][-1])
    with pytest.raises(ValueError, match="unidirectional"):
        last_state(torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True), x, n)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn", "lstm with projections"])
def test_a_multilayer_bidirectional_rnn_runs_layer_by_layer_when_traced(kind, monkeypatch):
    """Each layer of a 3-layer bidirectional RNN alone over padded rows: outputs and every
    parameter's gradient equal the packed route's (so equal each row run alone)."""
    torch.manual_seed(4)
    make = {"gru": lambda: torch.nn.GRU(3, 4, num_layers=3, batch_first=True, bidirectional=True),
            "lstm": lambda: torch.nn.LSTM(3, 4, num_layers=3, batch_first=True, bidirectional=True),
            "rnn": lambda: torch.nn.RNN(3, 4, num_layers=3, batch_first=True, bidirectional=True, nonlinearity="relu"),
            "lstm with projections": lambda: torch.nn.LSTM(3, 5, num_layers=3, batch_first=True, bidirectional=True,
                                                           proj_size=2)}[kind]
    rnn = make().double()
    x, n = torch.randn(4, 7, 3, dtype=torch.float64), torch.tensor([7, 1, 0, 4])
    want = padded_rnn(rnn, x, n)
    w = torch.randn_like(want)
    g_want = torch.autograd.grad((want * w).sum(), list(rnn.parameters()))
    _traced_route(monkeypatch)
    got = padded_rnn(rnn, x, n)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), list(rnn.parameters())), g_want):
        torch.testing.assert_close(a, b)
    assert bool((got[2] == 0).all()) and bool((got[1, 1:] == 0).all())


def test_dropout_between_layers_applies_when_traced_in_training(monkeypatch):
    rnn = torch.nn.GRU(3, 4, num_layers=2, batch_first=True, bidirectional=True, dropout=0.5).double()
    x, n = torch.randn(2, 6, 3, dtype=torch.float64), torch.tensor([6, 3])
    _traced_route(monkeypatch)
    rnn.eval()
    a, b = padded_rnn(rnn, x, n), padded_rnn(rnn, x, n)
    torch.testing.assert_close(a, b)
    rnn.train()
    torch.manual_seed(0)
    c = padded_rnn(rnn, x, n)
    assert not torch.allclose(a, c)


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True)

    def forward(self, x, n, w):
        return (padded_rnn(self.rnn, x, n) * w).sum()  # a loss: the traced step ends in a scalar


def test_compiled_padded_rnn_has_no_graph_break_and_equals_eager():
    torch.manual_seed(3)
    m = _Encoder()
    # the input requires grad as an embedding's or a convolution's output does in the models: torch
    # 2.13 fails to compile an LSTM's backward when its input does not (a bug of torch's, not ours)
    x, n, w = torch.randn(3, 6, 3, requires_grad=True), torch.tensor([6, 2, 4]), torch.randn(3, 6, 8)
    dynamo.reset()
    with dynamo.config.patch(allow_rnn=True):
        explained = dynamo.explain(m)(x, n, w)
        assert explained.graph_break_count == 0
        dynamo.reset()
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x, n, w)
    dynamo.reset()
    want = m(x, n, w)
    torch.testing.assert_close(got, want)
    params = list(m.parameters())
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b)
