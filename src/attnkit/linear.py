r"""Linear-time attention: kernelized linear attention, Performer (FAVOR+) and Linformer.

All three avoid the ``(Tq, Tk)`` score matrix. They are *different models* or *approximations* of
softmax attention, not exact fast paths:

* :func:`linear_attention` (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236) replaces
  ``exp(q·k)`` by a feature-map kernel ``φ(q)·φ(k)`` (``φ = elu + 1``). It is exact for *its own*
  definition (tested to float64 round-off against :func:`quadratic_linear_attention`), but it is not
  softmax attention.
* :func:`performer_attention` (Choromanski et al. 2021, https://arxiv.org/abs/2009.14794) uses
  positive random features whose kernel is an unbiased estimate of ``exp(q·k/√d)``: it approximates
  softmax attention, with an error that shrinks like ``1/√m`` in the number of features ``m``.
* :func:`linformer_attention` (Wang et al. 2020, https://arxiv.org/abs/2006.04768) projects keys and
  values along the sequence to ``proj_len`` rows; it equals softmax attention when the projections
  are the identity, and is a learned low-rank approximation otherwise.

Shape legend: ``q (B, H, Tq, D)``, ``k (B, Hkv, Tk, D)``, ``v (B, Hkv, Tk, Dv)``, ``H % Hkv == 0``
(query head ``h`` reads key/value head ``h // (H // Hkv)``), output ``(B, H, Tq, Dv)``.
Causal masks align bottom-right (query ``i`` sits at ``i + Tk - Tq``), as in :mod:`attnkit.masks`.
Low-precision inputs (bfloat16/float16) are computed in float32 and cast back: the running sums
of the causal form would lose too many digits otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from ._checks import check_finite_tensor, check_positive, check_qkv, check_tensor, shape_str
from .masks.basic import KeyPadding, causal as _causal_mask
from .scores import FEATURE_MAPS, FeatureMap, feature_map_fn as _feature_map

Tensor = torch.Tensor

#: default chunk length of the causal form
DEFAULT_CHUNK = 64


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    check_qkv(q, k, v, same_qk_dim=True)


def _keep_mask(key_padding, batch: int, num_keys: int, device) -> Tensor | None:
    """``key_padding`` (lengths ``(B,)``, bool keep ``(B, Tk)`` or a KeyPadding mask) -> keep ``(B, Tk)``."""
    if key_padding is None:
        return None
    kp = key_padding if isinstance(key_padding, KeyPadding) else KeyPadding(key_padding)
    kp.check(batch, 1, 1, num_keys)
    return kp.materialize(1, num_keys, batch=batch, device=device)[:, 0, 0, :]     # (B, Tk)


def _zero_padded(x: Tensor, keep: Tensor | None) -> Tensor:
    """Padded key rows set to 0 with ``where`` (not a product), so NaN/inf there can reach neither the
    output nor, through the feature map's backward, the gradients."""
    if keep is None:
        return x
    return torch.where(keep[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_eps(eps: float) -> float:
    return float(check_positive("eps", eps, allow_zero=True))


def _check_chunk(chunk_size) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK
    return int(check_positive("chunk_size", chunk_size, integer=True))


def _check_bool(name: str, x: object) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool; got {type(x).__name__}")
    return x


# ----------------------------------------------------------------------------------------------
# the shared core: out_i = φq_i · S_i / (φq_i · z_i + eps)
# ----------------------------------------------------------------------------------------------

def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # den == 0 only when no key contributes (then num == 0 too): output 0, never NaN
    return num / torch.where(den == 0, torch.ones_like(den), den)


def _causal_chunked(fq: Tensor, fk: Tensor, v: Tensor, S0: Tensor | None, z0: Tensor | None,
                    eps: float | Tensor, chunk: int) -> Tensor:
    """Square causal linear attention, query t sees keys <= t (plus an initial state S0, z0).

    fq ``(B, Hkv, G, T, M)``, fk ``(B, Hkv, 1, T, M)``, v ``(B, Hkv, 1, T, Dv)``; eps a float or a
    per-query tensor ``(B, Hkv, G, T, 1)``.
    Within a chunk: the quadratic form with a causal mask; across chunks: the running state
    ``S = Σ φk vᵀ`` ``(M, Dv)`` and ``z = Σ φk``, kept once per chunk (O(T/C · M · Dv) memory).
    """
    T = fq.shape[-2]
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T
    if pad:
        # zero features past the end: padded keys add nothing, padded queries are dropped
        fq, fk, v = (nnf.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v))
        if isinstance(eps, Tensor):
            eps = nnf.pad(eps, (0, 0, 0, pad))
    if isinstance(eps, Tensor):
        eps = eps.unflatten(-2, (n, C))                            # (B, Hkv, G, n, C, 1)
    fq = fq.unflatten(-2, (n, C))                                  # (B, Hkv, G, n, C, M)
    fk = fk.unflatten(-2, (n, C))                                  # (B, Hkv, 1, n, C, M)
    v = v.unflatten(-2, (n, C))                                    # (B, Hkv, 1, n, C, Dv)

    kv_c = fk.transpose(-2, -1) @ v                                # (B, Hkv, 1, n, M, Dv)
    z_c = fk.sum(-2)                                               # (B, Hkv, 1, n, M)
    # state before each chunk: exclusive prefix sum over chunks (+ the initial state)
    S = torch.cat((torch.zeros_like(kv_c[:, :, :, :1]), kv_c[:, :, :, :-1].cumsum(3)), dim=3)
    z = torch.cat((torch.zeros_like(z_c[:, :, :, :1]), z_c[:, :, :, :-1].cumsum(3)), dim=3)
    if S0 is not None:
        S, z = S + S0.unsqueeze(3), z + z0.unsqueeze(3)

    tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    A = (fq @ fk.transpose(-2, -1)).masked_fill(~tril, 0.0)        # (B, Hkv, G, n, C, C)
    num = fq @ S + A @ v                                           # (B, Hkv, G, n, C, Dv)
    den = (fq @ z.unsqueeze(-1)) + A.sum(-1, keepdim=True) + eps   # (B, Hkv, G, n, C, 1)
    out = _safe_div(num, den).flatten(-3, -2)                      # (B, Hkv, G, n*C, Dv)
    return out[..., :T, :]


def _linear_core(fq: Tensor, fk: Tensor, v: Tensor, *, causal: bool, keep: Tensor | None, eps: float | Tensor,
                 chunk: int) -> Tensor:
    """fq ``(B, H, Tq, M)``, fk ``(B, Hkv, Tk, M)``, v ``(B, Hkv, Tk, Dv)`` (compute dtype) ->
    ``(B, H, Tq, Dv)``. ``eps`` is a float or a per-query tensor ``(B, H, Tq, 1)``."""
    B, H, Tq, M = fq.shape
    Hkv, Tk, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    G = H // Hkv
    if Tq == 0 or Tk == 0:                                         # nothing to attend: zeros
        return fq.new_zeros(B, H, Tq, Dv)
    if isinstance(eps, Tensor):
        eps = eps.expand(B, H, Tq, 1).reshape(B, Hkv, G, Tq, 1)
    if keep is not None:
        kk = keep[:, None, :, None]                                # (B, 1, Tk, 1)
        # where (not multiply) so that NaN/inf in padded rows cannot leak in
        fk = torch.where(kk, fk, torch.zeros((), dtype=fk.dtype, device=fk.device))
        v = torch.where(kk, v, torch.zeros((), dtype=v.dtype, device=v.device))
    fq = fq.reshape(B, Hkv, G, Tq, M)                              # head h = kv_head * G + g
    fk, v = fk.unsqueeze(2), v.unsqueeze(2)                        # (B, Hkv, 1, Tk, .)

    if not causal:
        S = fk.transpose(-2, -1) @ v                               # (B, Hkv, 1, M, Dv)
        z = fk.sum(-2).unsqueeze(-1)                               # (B, Hkv, 1, M, 1)
        out = _safe_div(fq @ S, fq @ z + eps)                      # (B, Hkv, G, Tq, Dv)
        return out.reshape(B, H, Tq, Dv)

    off = Tk - Tq                                                  # query i sits at i + off
    if off >= 0:
        # keys before the first query are seen by every query: an initial state
        fkp, vp = fk[..., :off, :], v[..., :off, :]
        S0, z0 = fkp.transpose(-2, -1) @ vp, fkp.sum(-2)           # (B, Hkv, 1, M, Dv), (B, Hkv, 1, M)
        out = _causal_chunked(fq, fk[..., off:, :], v[..., off:, :], S0, z0, eps, chunk)
    else:
        # the first -off queries precede every key: zero output
        if isinstance(eps, Tensor):
            eps = eps[..., -off:, :]
        live = _causal_chunked(fq[..., -off:, :], fk, v, None, None, eps, chunk)
        out = torch.cat((live.new_zeros(B, Hkv, G, -off, Dv), live), dim=-2)
    return out.reshape(B, H, Tq, Dv)


# ----------------------------------------------------------------------------------------------
# kernelized linear attention
# ----------------------------------------------------------------------------------------------

def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: FeatureMap = "elu+1", causal: bool = False,
                     key_padding=None, eps: float = 1e-6, chunk_size: int | None = None) -> Tensor:
    r"""Kernelized linear attention (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236).

    .. math::
        \mathrm{out}_i = \frac{\phi(q_i)^\top \sum_{j \le i'} \phi(k_j) v_j^\top}
                             {\phi(q_i)^\top \sum_{j \le i'} \phi(k_j) + \varepsilon}

    (the sums run over all unpadded keys when ``causal=False``; ``i' = i + Tk - Tq``). This is
    the quadratic form ``w_ij = φ(q_i)·φ(k_j) / (Σ_j' φ(q_i)·φ(k_j') + ε)`` of
    :func:`quadratic_linear_attention`, computed in ``O(T · M · Dv)`` time by associativity.

    Causal: the chunked form of the paper's prefix sums. Inside each chunk of ``chunk_size``
    positions the quadratic form with a causal mask; across chunks a running state
    ``S = Σ φ(k_j) v_jᵀ`` (``M × Dv``) and ``z = Σ φ(k_j)``. Time ``O(T · (C · M + M · Dv))``,
    memory ``O(T · C + T/C · M · Dv)`` instead of the ``O(T · M · Dv)`` of a per-position cumsum.
    ``chunk_size=1`` is the pure recurrent (prefix-sum) form.

    Args:
        q: ``(B, H, Tq, D)``.
        k: ``(B, Hkv, Tk, D)``.
        v: ``(B, Hkv, Tk, Dv)``.
        feature_map: ``"elu+1"`` (default, ``φ(x) = elu(x) + 1``), ``"relu"``, or a callable applied
            to q and k (its values must be >= 0 so that denominators are positive).
        causal: query ``i`` sees keys ``j <= i + Tk - Tq`` only.
        key_padding: ``None``, integer lengths ``(B,)``, or a bool keep-mask ``(B, Tk)``
            (``True`` = real token, attnkit's convention), or an ``attnkit.masks.key_padding``.
            Padded keys get ``φ(k_j) = 0`` and ``v_j = 0``: they have no influence at all.
        eps: added to the denominator (rows with no visible key give 0).
        chunk_size: chunk length ``C`` of the causal form (default 64); unused when not causal.

    Returns:
        ``(B, H, Tq, Dv)`` in the dtype of ``q``.

    Example::

        >>> import torch, attnkit.linear as L
        >>> q, k, v = torch.randn(3, 2, 4, 10, 8, dtype=torch.float64).unbind(0)
        >>> out = L.linear_attention(q, k, v, causal=True, chunk_size=4)
        >>> torch.allclose(out, L.quadratic_linear_attention(q, k, v, causal=True))
        True
    """
    _check_qkv(q, k, v)
    phi = _feature_map(feature_map)
    causal = _check_bool("causal", causal)
    eps = _check_eps(eps)
    chunk = _check_chunk(chunk_size)
    keep = _keep_mask(key_padding, q.shape[0], k.shape[2], q.device)
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), _zero_padded(k.to(cdt), keep), _zero_padded(v.to(cdt), keep)
    if torch.compiler.is_compiling():
        # torch 2.13's meta elu_backward keeps the strides of a transposed input where the kernel
        # returns them contiguous, so a traced backward's view fails at run time: feed it contiguous
        qc, kc = qc.contiguous(), kc.contiguous()
    out = _linear_core(phi(qc), phi(kc), vc, causal=causal, keep=keep, eps=eps, chunk=chunk)
    return out.to(q.dtype)


