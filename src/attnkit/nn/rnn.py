"""Running torch's RNN modules over padded batches so that padding never reaches a real position.

Eagerly, the rows are packed (``pack_padded_sequence``): the RNN never sees a padded step. Inside
``torch.compile`` packing cannot be traced (it needs the lengths on the host as Python values), so
the same result is computed from plain calls on padded tensors:

* the forward direction reads each row from its start; padding after the real positions cannot
  change their outputs;
* the backward direction is read from a second call on the rows *right-aligned* (padding first):
  it then starts at each row's last real position and reaches the padding only after the first.

Both give the outputs of the packed run at the real positions and zeros elsewhere (tested against
each other in ``tests/nn/test_rnn.py``). The second route costs a second RNN call for a
bidirectional RNN. A multi-layer bidirectional RNN runs one layer at a time this way (a second
layer reads both directions of the first), each layer with the module's own weights for that
layer, and torch's dropout between layers.

Tracing any ``nn.RNN``/``nn.GRU``/``nn.LSTM`` also needs torch's own switch
``torch._dynamo.config.allow_rnn = True``; without it Dynamo breaks the graph at each of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

Tensor = torch.Tensor


def _right_aligned(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """``x (N, T, F)`` with each row's ``lengths[n]`` real positions moved to the end (padding,
    zeros, first), and the shift ``T - lengths (N, 1)``."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    shift = T - lengths[:, None]
    src = (t - shift).clamp(min=0)
    moved = x.gather(1, src[:, :, None].expand_as(x))
    return moved * (t >= shift)[:, :, None].to(x.dtype), shift


def _width(rnn: nn.RNNBase) -> int:
    """Features per direction of the RNN's outputs (an LSTM's projection size when it has one)."""
    return getattr(rnn, "proj_size", 0) or rnn.hidden_size


def _layer(rnn: nn.RNNBase, i: int):
    """``x -> outputs`` of layer ``i`` alone of a bidirectional batch-first ``rnn``, from zero
    states, with that layer's weights (the same parameters: gradients reach the module)."""
    per_layer = len(rnn._flat_weights) // rnn.num_layers
    weights = rnn._flat_weights[i * per_layer:(i + 1) * per_layer]
    out = _width(rnn)
    fn = {"GRU": torch._VF.gru, "LSTM": torch._VF.lstm, "RNN_TANH": torch._VF.rnn_tanh,
          "RNN_RELU": torch._VF.rnn_relu}[rnn.mode]

    def run(x: Tensor) -> Tensor:
        h = x.new_zeros(2, x.shape[0], out)
        if rnn.mode == "LSTM":
            h = (h, x.new_zeros(2, x.shape[0], rnn.hidden_size))
        return fn(x, h, weights, rnn.bias, 1, 0.0, rnn.training, True, True)[0]

    return run


