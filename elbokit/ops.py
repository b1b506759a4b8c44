"""Numerical building blocks shared by estimators: pairwise Gaussian log-densities and
row-wise log-sum-exp over them, computed by matrix products (no (M, M, L) tensor) and, for large
batches, in checkpointed row chunks so that memory stays linear in the batch size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOG_2PI = math.log(2 * math.pi)
DEFAULT_CHUNK = None
MAX_UNCHUNKED_PAIRS = 2**21
BLOCK_PAIRS = 2**24
"""Pairs per block when rows are chunked and no chunk is given: 64 MB of float32, 128 MB of
float64. Why not smaller: glibc's malloc serves blocks below its mmap threshold (which grows
to 32 MB as large blocks are freed) from the heap, and with autograd's small allocations in
between it kept every freed block resident: with 256-row blocks at M = 16384 the process's
resident memory grew by the whole (M, M) matrix 2.5 times over (2.6 GB, measured by
benchmarks/bench_estimator_memory.py) although torch's allocator never held more than a few
blocks. Blocks above 32 MB are always mmapped and returned to the system when freed."""


def _rows_per_block(chunk: int | None, m: int) -> int:
    if chunk is None:
        return max(1, BLOCK_PAIRS // max(m, 1))
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return int(chunk)


def _gaussian_factors(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(left, right, out_dtype) with left @ right.T = S of `pairwise_gaussian_log_density`,
    left (R, 2L + 1) and right (M, 2L + 1) in float64 (or wider), after centring."""
    out_dtype = z.dtype
    compute = torch.promote_types(torch.promote_types(z.dtype, loc.dtype), torch.float64)
    centre = loc.detach().to(compute).mean(0)
    z = z.to(compute) - centre
    loc = loc.to(compute) - centre
    scale = scale.to(compute)
    precision = scale.pow(-2)  # (M, L)
    loc_precision = loc * precision
    # The whole of S in one product: [z^2, z, 1] @ [-p/2, loc p, c]^T with the per-column
    # constant c = -(loc^2 p)/2 - sum log scale - (L/2) log 2 pi folded in as a last column,
    # so that no extra (R, M) passes are made.
    column_const = -0.5 * (loc * loc_precision).sum(-1) - scale.log().sum(-1) - 0.5 * loc.shape[-1] * LOG_2PI
    left = torch.cat([z * z, z, torch.ones_like(z[:, :1])], 1)  # (R, 2L + 1)
    right = torch.cat([-0.5 * precision, loc_precision, column_const[:, None]], 1)  # (M, 2L + 1)
    return left, right, out_dtype