def quadratic_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: FeatureMap = "elu+1",
                               causal: bool = False, key_padding=None, eps: float = 1e-6,
                               return_weights: bool = False):
    r"""The explicit ``O(Tq · Tk)`` form of :func:`linear_attention` (its test oracle).

    .. math::
        A_{ij} = \phi(q_i)\cdot\phi(k_j)\,[j \text{ allowed}],\qquad
        w_{ij} = \frac{A_{ij}}{\sum_{j'} A_{ij'} + \varepsilon},\qquad \mathrm{out} = w\,v

    Arguments as :func:`linear_attention`. Returns ``out (B, H, Tq, Dv)``, or ``(out, weights)``
    with ``weights (B, H, Tq, Tk)`` when ``return_weights``.

    Example::

        >>> import torch, attnkit.linear as L
        >>> q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
        >>> out, w = L.quadratic_linear_attention(q, k, v, return_weights=True)
        >>> torch.allclose(w.sum(-1), torch.ones(1, 2, 4))
        True
    """
    _check_qkv(q, k, v)
    phi = _feature_map(feature_map)
    causal = _check_bool("causal", causal)
    eps = _check_eps(eps)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    keep = _keep_mask(key_padding, B, Tk, q.device)
    cdt = _compute_dtype(q.dtype)
    G = H // Hkv
    fq = phi(q.to(cdt))
    fk = phi(k.to(cdt)).repeat_interleave(G, dim=1)                # (B, H, Tk, M)
    vv = v.to(cdt).repeat_interleave(G, dim=1)                     # (B, H, Tk, Dv)
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & _causal_mask().materialize(Tq, Tk, device=q.device)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
        vv = torch.where(keep[:, None, :, None], vv, torch.zeros((), dtype=cdt, device=q.device))
    A = torch.where(allowed, fq @ fk.transpose(-2, -1), torch.zeros((), dtype=cdt, device=q.device))
    w = _safe_div(A, A.sum(-1, keepdim=True) + eps)                # (B, H, Tq, Tk)
    out = (w @ vv).to(q.dtype)
    return (out, w.to(q.dtype)) if _check_bool("return_weights", return_weights) else out


