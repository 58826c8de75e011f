"""A grammar of attention requests, drawn by hypothesis, for differential fuzzing.

A :class:`Request` is plain data (ints, floats and tuples, so hypothesis prints and shrinks it
readably); :func:`build` turns it into tensors and attnkit objects. Objects with parameters
(bilinear/additive/location scores, T5 and Shaw biases, learnable bias tensors) are built once,
in float64, and serve every backend and dtype (attnkit casts parameters to the inputs' dtype), so
every run differentiates with respect to the same float64 leaves.

Masks are expression trees::

    ("causal", align) | ("window", left, right, align) | ("padding", lengths) | ("local_m", D)
    | ("local_p", D) | ("block_sparse", block, seed) | ("strided", stride) | ("fixed", stride)
    | ("longformer", window, globals) | ("bigbird", block, seed) | ("dilated", left, dilation)
    | ("chunked", size, shift)
    | ("tensor", seed, per_batch, per_head, density) | ("mod", kind) | ("dead_rows", every)
    | ("and", a, b) | ("or", a, b) | ("not", a)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from hypothesis import strategies as st

import attnkit
from attnkit import masks, normalizers as N, positions as P, scores as S

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
#: most (batch, head, query, key) pairs one request may have
PAIRS_BUDGET = 1 << 18
ALIGNS = ("bottom_right", "top_left")


@dataclass(frozen=True)
class Request:
    B: int
    H: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    dtype: torch.dtype
    score: tuple
    normalizer: tuple
    mask: Optional[tuple]
    biases: tuple = ()
    scale: Optional[float] = None
    dropout: float = 0.0
    weights: Any = False          # False, True, or (heads, rows, average)
    grad: bool = True
    nonfinite: Optional[tuple] = None  # ("masked" | "live", tensor name, value)
    seed: int = 0


# -- strategies --------------------------------------------------------------------------------
def _mask_leaf(B: int, H: int, Tq: int, Tk: int):
    n = max(Tq, Tk)
    return st.one_of(
        st.tuples(st.just("causal"), st.sampled_from(ALIGNS)),
        st.tuples(st.just("window"), st.integers(0, n), st.integers(0, 8), st.sampled_from(ALIGNS)),
        st.tuples(st.just("padding"), st.tuples(*[st.integers(0, Tk)] * B)),
        st.tuples(st.just("local_m"), st.integers(1, 12)),
        st.tuples(st.just("block_sparse"), st.sampled_from([4, 16, 32]), st.integers(0, 99)),
        st.tuples(st.just("strided"), st.integers(1, 9)),
        st.tuples(st.just("fixed"), st.integers(1, 9)),
        st.tuples(st.just("longformer"), st.integers(1, 12), st.lists(st.integers(0, Tk - 1), max_size=3).map(tuple)),
        st.tuples(st.just("bigbird"), st.sampled_from([2, 8, 16]), st.integers(0, 99)),
        st.tuples(st.just("dilated"), st.integers(1, 16), st.integers(1, 3)),
        st.tuples(st.just("chunked"), st.integers(1, 24), st.integers(-3, 5)),
        st.tuples(st.just("tensor"), st.integers(0, 99), st.booleans(), st.booleans(), st.sampled_from([0.1, 0.5, 0.9])),
        st.tuples(st.just("mod"), st.sampled_from(["parity", "per_head", "band"])),
        st.tuples(st.just("dead_rows"), st.integers(2, 7)),
    )


def mask_trees(B: int, H: int, Tq: int, Tk: int, *, local_p: bool):
    leaf = _mask_leaf(B, H, Tq, Tk)
    tree = st.recursive(leaf, lambda sub: st.one_of(
        st.tuples(st.just("and"), sub, sub), st.tuples(st.just("or"), sub, sub), st.tuples(st.just("not"), sub)),
        max_leaves=3)
    if local_p:  # local-p reweights the weights: only '&' may combine it (drawn 1 time in 5)
        lp = st.tuples(st.just("local_p"), st.integers(1, 8))
        tree = st.one_of(tree, tree, tree, lp, st.tuples(st.just("and"), lp, tree))
    return tree


# branches are weighted by repetition: the dot-product scores and softmax, where the backends
# overlap most, are drawn most often
SCORES = st.one_of(
    st.tuples(st.sampled_from(["dot", "scaled_dot", "scaled_dot", "scaled_dot", "cosine"])),
    st.tuples(st.sampled_from(["dot", "scaled_dot", "scaled_dot"])),
    st.tuples(st.just("cosine_tau"), st.sampled_from([0.1, 0.5, 2.0])),
    st.tuples(st.just("general"), st.booleans(), st.booleans()),    # per-head weight, learnable
    st.tuples(st.just("additive"), st.integers(1, 8), st.booleans()),  # hidden, learnable
    st.tuples(st.just("location"), st.booleans()),
    st.tuples(st.just("kernel")),
)

NORMALIZERS = st.one_of(
    st.tuples(st.just("softmax")),
    st.tuples(st.just("softmax")),
    st.tuples(st.just("softmax_t"), st.sampled_from([0.3, 1.0, 2.5])),
    st.tuples(st.just("sigmoid")),
    st.tuples(st.just("sigmoid_b"), st.sampled_from(["log_n", -1.0, 0.5])),
    st.tuples(st.sampled_from(["sparsemax", "entmax15", "entmax", "hardmax", "topk"])),
    st.tuples(st.just("entmax_a"), st.sampled_from([1.2, 1.5, 2.0, 3.0])),
    st.tuples(st.just("hardmax_t"), st.sampled_from([0.5, 2.0])),
    st.tuples(st.just("topk_k"), st.integers(1, 10)),
    st.tuples(st.just("gumbel"), st.sampled_from([0.5, 1.0]), st.booleans()),
    st.tuples(st.just("stochastic_hard"), st.booleans()),
)


def bias_items(H: int):
    return st.one_of(
        st.tuples(st.just("alibi"), st.booleans()),                       # symmetric
        st.tuples(st.just("t5"), st.booleans(), st.booleans()),           # bidirectional, learnable
        st.tuples(st.just("shaw"), st.integers(0, 6), st.booleans()),     # max distance, per head
        st.tuples(st.just("softcap"), st.sampled_from([0.5, 3.0, 20.0])),
        st.tuples(st.just("tensor"), st.booleans(), st.sampled_from([0.0, 0.2]), st.booleans()),  # learnable, -inf share, full
        st.tuples(st.just("score_mod"), st.sampled_from(["shift", "where"])),
    )


@st.composite
def requests(draw, *, max_len: int = 300, triton: bool = False) -> Request:
    """Any valid request (and a few that a backend must refuse). With ``triton``, requests that
    attnkit's Triton kernels serve (float32; sigmoid, sparsemax, 1.5-entmax, or softmax with its
    weights, over dot-product scores with ALiBi or none; additive scores under softmax) and, now
    and then, one they refuse."""
    Hkv = draw(st.sampled_from([1, 1, 2, 3]))
    H = Hkv * draw(st.sampled_from([1, 1, 2, 4]))
    B = draw(st.integers(1, 3))
    small = draw(st.integers(1, 24))
    Tq = draw(st.one_of(st.integers(1, 40), st.integers(1, max_len), st.just(small)))
    Tk = draw(st.one_of(st.just(1), st.integers(1, 40), st.integers(1, max_len), st.just(Tq)))
    dtype = torch.float32 if triton else draw(st.sampled_from(DTYPES))
    # half the requests are plain softmax over dot products, which every backend may serve
    # (SDPA, flex, both tile bodies); the other half range over the whole grammar
    focus = draw(st.booleans())
    if triton:
        score = draw(st.sampled_from([("dot",), ("scaled_dot",), ("cosine",), ("cosine_tau", 0.5),
                                      ("general", False, True)]) | st.tuples(st.just("additive"), st.integers(1, 8),
                                                                               st.booleans()))
    else:
        score = draw(st.tuples(st.sampled_from(["dot", "scaled_dot", "scaled_dot", "cosine"])) if focus else SCORES)
    D = draw(st.sampled_from([1, 3, 5, 8, 16, 33]))
    if score[0].startswith("cosine") and D == 1:
        D = 3  # with one feature cos(q, k) = ±1: its exact gradient is 0 and any dtype's rounding is all noise
    Dv = draw(st.sampled_from([D, D, 1, 4, 7]))
    normalizer = ("normalize",) if score[0] == "kernel" else draw(
        st.sampled_from([("softmax",), ("softmax",), ("softmax_t", 0.5)]) if focus else NORMALIZERS)
    if triton:
        normalizer = draw(st.sampled_from(
            [("softmax",), ("softmax_t", 0.5)] if score[0] == "additive" else
            [("softmax",), ("softmax_t", 0.5), ("sigmoid",), ("sigmoid_b", "log_n"), ("sigmoid_b", -1.0),
             ("sparsemax",), ("entmax15",), ("entmax_a", 1.5), ("entmax_a", 2.0)]))
    if score[0] == "location":
        Tk = min(Tk, 64)
    # bound the reference's (B, H, Tq, Tk[, hidden]) tensors: a few MB, milliseconds per backend
    budget = PAIRS_BUDGET // (8 if score[0] == "additive" else 1)
    while B * H * Tq * Tk > budget:
        Tq, Tk = (max(1, Tq // 2), Tk) if Tq >= Tk else (Tq, max(1, Tk // 2))
    mask = draw(st.one_of(st.none(), mask_trees(B, H, Tq, Tk, local_p=not focus and not triton),
                          mask_trees(B, H, Tq, Tk, local_p=False)))
    if triton:   # ALiBi or nothing (and, one request in eight, a mod the kernels refuse)
        biases = draw(st.sampled_from([(), (), ("alibi",)] if score[0] != "additive" else [()]))
        biases = (("alibi", False),) if biases else ()
        if draw(st.integers(0, 7)) == 0:
            biases = biases + (draw(bias_items(H)),)
    else:
        biases = () if score[0] == "kernel" else tuple(draw(st.lists(bias_items(H), max_size=2)))
    scale = draw(st.none() | st.sampled_from([0.05, 0.3, 1.0]))
    dropout = 0.0 if focus or triton else draw(st.sampled_from([0.0, 0.0, 0.0, 0.25]))
    weights = draw(st.sampled_from([False, False, False, True, "request"] if focus else [False, True, "request"]))
    if triton and normalizer[0].startswith("softmax") and score[0] != "additive":
        weights = draw(st.sampled_from([True, "request"]))   # the kernels serve softmax for its weights
    if weights == "request":  # a subset of heads and rows (or all of either), averaged over the heads or not
        heads = draw(st.none() | st.lists(st.integers(0, H - 1), min_size=1, max_size=3).map(tuple))
        rows = draw(st.none() | st.lists(st.integers(0, Tq - 1), min_size=1, max_size=4).map(tuple))
        weights = (heads, rows, draw(st.booleans()))
    grad = draw(st.sampled_from([True, False] if focus else [True, True, False]))
    nonfinite = draw(st.sampled_from([None] * 6 + [("masked", "k"), ("masked", "v"), ("masked", "kv"), ("live", "q"),
                                                   ("live", "k"), ("live", "v")]))
    if nonfinite is not None and nonfinite[1] == "q" and any(b[0] == "shaw" for b in biases):
        nonfinite = None  # Shaw's bias is computed from q outside attnkit: NaN would reach its table's gradient
    if nonfinite is None and any(b[0] == "tensor" for b in biases) and draw(st.integers(0, 3)) == 0:
        nonfinite = ("live", "bias")  # an entry of a bias tensor (live or masked, as the mask has it)
    if nonfinite is not None:
        nonfinite = nonfinite + (draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])),)
    return Request(B, H, Hkv, Tq, Tk, D, Dv, dtype, score, normalizer, mask, biases, scale, dropout, weights,
                   grad, nonfinite, draw(st.integers(0, 2 ** 16)))


# -- building ----------------------------------------------------------------------------------
@dataclass
class Built:
    q: torch.Tensor                       # float64 leaves
    k: torch.Tensor
    v: torch.Tensor
    params: list = field(default_factory=list)   # float64 leaves that need gradients
    req: Request = None
    _objects: dict = field(default_factory=dict)

    def bias_tensor(self) -> Optional[torch.Tensor]:
        """The first bias tensor of the request (None if it has none)."""
        return next((o for t, o in zip(self.req.biases, self._objects["biases"]) if t[0] == "tensor"), None)

    def kwargs(self, q: torch.Tensor) -> dict:
        """The ``attention`` keyword arguments for one run (``q`` is that run's queries: Shaw's bias
        reads them)."""
        r, o = self.req, self._objects
        biases = []
        for item, obj in zip(r.biases, o["biases"]):
            if item[0] == "shaw":
                biases.append(obj.key_bias(q, r.Tk, scale=1.0))
            elif item[0] == "tensor":
                biases.append(obj.to(q.dtype))
            else:
                biases.append(obj)
        kw = dict(score=o["score"], normalizer=o["normalizer"](), mask=o["mask"], bias=biases or None,
                  scale=r.scale, dropout_p=r.dropout)
        if r.dropout:
            kw["generator"] = torch.Generator().manual_seed(r.seed)
        if r.weights is True:
            kw["return_weights"] = True
        elif r.weights:
            kw["return_weights"] = attnkit.WeightsRequest(heads=r.weights[0], rows=r.weights[1], average=r.weights[2])
        return kw


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_mask(t: tuple, r: Request):
    kind = t[0]
    g = _gen(r.seed + 7)
    if kind == "causal":
        return masks.causal(align=t[1])
    if kind == "window":
        return masks.sliding_window(t[1], t[2], align=t[3])
    if kind == "padding":
        return masks.key_padding(torch.tensor(t[1]))
    if kind == "local_m":
        return masks.local_m(t[1])
    if kind == "local_p":
        centers = torch.rand(r.B, r.Tq, generator=g, dtype=torch.float64) * r.Tk
        return masks.local_p(centers, t[1])
    if kind == "block_sparse":
        bs = t[1]
        layout = torch.rand(-(-r.Tq // bs), -(-r.Tk // bs), generator=_gen(t[2])) < 0.4
        return masks.block_sparse(layout, bs)
    if kind == "strided":
        return masks.strided(t[1])
    if kind == "fixed":
        return masks.fixed(t[1])
    if kind == "longformer":
        return masks.longformer(t[1], list(t[2]))
    if kind == "bigbird":
        return masks.bigbird(t[1], seed=t[2])
    if kind == "dilated":
        return masks.dilated_window(t[1], dilation=t[2])
    if kind == "chunked":
        return masks.chunked(t[1], t[2])
    if kind == "tensor":
        shape = (r.B if t[2] else 1, r.H if t[3] else 1, r.Tq, r.Tk)
        return torch.rand(shape, generator=_gen(t[1])) < t[4]
    if kind == "mod":
        if t[1] == "parity":
            return lambda b, h, i, j: (i + j) % 3 != 0
        if t[1] == "per_head":
            return lambda b, h, i, j: (j <= i + h) | (b == 0)
        return lambda b, h, i, j: (i - j).abs() <= 5
    if kind == "dead_rows":
        every = t[1]
        return lambda b, h, i, j: (i % every != 0) & (j >= 0)
    if kind == "and":
        return attnkit.masks.as_mask(build_mask(t[1], r)) & build_mask(t[2], r)
    if kind == "or":
        return attnkit.masks.as_mask(build_mask(t[1], r)) | build_mask(t[2], r)
    if kind == "not":
        return ~attnkit.masks.as_mask(build_mask(t[1], r))
    raise ValueError(kind)


def _score(t: tuple, r: Request, params: list):
    kind = t[0]
    if kind in ("dot", "scaled_dot", "cosine"):
        return kind
    if kind == "cosine_tau":
        return S.Cosine(tau=t[1])
    if kind == "general":
        s = S.General(r.D, r.D, heads=r.H if t[1] else None).double()
    elif kind == "additive":
        s = S.Additive(r.D, r.D, t[1]).double()
    elif kind == "location":
        s = S.Location(r.D, max(r.Tk, 1)).double()
    elif kind == "kernel":
        return S.Kernel()
    else:
        raise ValueError(kind)
    learn = t[-1]
    for p in s.parameters():
        p.requires_grad_(learn)
        if learn:
            params.append(p)
    return s


def _normalizer(t: tuple, r: Request):
    kind = t[0]
    simple = {"softmax": N.Softmax, "sigmoid": N.Sigmoid, "sparsemax": N.Sparsemax, "entmax15": N.Entmax15,
              "entmax": N.Entmax, "hardmax": N.Hardmax, "topk": N.TopK, "normalize": N.Normalize}
    if kind in simple:
        return simple[kind]
    if kind == "softmax_t":
        return lambda: N.Softmax(temperature=t[1])
    if kind == "sigmoid_b":
        return lambda: N.Sigmoid(bias=t[1])
    if kind == "entmax_a":
        return lambda: N.Entmax(alpha=t[1])
    if kind == "hardmax_t":
        return lambda: N.Hardmax(temperature=t[1])
    if kind == "topk_k":
        return lambda: N.TopK(k=t[1])
    if kind == "gumbel":  # a fresh generator per run: every backend draws the same noise
        return lambda: N.Gumbel(tau=t[1], hard=t[2], generator=_gen(r.seed + 3))
    if kind == "stochastic_hard":
        return lambda: N.StochasticHard(generator=_gen(r.seed + 5), greedy=t[1])
    raise ValueError(kind)


def _bias(t: tuple, r: Request, params: list):
    kind = t[0]
    if kind == "alibi":
        return P.ALiBi(r.H, symmetric=t[1])
    if kind == "t5":
        m = P.T5RelativeBias(r.H, num_buckets=8, max_distance=16, bidirectional=t[1]).double()
        with torch.no_grad():
            m.embedding.weight.copy_(torch.randn(m.embedding.weight.shape, generator=_gen(r.seed + 11),
                                                 dtype=torch.float64))
        m.embedding.weight.requires_grad_(t[2])
        if t[2]:
            params.append(m.embedding.weight)
        return m
    if kind == "shaw":
        m = P.ShawRelative(r.D, t[1], num_heads=r.H if t[2] else None).double()
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
        return m
    if kind == "softcap":
        return P.softcap(t[1])
    if kind == "tensor":
        learn, neg_share, full = t[1], t[2], t[3]
        shape = (r.B, r.H, r.Tq, r.Tk) if full else (1, 1, r.Tq, r.Tk)
        x = torch.randn(shape, generator=_gen(r.seed + 13), dtype=torch.float64)
        if neg_share:
            x = x.masked_fill(torch.rand(shape, generator=_gen(r.seed + 17)) < neg_share, float("-inf"))
        x.requires_grad_(learn)
        if learn:
            params.append(x)
        return x
    if kind == "score_mod":
        if t[1] == "shift":
            return lambda s, b, h, i, j: s + 0.1 * (i - j).to(s.dtype) - 0.05 * h.to(s.dtype)
        return lambda s, b, h, i, j: torch.where((i + j) % 4 == 1, s * 0.5, s)
    raise ValueError(kind)


def build(r: Request) -> Built:
    g = _gen(r.seed)
    q = torch.randn(r.B, r.H, r.Tq, r.D, generator=g, dtype=torch.float64)
    k = torch.randn(r.B, r.Hkv, r.Tk, r.D, generator=g, dtype=torch.float64)
    v = torch.randn(r.B, r.Hkv, r.Tk, r.Dv, generator=g, dtype=torch.float64)
    params: list = []
    objects = {"score": _score(r.score, r, params), "normalizer": _normalizer(r.normalizer, r),
               "mask": None if r.mask is None else build_mask(r.mask, r),
               "biases": [_bias(t, r, params) for t in r.biases]}
    built = Built(q, k, v, params, r, objects)
    if r.nonfinite is not None:
        _inject(built)
    for x in (built.q, built.k, built.v):
        x.requires_grad_(r.grad)
    return built


def allowed(built: Built) -> torch.Tensor:
    """The mask as a dense ``(B, H, Tq, Tk)`` bool tensor (all True without a mask)."""
    r, m = built.req, built._objects["mask"]
    if m is None:
        return torch.ones(r.B, r.H, r.Tq, r.Tk, dtype=torch.bool)
    return masks.as_mask(m).materialize(r.Tq, r.Tk, r.B, r.H).expand(r.B, r.H, r.Tq, r.Tk)


def _inject(built: Built) -> None:
    """Put a non-finite value where the request says: in keys/values no query may read
    ("masked"), or in a live query row, key or value ("live")."""
    r = built.req
    where, names, value = r.nonfinite
    live = allowed(built)
    g = _gen(r.seed + 19)
    G = r.H // r.Hkv
    # keys that no query head of their group reads, per (batch, kv head)
    read = live.view(r.B, r.Hkv, G, r.Tq, r.Tk).any(2).any(2)            # (B, Hkv, Tk)
    if where == "masked":
        unread = ~read
        for name in names:
            x = getattr(built, name)
            x.masked_fill_(unread.unsqueeze(-1), value) if name == "k" else \
                x[..., :1].masked_fill_(unread.unsqueeze(-1), value)
        return
    x = built.bias_tensor() if names == "bias" else getattr(built, names)
    idx = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in x.shape)
    with torch.no_grad():
        x[idx] = value