def pairwise_gaussian_log_density(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S[i, j] = log N(z_i; loc_j, diag(scale_j^2)), shape (R, M) for z (R, L), loc/scale (M, L).

    Expands sum_l (z_il - mu_jl)^2 / s_jl^2 into three matrix products instead of building the
    (R, M, L) difference tensor: faster, and linear in memory.

    The expansion subtracts terms of size |z|^2 / s^2 to get a result of size 1, so in float32
    it loses about 1e-7 * |z|^2 / s^2 nats: 0.1 nat at |z| = 3, s = 0.01, and several nats at
    s = 1e-3, scales that trained posteriors reach. So z and loc are first shifted by a common
    (detached) centre, which leaves z - loc and the gradients unchanged, and the products are
    formed in float64; the result comes back in the input's dtype.
    """
    left, right, out_dtype = _gaussian_factors(z, loc, scale)
    return (left @ right.T).to(out_dtype)


CirculantLogWeights = tuple[float, dict[int, float]]
"""(base, {offset: value}): log w_ij = value where j = (i + offset) mod M, else base. The
weights of minibatch stratified sampling have this form (base log 1/(M-1), offset 0 log 1/N,
offset 1 the stratum), so they need O(1) memory instead of a dense (M, M) matrix."""


def _apply_circulant(s: torch.Tensor, circulant: CirculantLogWeights, offset: int) -> torch.Tensor:
    base, special = circulant
    rows = torch.arange(s.shape[0], device=s.device)
    s = s + base
    for shift, value in special.items():
        cols = (rows + offset + shift) % s.shape[1]
        # Out of place, so autograd keeps what it needs; only R entries change.
        s = s.index_put((rows, cols), s[rows, cols] + (value - base))
    return s


def _scores(left: torch.Tensor, right: torch.Tensor, factor: float, out_dtype: torch.dtype,
            diagonal: torch.Tensor | None, offset: int, log_w: torch.Tensor | None,
            circulant: CirculantLogWeights | None) -> torch.Tensor:
    """factor * left @ right.T in `out_dtype`, entry (r, offset + r) replaced by diagonal[r],
    plus the constant log weights: a fresh tensor (no autograd)."""
    s = left @ right.T
    if factor != 1.0:
        s.mul_(factor)
    s = s.to(out_dtype)
    if diagonal is not None:
        s.diagonal(offset=offset).copy_(diagonal)
    if log_w is not None:
        s.add_(log_w)
    if circulant is not None:
        s = _apply_circulant(s, circulant, offset)
    return s


def _logsumexp_rows_(s: torch.Tensor, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over dim 1 of s, and s overwritten by softmax(s) along dim 1 when `softmax`).

    Why not `torch.logsumexp`: on x86 CPUs `exp` of a number whose result underflows (below
    about -87 in float32, -708 in float64, the far pairs of every pairwise matrix) takes a slow
    path, about 40x slower per entry (measured: 12 ms against 0.4 ms for a 512 x 512 float32
    matrix with entries down to -300), and -inf is no faster. So after subtracting the row
    maximum the entries are clamped at LSE_FLOOR_MARGIN above log(smallest normal) (-57 in
    float32) before exp: each clamped entry then counts e^-57 (1.3e-25) of the row maximum's
    weight instead of less, which changes the sum of a row of M entries by at most M e^-57
    (2e-21 at M = 16384), far below the rounding of the result, and keeps the softmax and its
    products with gradients out of the subnormal range."""
    top = s.amax(1, keepdim=True)
    empty = top.isneginf()  # rows of -inf only: their value is -inf, as torch.logsumexp gives
    top = top.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # what masked_fill(~isfinite(top), 0) gives, in one op
    floor = math.log(torch.finfo(s.dtype).tiny) + LSE_FLOOR_MARGIN
    total = s.sub_(top).clamp_min_(floor).exp_().sum(1, keepdim=True)
    out = (total.log() + top).masked_fill(empty, -math.inf).squeeze(1)
    if softmax:
        s.div_(total)
    return out, s


LSE_FLOOR_MARGIN = 30.0


class _LogSumExpOfProduct(torch.autograd.Function):
    """out_r = logsumexp_j S_rj for S = `_scores(...)`, with a backward written out.

    Why by hand: autograd's backward of `logsumexp(diagonal_scatter((left @ right.T).to(f32)))`
    computes the softmax again and makes three (R, M) copies (the dtype change, the diagonal
    scatter, the float64 cast back), then takes G @ right and G.T @ left, a layout in which
    MKL multiplies an (R, M) matrix by a thin (M, 2L + 1) one 3-5x slower than the same product
    written as right.T @ G.T (measured at M = 512: 0.52 ms against 0.10 ms in float32). Here the
    forward keeps the softmax P = exp(S - out) it has already formed, and the backward is
    G = P * grad (diagonal moved to the diagonal's own gradient) and two products in the fast
    layout. The thin factor is made contiguous in its transposed layout first (a copy of
    (2L + 1) x M numbers): in float64 at M = 512 that took the two products from 0.70 and 0.53 ms
    to 0.57 and 0.46 ms. Constant log weights (no gradient) may be added to S; the values are
    those of the autograd form (tests/test_estimators.py compares values and gradients)."""

    @staticmethod
    def forward(ctx, left, right, diagonal, factor, out_dtype, offset, log_w, circulant):
        out, p = _logsumexp_rows_(_scores(left, right, factor, out_dtype, diagonal, offset, log_w, circulant),
                                  softmax=True)
        ctx.save_for_backward(left, right, p)
        ctx.factor, ctx.offset, ctx.has_diagonal = factor, offset, diagonal is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        left, right, p = ctx.saved_tensors
        g = p * grad[:, None]
        grad_diagonal = None
        if ctx.has_diagonal:
            band = g.diagonal(offset=ctx.offset)
            grad_diagonal = band.clone() if ctx.needs_input_grad[2] else None
            band.zero_()  # the replaced entries do not depend on left and right
        g = g.to(left.dtype)
        grad_left = grad_right = None
        if ctx.needs_input_grad[0]:
            grad_left = (right.T.contiguous() @ g.T).T
            if ctx.factor != 1.0:
                grad_left = grad_left * ctx.factor
        if ctx.needs_input_grad[1]:
            grad_right = (left.T.contiguous() @ g).T
            if ctx.factor != 1.0:
                grad_right = grad_right * ctx.factor
        return grad_left, grad_right, grad_diagonal, None, None, None, None, None


def _lse_product(left: torch.Tensor, right: torch.Tensor, factor: float, out_dtype: torch.dtype,
                 diagonal: torch.Tensor | None, offset: int, log_w: torch.Tensor | None,
                 circulant: CirculantLogWeights | None) -> torch.Tensor:
    if diagonal is not None:
        diagonal = diagonal.to(out_dtype)
    if log_w is not None and log_w.requires_grad:  # learned weights: autograd's form
        s = left @ right.T * factor
        s = s.to(out_dtype)
        if diagonal is not None:
            s = torch.diagonal_scatter(s, diagonal, offset=offset)
        s = s + log_w
        if circulant is not None:
            s = _apply_circulant(s, circulant, offset)
        return torch.logsumexp(s, dim=1)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (left, right, diagonal)):
        return _LogSumExpOfProduct.apply(left, right, diagonal, factor, out_dtype, offset, log_w, circulant)
    with torch.no_grad():
        return _logsumexp_rows_(_scores(left, right, factor, out_dtype, diagonal, offset, log_w, circulant),
                                softmax=False)[0]