# ----------------------------------------------------------------------------------------------
# Performer (FAVOR+)
# ----------------------------------------------------------------------------------------------

SCALINGS = ("chi", "sqrt_dim")
KINDS = ("positive", "trig")
STABILIZERS = (None, "row", "all")


def orthogonal_random_matrix(num_features: int, dim: int, generator: torch.Generator | None = None, *,
                             scaling: str = "chi", dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    r"""Block-orthogonal Gaussian projection ``W (m, d)`` for FAVOR+ (Choromanski et al. 2021,
    https://arxiv.org/abs/2009.14794, §2.4).

    Rows come in blocks of ``d`` exactly orthogonal directions (the Q of a QR decomposition of a
    Gaussian matrix, sign-corrected so the blocks are Haar-distributed); the last block is
    truncated to reach ``m`` rows. Each row is then given a length: ``scaling="chi"`` (default)
    draws it from the chi distribution with ``d`` degrees of freedom (the norm of a ``N(0, I_d)``
    vector), so each row is marginally ``N(0, I_d)`` as the unbiased estimator needs;
    ``"sqrt_dim"`` gives every row length ``√d`` (the paper's ``scaling=1`` option).

    Args:
        num_features: ``m > 0`` rows.
        dim: ``d > 0`` columns (head dim).
        generator: a ``torch.Generator`` for reproducible draws (default: the global RNG).

    Example::

        >>> import torch, attnkit.linear as L
        >>> W = L.orthogonal_random_matrix(6, 4, torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> G = W[:4] @ W[:4].T                       # first block: orthogonal rows
        >>> torch.allclose(G, torch.diag(torch.diagonal(G)))
        True
    """
    num_features = int(check_positive("num_features", num_features, integer=True))
    dim = int(check_positive("dim", dim, integer=True))
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; valid names: {', '.join(map(repr, SCALINGS))}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    gdev = generator.device if generator is not None else "cpu"
    nb = -(-num_features // dim)
    g = torch.randn(nb, dim, dim, generator=generator, dtype=torch.float64, device=gdev)
    qm, r = torch.linalg.qr(g)                                     # (nb, d, d), orthonormal columns
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)   # Haar sign fix
    W = qm.transpose(-2, -1).reshape(nb * dim, dim)[:num_features]  # (m, d), rows orthonormal per block
    if scaling == "chi":
        norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64, device=gdev).norm(dim=1)
    else:
        norms = torch.full((num_features,), math.sqrt(dim), dtype=torch.float64, device=gdev)
    W = norms.unsqueeze(1) * W
    return W.to(dtype=dtype, device=device if device is not None else gdev)