def padded_rnn(rnn: nn.RNNBase, x: Tensor, lengths: Tensor, total_length: int | None = None) -> Tensor:
    """Outputs ``(N, T, D * hidden)`` of a batch-first RNN over the first ``lengths[n]`` positions of
    each row of ``x (N, T, F)`` (real positions first, padding after); zeros past each length.

    ``lengths (N,)`` may hold zeros (such rows come out all zero). Eagerly the output keeps
    ``total_length`` positions (default ``T``); inside ``torch.compile`` it always keeps ``T``.

    Example::

        >>> import torch
        >>> from attnkit.nn.rnn import padded_rnn
        >>> rnn = torch.nn.GRU(3, 4, batch_first=True, bidirectional=True)
        >>> x = torch.randn(2, 5, 3)
        >>> y = padded_rnn(rnn, x, torch.tensor([5, 2]))
        >>> y.shape, bool((y[1, 2:] == 0).all())
        (torch.Size([2, 5, 8]), True)
        >>> torch.allclose(y[1, :2], rnn(x[1:, :2])[0][0], atol=1e-6)   # as if the padding were absent
        True
    """
    if not rnn.batch_first:
        raise ValueError("padded_rnn needs a batch_first RNN; got batch_first=False")
    N, T, _ = x.shape
    out_dim = _width(rnn) * (2 if rnn.bidirectional else 1)
    lengths = lengths.to(device=x.device, dtype=torch.long)
    if torch.compiler.is_compiling():
        keep = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, :, None]
        if not rnn.bidirectional:
            return rnn(x)[0] * keep.to(x.dtype)
        shift = T - lengths[:, None]
        idx = (torch.arange(T, device=x.device)[None, :] + shift).clamp(max=T - 1)
        layers = [lambda x: rnn(x)[0]] if rnn.num_layers == 1 else [_layer(rnn, i) for i in range(rnn.num_layers)]
        y = x
        for i, run in enumerate(layers):
            if i:  # torch's dropout between layers
                y = nn.functional.dropout(y, rnn.dropout, rnn.training)
            fwd = run(y)
            half = fwd.shape[-1] // 2
            back = run(_right_aligned(y, lengths)[0])[..., half:].gather(1, idx[:, :, None].expand(N, T, half))
            y = torch.cat([fwd[..., :half], back], -1) * keep.to(x.dtype)
        return y
    total = T if total_length is None else int(total_length)
    live = (lengths > 0).nonzero().squeeze(-1)
    if live.numel() == 0:
        return x.new_zeros(N, total, out_dim)
    packed = pack_padded_sequence(x[live], lengths[live].cpu(), batch_first=True, enforce_sorted=False)
    y, _ = rnn(packed)
    y, _ = pad_packed_sequence(y, batch_first=True, total_length=total)
    if live.numel() == N:
        return y
    return x.new_zeros(N, total, out_dim).index_copy(0, live, y)


def last_state(rnn: nn.RNNBase, x: Tensor, lengths: Tensor) -> Tensor:
    """``(N, hidden)``: a unidirectional batch-first RNN's output after each row's last real
    position (``lengths >= 1``), the ``h[-1]`` of a packed run.

    Example::

        >>> import torch
        >>> from attnkit.nn.rnn import last_state
        >>> lstm = torch.nn.LSTM(3, 4, batch_first=True)
        >>> x = torch.randn(2, 5, 3)
        >>> h = last_state(lstm, x, torch.tensor([5, 2]))
        >>> torch.allclose(h[1], lstm(x[1:, :2])[1][0][-1, 0], atol=1e-6)
        True
    """
    if rnn.bidirectional:
        raise ValueError("last_state needs a unidirectional RNN; got bidirectional=True")
    y = padded_rnn(rnn, x, lengths)
    idx = (lengths.to(device=x.device, dtype=torch.long) - 1).clamp(min=0)
    return y[torch.arange(x.shape[0], device=x.device), idx]


def run_rnn(rnn: nn.RNNBase, x: Tensor, keep: Tensor) -> Tensor:
    """Run a batch-first RNN over the real positions of each row only.

    ``x (N, T, F)``, ``keep (N, T)`` bool (True = real). The real positions of a row are fed in
    their order (padding may sit anywhere), so padded values never reach the RNN; the outputs
    ``(N, T, D*hidden)`` are put back at the real positions and are 0 at padded ones. Rows with no
    real position come out all zero.

    Example::

        >>> import torch
        >>> from attnkit.nn.rnn import run_rnn
        >>> rnn = torch.nn.GRU(3, 4, batch_first=True, bidirectional=True)
        >>> keep = torch.tensor([[True, True, False], [False, False, False]])
        >>> y = run_rnn(rnn, torch.randn(2, 3, 3), keep)
        >>> y.shape, bool((y[0, 2] == 0).all()), bool((y[1] == 0).all())
        (torch.Size([2, 3, 8]), True, True)
    """
    N, T, feat = x.shape
    out_dim = _width(rnn) * (2 if rnn.bidirectional else 1)
    order = torch.argsort((~keep).to(torch.int32), dim=-1, stable=True)  # real positions first, in order
    compact = x.gather(1, order.unsqueeze(-1).expand(N, T, feat))
    y = padded_rnn(rnn, compact, keep.sum(-1))
    return torch.zeros_like(y).scatter(1, order.unsqueeze(-1).expand(N, T, out_dim), y)  # undo the compaction


__all__ = ["last_state", "padded_rnn", "run_rnn"]