class _LogSumExpGaussianMixture(torch.autograd.Function):
    """out_r = logsumexp_j log N(z_r; loc_j, scale_j^2) (entry (r, offset + r) replaced by
    diagonal[r], constant log weights added), differentiable in z, loc, scale and diagonal.

    The values are those of `_LogSumExpOfProduct` on `_gaussian_factors`; what changes is
    that the factors are built here without autograd and their gradients are written out.
    Why: autograd recorded some 25 small operations per call for the factors (casts to float64,
    centring, the precision, the column constant, two concatenations) and as many in the
    backward, about 0.3 ms of a 512-row `mws` entropy's 4-7 ms forward and backward on one
    loaded CPU thread (measured interleaved with the autograd form). With G = P * grad the
    softmax weights (replaced entries moved to the diagonal's gradient), A = G @ [-p/2, loc p, c]
    and B = G.T @ [z^2, z, 1] (p = scale^-2, all after centring, float64), the chain rule
    through S_rj = -(1/2) sum_l (z_rl - loc_jl)^2 p_jl - sum_l log scale_jl - (L/2) log 2 pi gives
        dz = 2 z A_z2 + A_z,   dloc = p (B_z - loc B_1),
        dscale = (p / scale) (B_z2 - 2 loc B_z + loc^2 B_1) - B_1 / scale,
    the same numbers autograd forms through the factors (tests/test_estimators.py compares
    values and gradients with the autograd form)."""

    @staticmethod
    def forward(ctx, z, loc, scale, diagonal, offset, log_w, circulant):
        out_dtype = z.dtype
        compute = torch.promote_types(torch.promote_types(z.dtype, loc.dtype), torch.float64)
        loc64 = loc.to(compute)
        centre = loc64.mean(0)
        z64 = z.to(compute) - centre
        loc64 = loc64 - centre
        scale64 = scale.to(compute)
        precision = scale64.pow(-2)
        loc_precision = loc64 * precision
        dim = z.shape[-1]
        column_const = (-0.5 * (loc64 * loc_precision).sum(-1) - scale64.log().sum(-1)) - 0.5 * dim * LOG_2PI
        left = torch.cat([z64 * z64, z64, torch.ones_like(z64[:, :1])], 1)
        right = torch.cat([-0.5 * precision, loc_precision, column_const[:, None]], 1)
        if diagonal is not None:
            diagonal = diagonal.to(out_dtype)
        out, p = _logsumexp_rows_(_scores(left, right, 1.0, out_dtype, diagonal, offset, log_w, circulant),
                                  softmax=True)
        ctx.save_for_backward(left, right, loc64, scale64, precision, p)
        ctx.offset, ctx.has_diagonal, ctx.dim = offset, diagonal is not None, dim
        ctx.dtypes = (z.dtype, loc.dtype, scale.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        left, right, loc64, scale64, precision, p = ctx.saved_tensors
        dim = ctx.dim
        g = p * grad[:, None]
        grad_diagonal = None
        if ctx.has_diagonal:
            band = g.diagonal(offset=ctx.offset)
            grad_diagonal = band.clone() if ctx.needs_input_grad[3] else None
            band.zero_()  # the replaced entries do not depend on z, loc and scale
        g = g.to(left.dtype)
        grad_z = grad_loc = grad_scale = None
        if ctx.needs_input_grad[0]:
            a = (right.T.contiguous() @ g.T).T  # the fast layout, see _LogSumExpOfProduct
            grad_z = (2.0 * left[:, dim:2 * dim] * a[:, :dim] + a[:, dim:2 * dim]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            b = (left.T.contiguous() @ g).T
            b_z2, b_z, b_1 = b[:, :dim], b[:, dim:2 * dim], b[:, 2 * dim:]
            if ctx.needs_input_grad[1]:
                grad_loc = (precision * (b_z - loc64 * b_1)).to(ctx.dtypes[1])
            if ctx.needs_input_grad[2]:
                inv_scale = scale64.reciprocal()
                grad_scale = (precision * inv_scale * (b_z2 - 2.0 * loc64 * b_z + loc64 * loc64 * b_1)
                              - b_1 * inv_scale).to(ctx.dtypes[2])
        return grad_z, grad_loc, grad_scale, grad_diagonal, None, None, None


def _lse_rows(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_w: torch.Tensor | None,
              diagonal: torch.Tensor | None, offset: int, circulant: CirculantLogWeights | None = None) -> torch.Tensor:
    # Row r of this chunk is row offset + r of the full matrix: its own component sits at
    # column offset + r, the diagonal of S shifted by `offset`.
    if ((log_w is None or not log_w.requires_grad) and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (z, loc, scale, diagonal))):
        return _LogSumExpGaussianMixture.apply(z, loc, scale, diagonal, offset, log_w, circulant)
    left, right, out_dtype = _gaussian_factors(z, loc, scale)
    return _lse_product(left, right, 1.0, out_dtype, diagonal, offset, log_w, circulant)


def logsumexp_gaussian_mixture(
    z: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    log_weights: torch.Tensor | None = None,
    chunk: int | None = DEFAULT_CHUNK,
    diagonal: torch.Tensor | None = None,
    max_unchunked: int = MAX_UNCHUNKED_PAIRS,
    circulant_log_weights: CirculantLogWeights | None = None,
) -> torch.Tensor:
    """out[i] = logsumexp_j (log_weights[i, j] + log N(z_i; loc_j, scale_j^2)), shape (R,).

    Up to `max_unchunked` pairs (R * M; the default 2^21 is 16 MB of float64, a batch of about
    1450) S is formed at once: that is faster, and small. Beyond it, rows are processed `chunk`
    at a time (None: as many as make `BLOCK_PAIRS` pairs) and, under autograd, each chunk is recomputed in backward (activation
    checkpointing) so that only (chunk, M) values live at once: memory linear in M.

    `log_weights` is a dense (R, M) tensor (memory quadratic in the batch);
    `circulant_log_weights` (see `CirculantLogWeights`) gives weights that depend only on
    (j - i) mod M for a few offsets and are constant elsewhere, in O(1) memory (R == M).

    `diagonal` (R,), for the square case where z_i was drawn from component i (R == M): the
    value to use for log N(z_i; loc_i, scale_i^2), typically `posterior.log_prob(z)`. The same
    number then enters both the sum and the caller's log q(z_i|x_i), so that
    out[i] >= diagonal[i] + log_weights[i, i] holds exactly in floating point (hence
    InfoNCE <= log K, and an MWS mutual information of at most log(N M) per example; it has no
    lower bound and can be negative, see docs/design.md).
    """
    chunk = _rows_per_block(chunk, loc.shape[0])
    if diagonal is not None and (z.shape[0] != loc.shape[0] or diagonal.shape != z.shape[:1]):
        raise ValueError("diagonal= needs as many rows in z as components, and one value per row")
    if circulant_log_weights is not None and z.shape[0] != loc.shape[0]:
        raise ValueError("circulant_log_weights= needs as many rows in z as components")
    if z.shape[0] * loc.shape[0] <= max_unchunked:
        chunk = max(z.shape[0], 1)
    outs = []
    for start in range(0, z.shape[0], chunk):
        stop = start + chunk
        lw = None if log_weights is None else log_weights[start:stop]
        dg = None if diagonal is None else diagonal[start:stop]
        zc = z[start:stop]
        needs_grad = any(t is not None and t.requires_grad for t in (zc, loc, scale, dg))
        if torch.is_grad_enabled() and needs_grad and chunk < z.shape[0]:
            outs.append(checkpoint(_lse_rows, zc, loc, scale, lw, dg, start, circulant_log_weights,
                                   use_reentrant=False))
        else:
            outs.append(_lse_rows(zc, loc, scale, lw, dg, start, circulant_log_weights))
    return torch.cat(outs) if outs else z.new_zeros(0)


def _lse_scores_rows(a: torch.Tensor, b: torch.Tensor, factor: float, diagonal: torch.Tensor | None,
                     offset: int) -> torch.Tensor:
    return _lse_product(a, b, float(factor), a.dtype, diagonal, offset, None, None)


def logsumexp_scores(a: torch.Tensor, b: torch.Tensor, factor: float = 1.0, chunk: int | None = DEFAULT_CHUNK,
                     diagonal: torch.Tensor | None = None,
                     max_unchunked: int = MAX_UNCHUNKED_PAIRS) -> torch.Tensor:
    """out[i] = logsumexp_j factor * (a_i . b_j), shape (R,), for a (R, D) and b (M, D).

    The same scheme as `logsumexp_gaussian_mixture`: the (R, M) score matrix whole up to
    `max_unchunked` pairs, else `chunk` rows (None: `BLOCK_PAIRS` pairs) at a time, each recomputed in backward, so that
    memory stays linear in M (a dense float32 matrix at M = 16384 alone is 1 GiB).
    `diagonal` (R == M) replaces entry (i, i), so that out[i] >= diagonal[i] exactly.
    """
    chunk = _rows_per_block(chunk, b.shape[0])
    if diagonal is not None and (a.shape[0] != b.shape[0] or diagonal.shape != a.shape[:1]):
        raise ValueError("diagonal= needs as many rows in a as in b, and one value per row")
    if a.shape[0] * b.shape[0] <= max_unchunked:
        chunk = max(a.shape[0], 1)
    outs = []
    for start in range(0, a.shape[0], chunk):
        ac = a[start:start + chunk]
        dg = None if diagonal is None else diagonal[start:start + chunk]
        needs_grad = any(t is not None and t.requires_grad for t in (ac, b, dg))
        if torch.is_grad_enabled() and needs_grad and chunk < a.shape[0]:
            outs.append(checkpoint(_lse_scores_rows, ac, b, factor, dg, start, use_reentrant=False))
        else:
            outs.append(_lse_scores_rows(ac, b, factor, dg, start))
    return torch.cat(outs) if outs else a.new_zeros(0)


class _PairedScoresLogSumExp(torch.autograd.Function):
    """(diag, lse) of the InfoNCE score matrix S = factor * a @ b.T with a, b the rows of z,
    z_pos (unit-normalised first when `normalize`, as F.normalize does): diag_i = S_ii computed
    as factor * (a_i . b_i) and put in S, lse_i = logsumexp_j S_ij, both differentiable.

    Why written out: the cosine critic through autograd was two `F.normalize` (norm, clamp,
    division, each with its backward), the diagonal's product and sum and the logsumexp's own
    Function, some 30 recorded operations around two (K, K) passes. Here the backward is
    G = P * grad_lse (P the softmax kept from the forward) with grad_diag added on the
    diagonal, da = factor G @ b, db = factor G.T @ a, then the normalisation's Jacobian
    (g - a (a . g)) / |z| (g / eps where |z| < eps, as F.normalize clamps). The same numbers
    as autograd's to float rounding (tests/test_estimators.py)."""

    @staticmethod
    def forward(ctx, z, z_pos, factor, normalize):
        eps = 1e-12  # F.normalize's default
        if normalize:
            norm_a = z.norm(dim=-1, keepdim=True)
            norm_b = z_pos.norm(dim=-1, keepdim=True)
            a, b = z / norm_a.clamp_min(eps), z_pos / norm_b.clamp_min(eps)
        else:
            a, b = z, z_pos
            norm_a = norm_b = None
        diag = (a * b).sum(-1) * factor
        if normalize and 0 < factor <= COSINE_SHIFT_MAX_FACTOR:
            # Cosine scores lie in [-factor, factor]: shifted by the constant factor instead of
            # the row maximum, every entry is in [-2 factor, 0] and exp cannot underflow, so
            # the row maximum, the clamp and their passes are not needed. lse >= diag holds
            # mathematically; the maximum restores it where rounding would break it.
            s = (a * factor) @ b.T
            s.diagonal().copy_(diag)
            total = s.sub_(factor).exp_().sum(1, keepdim=True)
            lse = torch.maximum(total.log().squeeze(1) + factor, diag)
            p = s.div_(total)
        else:
            lse, p = _logsumexp_rows_(_scores(a, b, factor, a.dtype, diag, 0, None, None), softmax=True)
        ctx.save_for_backward(a, b, p, norm_a, norm_b)
        ctx.factor, ctx.normalize, ctx.eps = factor, normalize, eps
        return diag, lse

    @staticmethod
    def backward(ctx, grad_diag, grad_lse):
        a, b, p, norm_a, norm_b = ctx.saved_tensors
        g = p * grad_lse[:, None] if grad_lse is not None else torch.zeros_like(p)
        if grad_diag is not None:
            g.diagonal().add_(grad_diag)
        grad_a = (b.T @ g.T).T  # the fast layout, see _LogSumExpOfProduct
        grad_b = (a.T @ g).T
        if ctx.factor != 1.0:
            grad_a, grad_b = grad_a * ctx.factor, grad_b * ctx.factor
        if ctx.normalize:
            grad_a = _normalize_backward(a, norm_a, grad_a, ctx.eps)
            grad_b = _normalize_backward(b, norm_b, grad_b, ctx.eps)
        return grad_a, grad_b, None, None


COSINE_SHIFT_MAX_FACTOR = 25.0
"""Up to this factor (temperature >= 0.04) the cosine scores are shifted by the constant
factor: exp then sees numbers >= -50, and the softmax (>= e^-50 / K, used up to K = 1448)
stays far above float32's subnormal range (1.2e-38), whose arithmetic is slow."""


def _normalize_backward(unit: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
    """The gradient through unit = x / max(|x|, eps) given the gradient at `unit`."""
    projected = (grad - unit * (unit * grad).sum(-1, keepdim=True)) / norm.clamp_min(eps)
    return torch.where(norm > eps, projected, grad / eps)


def paired_scores_logsumexp(z: torch.Tensor, z_pos: torch.Tensor, factor: float = 1.0, normalize: bool = False,
                            chunk: int | None = DEFAULT_CHUNK, max_unchunked: int = MAX_UNCHUNKED_PAIRS
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag, lse) for InfoNCE on pairs (z_i, z_pos_i): with a, b = z, z_pos (unit rows when
    `normalize`), diag_i = factor * (a_i . b_i) and lse_i = logsumexp_j factor * (a_i . b_j)
    with entry (i, i) equal to diag_i exactly, so that diag_i - lse_i <= 0 in floating point.

    Up to `max_unchunked` pairs in one written-out function (`_PairedScoresLogSumExp`);
    beyond, through `logsumexp_scores` in checkpointed row chunks (memory linear in K)."""
    if z.shape != z_pos.shape:
        raise ValueError("z and z_pos must have the same shape")
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or z_pos.requires_grad)
    if z.shape[0] * z_pos.shape[0] <= max_unchunked and needs_grad:
        return _PairedScoresLogSumExp.apply(z, z_pos, float(factor), bool(normalize))
    a, b = (F.normalize(z, dim=-1), F.normalize(z_pos, dim=-1)) if normalize else (z, z_pos)
    diag = (a * b).sum(-1) * factor
    return diag, logsumexp_scores(a, b, factor, chunk=chunk, diagonal=diag, max_unchunked=max_unchunked)


def log_unit_ball_volume(d: int) -> float:
    """log of the volume of the unit ball in R^d: pi^(d/2) / Gamma(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


KNN_BLOCK_PAIRS = 1 << 19
"""(query, reference) pairs whose squared distances are formed at once by `kth_neighbour_distance`:
4 MB of float64, so memory stays linear in the number of points."""


def kth_neighbour_distance(query: torch.Tensor, ref: torch.Tensor, k: int, *, exclude_self: bool = False,
                           block_pairs: int = KNN_BLOCK_PAIRS) -> torch.Tensor:
    """rho_i, the Euclidean distance from query row i to its k-th nearest row of `ref`, shape (R,);
    differentiable in both (the gradient of ||query_i - ref_j|| for the selected j).

    With `exclude_self` (query is ref, the entropy case) row i is not its own neighbour.

    Why not `torch.cdist(query, ref).topk(...)`: cdist takes the matrix-product path
    ||a||^2 + ||b||^2 - 2 a.b, which in float32 cancels catastrophically when the points lie far
    from the origin relative to their spread (offset 10, spread 0.01: rho off by orders of
    magnitude, the entropy by tens of nats), and it holds the whole (R, M) matrix for backward.
    Here the neighbours are *found* without gradient, in blocks of rows whose squared distances
    are formed in float64 after centring both sets on the reference mean (so memory is linear in
    M and the expansion cancels nothing that matters), and the distance to the selected neighbour
    is then *computed* as the norm of the direct difference query_i - ref_j, which is exact to
    the rounding of the inputs and carries the gradient.
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r, m = query.shape[0], ref.shape[0]
    if m - int(exclude_self) < k:
        raise ValueError(f"need more than k={k} reference points, got {m}")
    with torch.no_grad():
        compute = torch.promote_types(torch.promote_types(query.dtype, ref.dtype), torch.float64)
        centre = ref.detach().to(compute).mean(0)
        ref_c = ref.detach().to(compute) - centre
        # ||q||^2 + ||r||^2 - 2 q.r as one product [q, ||q||^2, 1] @ [-2 r, 1, ||r||^2]^T: a single
        # pass over each (rows, M) block.
        right = torch.cat([-2.0 * ref_c, torch.ones_like(ref_c[:, :1]), ref_c.pow(2).sum(-1, keepdim=True)], 1)
        rows = max(1, int(block_pairs) // max(m, 1))
        index = torch.empty(r, dtype=torch.long, device=query.device)
        for start in range(0, r, rows):
            q = query[start:start + rows].detach().to(compute) - centre
            d2 = torch.cat([q, q.pow(2).sum(-1, keepdim=True), torch.ones_like(q[:, :1])], 1) @ right.T
            if exclude_self:
                d2.diagonal(offset=start).fill_(math.inf)
            index[start:start + rows] = d2.topk(int(k), dim=1, largest=False).indices[:, -1]
    diff = query - ref[index]
    # sqrt of a clamped square: a zero distance (a duplicate point) has a zero gradient, not NaN.
    return diff.pow(2).sum(-1).clamp_min(torch.finfo(diff.dtype).tiny).sqrt()