def _performer_features(x: Tensor, projection: Tensor, kind: str, stabilizer, keep: Tensor | None = None,
                        return_shift: bool = False):
    """Features, and (with ``return_shift``) the constant ``c`` subtracted from their exponents
    (``(..., T, 1)`` for "row", ``(..., 1, 1)`` for "all", 0 for None): ``φ_stabilized = φ · exp(-c)``."""
    m = projection.shape[0]
    c = torch.zeros((), dtype=x.dtype, device=x.device)
    proj = x @ projection.t()                                      # (..., T, m)
    sq = 0.5 * (x * x).sum(-1, keepdim=True)                       # (..., T, 1)
    log_amp = proj - sq if kind == "positive" else sq              # log of the exp(.) factor
    if stabilizer is not None:
        ref = log_amp
        if keep is not None:                                       # padded rows must not set the constant
            ref = ref.masked_fill(~keep[:, None, :, None], float("-inf"))
        if stabilizer == "row":
            c = ref.amax(-1, keepdim=True)
        else:
            c = ref.amax(dim=(-2, -1), keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        log_amp = log_amp - c
    if kind == "positive":
        feats = torch.exp(log_amp) / math.sqrt(m)
    else:
        feats = torch.exp(log_amp) * torch.cat((proj.sin(), proj.cos()), dim=-1) / math.sqrt(m)
    return (feats, c) if return_shift else feats


def performer_features(x: Tensor, projection: Tensor, kind: str = "positive", *, stabilizer: str | None = None) -> Tensor:
    r"""FAVOR+ random features ``φ(x)`` with ``E[φ(x)·φ(y)] = exp(x·y)`` (Choromanski et al. 2021,
    https://arxiv.org/abs/2009.14794, Lemma 1).

    .. math::
        \text{positive:}\ \ \phi(x) = \frac{1}{\sqrt m}\exp\!\big(Wx - \tfrac{|x|^2}{2}\big)\in\mathbb R^m,
        \qquad
        \text{trig:}\ \ \phi(x) = \frac{e^{|x|^2/2}}{\sqrt m}\big[\sin(Wx), \cos(Wx)\big]\in\mathbb R^{2m}

    Positive features keep every kernel value positive (stable denominators); trigonometric ones
    (the original random Fourier features) can make them negative or zero.

    Numerical stabilization: exponents are formed in log space, and ``stabilizer`` subtracts a
    constant from them before ``exp`` -- ``"row"`` the max over each row's features, ``"all"`` the
    max over all rows and features of each ``(batch, head)``. This multiplies ``φ`` by a positive
    constant per row (``"row"``) or per head (``"all"``), which cancels in attention's
    normalization when used for queries (``"row"``) and keys (``"all"``), as
    :func:`performer_attention` does; ``None`` (default) returns the formula above exactly.

    Args:
        x: ``(..., T, d)``; for softmax attention pass ``q / d^{1/4}`` and ``k / d^{1/4}``.
        projection: ``W (m, d)``, e.g. from :func:`orthogonal_random_matrix`.
        kind: ``"positive"`` (FAVOR+, default) or ``"trig"``.
        stabilizer: ``None``, ``"row"`` or ``"all"``.

    Returns:
        ``(..., T, m)`` (``2m`` for ``"trig"``).

    Example::

        >>> import torch, attnkit.linear as L
        >>> W = L.orthogonal_random_matrix(4096, 3, torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> x, y = torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[0.1, 0.4, -0.3]])
        >>> est = L.performer_features(x.double(), W) @ L.performer_features(y.double(), W).T
        >>> abs(est.item() - torch.exp(x @ y.T).item()) < 0.02
        True
    """
    check_tensor("x", x)
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape (..., T, d); got shape {shape_str(x)}, "
                         f"dtype {x.dtype}")
    _check_projection(projection, x.shape[-1])
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid names: {', '.join(map(repr, KINDS))}")
    if stabilizer not in STABILIZERS:
        raise ValueError(f"unknown stabilizer {stabilizer!r}; valid: {', '.join(map(repr, STABILIZERS))}")
    cdt = _compute_dtype(x.dtype)
    return _performer_features(x.to(cdt), projection.to(cdt), kind, stabilizer).to(x.dtype)


