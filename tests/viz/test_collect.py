"""From capture records to layers and groups: decoder steps stitched into one map, layers grouped
by name, tokens assigned -- checked against the models' own need_weights outputs."""

import pytest
import torch

import attnkit
from attnkit.models.seq2seq import Seq2Seq
from attnkit.viz.collect import Group, Layer, assign_tokens, group_name, group_records


@pytest.mark.parametrize("attention,feeding", [("luong-general", True), ("bahdanau", True), ("luong-dot", False)])
def test_decoder_steps_are_stitched_into_the_models_own_alignment(attention, feeding):
    torch.manual_seed(0)
    m = Seq2Seq(src_vocab=12, tgt_vocab=9, emb_dim=8, hidden_dim=16, attention=attention,
                input_feeding=feeding).eval()
    src, lengths, tgt_in = torch.randint(4, 12, (2, 6)), torch.tensor([6, 4]), torch.randint(4, 9, (2, 5))
    with torch.no_grad():
        _, w = m(src, lengths, tgt_in, need_weights=True)  # (B, T, S)
        with attnkit.capture() as rec:
            m(src, lengths, tgt_in)
    for b in range(2):
        groups = group_records(rec, batch=b)
        assert [g.name for g in groups] == ["attention"] and len(groups[0].layers) == 1
        layer = groups[0].layers[0]
        assert layer.calls == (5 if attention == "bahdanau" or feeding else 1)
        assert layer.shape == (1, 5, 6) and layer.rows == tuple(range(5)) and layer.heads == (0,)
        torch.testing.assert_close(layer.weights[0], w[b], atol=1e-6, rtol=1e-5)
    assert (group_records(rec, batch=1)[0].layers[0].weights[0, :, 4:] == 0).all()  # padding


def test_a_transformer_gives_three_groups_in_call_order_with_their_tokens():
    torch.manual_seed(0)
    model = attnkit.models.get("Transformer")(20, 20, d_model=16, num_heads=2, num_encoder_layers=3,
                                             num_decoder_layers=2, dim_feedforward=32, dropout=0.0).eval()
    src, tgt = torch.tensor([[5, 6, 7, 8, 2]]), torch.tensor([[1, 9, 10]])
    with torch.no_grad():
        ref = model.attention_weights(src, src == 0, tgt)
        with attnkit.capture() as rec:
            model(src, src == 0, tgt)
    groups = group_records(rec)
    assert [(g.name, len(g.layers)) for g in groups] == [("encoder_layers.*.self_attn", 3),
                                                         ("decoder_layers.*.self_attn", 2),
                                                         ("decoder_layers.*.cross_attn", 2)]
    for g, key in zip(groups, ("encoder", "decoder", "cross")):
        for layer, w in zip(g.layers, ref[key]):
            torch.testing.assert_close(layer.weights, w[0], atol=1e-6, rtol=1e-5)
    assert [g.is_self for g in groups] == [True, True, False]
    src_toks, tgt_toks = ["a", "b", "c", "d", "</s>"], ["<s>", "x", "y"]
    assign_tokens(groups, src_toks, tgt_toks)
    assert [(g.query_tokens, g.key_tokens) for g in groups] == [(src_toks, src_toks), (tgt_toks, tgt_toks),
                                                                (tgt_toks, src_toks)]
    assert groups[1].stack().shape == (2, 2, 3, 3)
    assert (groups[1].stack()[..., 0, 1:] == 0).all()  # causal


def test_assign_tokens_roles_and_lengths():
    def g(name, tq, tk):
        return Group(name, [Layer(name, torch.rand(1, tq, tk), (0,), tuple(range(tq)))])

    groups = [g("attention", 3, 3), g("pool", 1, 3), g("mystery", 2, 3), g("odd", 4, 4)]
    assign_tokens(groups, ["a", "b", "c"], ["x", "y", "z"], roles={"attention": ("tgt", "src"),
                                                                   "pool": (["[pool]"], "src")})
    assert (groups[0].query_tokens, groups[0].key_tokens) == (["x", "y", "z"], ["a", "b", "c"])
    assert (groups[1].query_tokens, groups[1].key_tokens) == (["[pool]"], ["a", "b", "c"])
    assert (groups[2].query_tokens, groups[2].key_tokens) == (None, ["a", "b", "c"])  # no side of length 2
    assert groups[3].labels() == (["0", "1", "2", "3"], ["0", "1", "2", "3"])
    assert not groups[0].is_self  # target x source, even though 3 x 3
    with pytest.raises(ValueError, match="roles entries must be 'src', 'tgt'"):
        assign_tokens(groups, ["a"], roles={"*": ("source", None)})


def test_group_names_and_repeated_calls():
    assert group_name("decoder_layers.3.cross_attn") == "decoder_layers.*.cross_attn"
    assert group_name("blocks.0.attn.12") == "blocks.*.attn.*"
    assert group_name("3.attn") == "*.attn"
    assert group_name("script.py:42") == "script.py:42" and group_name("layer10.attn") == "layer10.attn"
    mha = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad(), attnkit.capture() as rec:
        for _ in range(2):
            mha(torch.randn(1, 4, 8))  # one module called twice with 4 queries: two layers
    (grp,) = group_records(rec)
    assert [layer.name for layer in grp.layers] == ["MultiheadAttention (call 1)", "MultiheadAttention (call 2)"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="records must hold at least one capture record"):
        group_records([])
    with pytest.raises(TypeError, match="records must be attnkit.capture records"):
        group_records([torch.ones(2)])
    mha = attnkit.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad(), attnkit.capture() as rec:
        mha(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"batch must lie in \[0, 2\)"):
        group_records(rec, batch=2)
    with pytest.raises(ValueError, match=r"Layer weights must be an \(H, Tq, Tk\) tensor"):
        Layer("x", torch.ones(3, 3), (0,), (0, 1, 2))