def _check_projection(projection, dim: int) -> None:
    check_tensor("projection", projection, 2, "(num_features, D)")
    if projection.shape[1] != dim or projection.shape[0] == 0:
        raise ValueError(f"projection must have shape (num_features > 0, D = {dim}); got {shape_str(projection)}")
    if not projection.is_floating_point():
        raise TypeError(f"projection must be a floating-point tensor; got dtype {projection.dtype}")
    check_finite_tensor("projection", projection.detach())


def performer_attention(q: Tensor, k: Tensor, v: Tensor, num_features: int = 256, causal: bool = False,
                        generator: torch.Generator | None = None, projection: Tensor | None = None, *,
                        kind: str = "positive", key_padding=None, eps: float = 1e-6,
                        chunk_size: int | None = None) -> Tensor:
    r"""Performer attention, FAVOR+ (Choromanski et al. 2021, https://arxiv.org/abs/2009.14794):
    an unbiased random-feature approximation of ``softmax(q kᵀ / √D) v``.

    .. math::
        \hat q = q / D^{1/4},\ \hat k = k / D^{1/4},\qquad
        \mathrm{out}_i = \frac{\phi(\hat q_i)^\top \sum_j \phi(\hat k_j) v_j^\top}
                             {\phi(\hat q_i)^\top \sum_j \phi(\hat k_j) + \varepsilon}

    with :func:`performer_features` (``E[φ(x)·φ(y)] = exp(x·y)``, so ``φ(q̂)·φ(k̂)`` estimates
    ``exp(q·k/√D)``). The sums are computed as in :func:`linear_attention` (chunked prefix sums when
    ``causal``).

    Numerics: queries are stabilized per row and keys per head (max over the unpadded keys), and
    ``ε`` is rescaled by the same constants, so the result is exactly the formula above with
    unstabilized features. In particular (unlike the reference implementations, where ε couples
    each output to the largest key) a causal output does not depend on future keys, except through
    floating-point underflow when a future key's exponent exceeds a past key's by more than ~87
    (float32) or ~700 (float64).

    Error: the estimate is a ratio of Monte-Carlo averages; its error shrinks like ``1/√m`` once
    ``m`` is large against the variance of the features, which grows like ``exp(|q̂ + k̂|²)``: small
    query/key norms are easy, large ones need many more features. Measured (float64, mean over
    8 seeds, ``B = 2, H = 4, T = 32, D = 16``, ``v ~ N(0, 1)``), mean absolute error of the output
    against exact softmax attention:

    ======================  ========  ========  =========  ==========  ===================
    q, k entries            m = 16    m = 64    m = 256    m = 2048    mean abs of output
    ======================  ========  ========  =========  ==========  ===================
    ``N(0, 0.5²)``          0.065     0.032     0.018      0.0078      0.15
    ``N(0, 1)``             0.25      0.19      0.16       0.11        0.21
    ======================  ========  ========  =========  ==========  ===================

    The tests check the first row's trend: at ``m = 2048`` the error is below half of (in fact
    about a quarter of) the error at ``m = 64``, non-causal and causal.

    Args:
        q: ``(B, H, Tq, D)``.
        k: ``(B, Hkv, Tk, D)``.
        v: ``(B, Hkv, Tk, Dv)``.
        num_features: ``m > 0`` random features (ignored when ``projection`` is given).
        causal: query ``i`` sees keys ``j <= i + Tk - Tq`` only (chunked prefix sums).
        generator: draws the projection reproducibly (when ``projection`` is None).
        projection: a fixed ``W (m, D)`` (e.g. from :func:`orthogonal_random_matrix`, or a module's
            buffer) instead of a fresh draw.
        kind: ``"positive"`` (FAVOR+, default) or ``"trig"`` features.
        key_padding: as in :func:`linear_attention` (padded keys have no influence).
        eps: added to the (unstabilized) denominator.
        chunk_size: chunk length of the causal form.

    Returns:
        ``(B, H, Tq, Dv)``.

    Example::

        >>> import torch, attnkit, attnkit.linear as L
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8, dtype=torch.float64).unbind(0)
        >>> q, k = q / 2, k / 2
        >>> approx = L.performer_attention(q, k, v, num_features=1024, generator=torch.Generator().manual_seed(0))
        >>> (approx - attnkit.attention(q, k, v)).abs().mean().item() < 0.05
        True
    """
    _check_qkv(q, k, v)
    causal = _check_bool("causal", causal)
    eps = _check_eps(eps)
    chunk = _check_chunk(chunk_size)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid names: {', '.join(map(repr, KINDS))}")
    D = q.shape[-1]
    cdt = _compute_dtype(q.dtype)
    if projection is None:
        num_features = int(check_positive("num_features", num_features, integer=True))
        W = orthogonal_random_matrix(num_features, D, generator, dtype=cdt, device=q.device)
    else:
        _check_projection(projection, D)
        W = projection.to(dtype=cdt, device=q.device)
    keep = _keep_mask(key_padding, q.shape[0], k.shape[2], q.device)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    s = D ** -0.25
    kc, vc = _zero_padded(k.to(cdt), keep), _zero_padded(v.to(cdt), keep)
    fq, cq = _performer_features(q.to(cdt) * s, W, kind, "row", return_shift=True)        # cq (B, H, Tq, 1)
    fk, ck = _performer_features(kc * s, W, kind, "all", keep, return_shift=True)         # ck (B, Hkv, 1, 1)
    # The stabilizers scale numerator and denominator by exp(-cq_i - ck); scaling eps alike makes the
    # output exactly that of the unstabilized formula. Without it, eps would couple every output to the
    # largest key -- in causal mode, to *future* keys. The clamp only avoids inf where eps dominates anyway.
    ck = ck.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    eps_t = eps * torch.exp(torch.clamp(-(cq + ck), max=60.0)) if eps else eps
    out = _linear_core(fq, fk, vc, causal=causal, keep=keep, eps=eps_t, chunk=chunk)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Linformer
# ----------------------------------------------------------------------------------------------

def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, *, key_padding=None,
                        scale: float | None = None, dropout_p: float = 0.0, return_weights: bool = False,
                        backend: str = "auto", generator: torch.Generator | None = None):
    r"""Linformer attention (Wang et al. 2020, https://arxiv.org/abs/2006.04768): softmax attention
    over keys and values projected along the sequence.

    .. math::
        \mathrm{out} = \mathrm{softmax}\!\Big(\frac{q\,(E k)^\top}{\sqrt D}\Big)\,(F v),
        \qquad E, F \in \mathbb R^{P \times T_k}

    Cost ``O(Tq · P · D)`` instead of ``O(Tq · Tk · D)``. With ``E = F = I`` (``P = Tk``) this is exact
    softmax attention. The projected rows mix all positions, so there is no causal form.

    Key padding: padded keys and values are zeroed *before* the projection, so their content has no
    influence; this is not the same as attending over the unpadded keys only (each projected row
    is a fixed mix of positions, and the padded positions' share of it is simply zero).

    Args:
        q: ``(B, H, Tq, D)``.
        k: ``(B, Hkv, Tk, D)``.
        v: ``(B, Hkv, Tk, Dv)``.
        E: key projection ``(P, Tk)``.
        F: value projection ``(P, Tk)`` (pass ``E`` again to share them).
        key_padding: as in :func:`linear_attention`.
        scale, dropout_p, return_weights, backend, generator: as in :func:`attnkit.attention`
            (weights are ``(B, H, Tq, P)``: over projected rows, not keys).

    Returns:
        ``(B, H, Tq, Dv)``, or ``(out, weights)``.

    Example::

        >>> import torch, attnkit, attnkit.linear as L
        >>> q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
        >>> I = torch.eye(6)
        >>> torch.allclose(L.linformer_attention(q, k, v, I, I), attnkit.attention(q, k, v), atol=1e-6)
        True
    """
    from .functional import attention

    _check_qkv(q, k, v)
    Tk = k.shape[2]
    for name, P in (("E", E), ("F", F)):
        check_tensor(name, P, 2, "(proj_len, Tk)")
        if not P.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {P.dtype}")
        if P.shape[1] != Tk or P.shape[0] == 0:
            raise ValueError(f"{name} must have shape (proj_len > 0, Tk = {Tk}); got {shape_str(P)}")
        check_finite_tensor(name, P.detach())
    if E.shape[0] != F.shape[0]:
        raise ValueError(f"E and F must have the same proj_len (dim 0); got E {shape_str(E)}, F {shape_str(F)}")
    keep = _keep_mask(key_padding, q.shape[0], Tk, q.device)
    k, v = _zero_padded(k, keep), _zero_padded(v, keep)
    kp = E.to(k.dtype) @ k                                         # (B, Hkv, P, D)
    vp = F.to(v.dtype) @ v                                         # (B, Hkv, P, Dv)
    return attention(q, kp, vp, scale=scale, dropout_p=dropout_p, return_weights=return_weights,
                     backend=backend, generator=generator)


__all__ = ["linear_attention", "quadratic_linear_attention", "FEATURE_MAPS", "orthogonal_random_matrix",
           "performer_features", "performer_attention", "linformer_attention"]
