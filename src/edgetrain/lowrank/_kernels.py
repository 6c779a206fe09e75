"""Numba kernels of the streaming optimal Kronecker-sum (SKS/OK) accumulator.

One implementation serves the per-term path (chunk = 1, q = r + 1, LRT v1 App. A Algorithm 1) and the
chunked path (chunk = c, q = r + c, Benzing et al. 2019 OK on q terms). Bases are stored as rows
(``Q[i]`` is basis vector i) so that every dot product and axpy runs over contiguous memory.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Fast-math flags that allow vectorised reductions but keep NaN/inf semantics (no 'nnan'/'ninf').
_FM = {"reassoc", "contract", "nsz", "arcp"}

#: A residual is "in the span" (treated as exactly zero) when ||res|| <= tol ||x||, with
#: tol = max(SPAN_TOL, s sqrt(r n)): float32 Gram-Schmidt leaves about 1e-7 ||x|| of an in-span
#: vector, and a basis quantized with step s is off its exact values by at most s sqrt(r n) / 2 in
#: Frobenius norm, which leaves at most s sqrt(r n) ||x|| (first order).
SPAN_TOL = 1e-5
#: Gram-Schmidt is repeated once ("twice is enough") when ||res|| < REORTH * ||x||.
REORTH = 1e-2


@njit(cache=True, fastmath=_FM)
def _first_nonfinite(x: np.ndarray) -> int:
    """Index of the first row of the 2-D array ``x`` holding NaN or inf, or -1."""
    zero = np.float32(0.0)
    for t in range(x.shape[0]):
        row = x[t]
        acc = zero
        for e in range(row.shape[0]):
            acc += row[e] * zero  # NaN iff some element is NaN or inf
        if acc != zero or acc != acc:
            return t
    return -1


@njit(cache=True, fastmath=_FM)
def _project(basis: np.ndarray, nb: int, src: np.ndarray, x: np.ndarray, coef: np.ndarray) -> tuple[float, float]:
    """x = src; coef[:nb] = basis[:nb] x; return (||x||, sqrt(max(||x||^2 - ||coef||^2, 0))).

    The second value is the residual norm by Pythagoras (exact for an orthonormal basis); it is
    trusted only when it is not a small difference of large numbers (>= REORTH ||x||).
    """
    xx = np.float32(0.0)
    for e in range(x.shape[0]):
        v = src[e]
        x[e] = v
        xx += v * v
    cc = 0.0
    if nb > 0:
        np.dot(basis[:nb], x, coef[:nb])
        for i in range(nb):
            cc += float(coef[i]) * float(coef[i])
    xx64 = np.float64(xx)
    return math.sqrt(xx64), math.sqrt(max(xx64 - cc, 0.0))


@njit(cache=True, fastmath=_FM)
def _subtract(basis: np.ndarray, nb: int, x: np.ndarray, coef: np.ndarray, x0: float, tol: float) -> float:
    """x <- x - basis[:nb]^T coef in place; return ||x||.

    Classical Gram-Schmidt; when more than 99% of x lay in the span the projection is repeated
    once (CGS2, "twice is enough") and coef accumulates both passes. A residual below
    tol ||x|| is set to exactly zero: the term lies in the kept span.
    """
    n = x.shape[0]
    corr = coef[:nb].copy()
    res = 0.0
    for sweep in range(2):
        for i in range(nb - 1):
            row = basis[i]
            c = corr[i]
            for e in range(n):
                x[e] -= c * row[e]
        xx = np.float32(0.0)
        if nb > 0:
            row = basis[nb - 1]
            c = corr[nb - 1]
            for e in range(n):
                v = x[e] - c * row[e]
                x[e] = v
                xx += v * v
        else:
            for e in range(n):
                xx += x[e] * x[e]
        res = math.sqrt(np.float64(xx))
        if res >= REORTH * x0 or sweep == 1:
            break
        np.dot(basis[:nb], x, corr)
        for i in range(nb):
            coef[i] += corr[i]
    if res <= tol * x0:
        for e in range(n):
            x[e] = 0.0
        return 0.0
    return res


@njit(cache=True)
def _absmax(x: np.ndarray) -> float:
    """max |x| over a C-contiguous 2-D float32 array of finite values.

    For finite IEEE floats, |x| orders like the integer x_bits & 0x7fffffff, and the integer max
    reduction vectorises where the float one does not (about 10x faster here).
    """
    bits = x.view(np.int32)
    mask = np.int32(0x7FFFFFFF)
    m = np.int32(0)
    for j in range(bits.shape[0]):
        row = bits[j]
        for e in range(row.shape[0]):
            v = row[e] & mask
            m = v if v > m else m
    out = np.empty(1, np.int32)
    out[0] = m
    return out.view(np.float32)[0]


@njit(cache=True)
def _carry_frame(w: np.ndarray, d: int) -> np.ndarray:
    """Rows y_i in R^d with ||y_i||^2 = w_i and sum_i y_i y_i^T = I_d (needs 0 <= w_i <= 1, sum w = d).

    Chan-Li style construction: a carry vector (squared norm ``a``) is split, or rotated against a
    fresh unit direction, so that every emitted row gets exactly its target norm; the last row takes
    the carry (plus the last direction if still unused, which happens when its target is 1). Each
    step is a plane rotation, so sum_i y_i y_i^T = I_d is preserved. For d = 1 it returns the
    column y = sqrt(w) (the x0 vector of LRT v1 eq. 7).
    """
    n = w.shape[0]
    y = np.zeros((n, d))
    carry = np.zeros(d)
    carry[0] = 1.0
    a = 1.0
    fresh = 1
    for i in range(n - 1):
        wi = w[i]
        if wi <= a or fresh >= d:
            s = math.sqrt(min(wi / a, 1.0)) if a > 0.0 else 0.0
            c = math.sqrt(max(1.0 - s * s, 0.0))
            for e in range(d):
                y[i, e] = s * carry[e]
                carry[e] *= c
            a = max(a - wi, 0.0)
        else:
            s2 = (1.0 - wi) / (1.0 - a)
            s = math.sqrt(min(max(s2, 0.0), 1.0))
            c = math.sqrt(max(1.0 - s2, 0.0))
            for e in range(d):
                y[i, e] = s * carry[e]
                carry[e] *= c
            y[i, fresh] = c
            carry[fresh] = -s
            fresh += 1
            a = a + 1.0 - wi
    if fresh < d:  # then the last target is 1 and the carry is empty: it takes the unused direction
        carry[fresh] = 1.0
    for e in range(d):
        y[n - 1, e] = carry[e]
    return y


@njit(cache=True)
def _householder_complement(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis X (N x (N-d)) of the orthogonal complement of the columns of y (N x d).

    Householder QR of y: Q = H_1 ... H_d, X = Q[:, d:]. For d = 1 and ||y|| = 1 this is the
    reflection with v = y - e_1 of LRT v1 §4.4.2 (up to the stable sign choice).
    """
    n, d = y.shape
    r = y.copy()
    vs = np.zeros((d, n))
    for j in range(d):
        nrm = 0.0
        for i in range(j, n):
            nrm += r[i, j] * r[i, j]
        nrm = math.sqrt(nrm)
        alpha = -nrm if r[j, j] >= 0.0 else nrm
        for i in range(j, n):
            vs[j, i] = r[i, j]
        vs[j, j] -= alpha
        vn = 0.0
        for i in range(j, n):
            vn += vs[j, i] * vs[j, i]
        if vn > 0.0:
            for col in range(j, d):
                dot = 0.0
                for i in range(j, n):
                    dot += vs[j, i] * r[i, col]
                f = 2.0 * dot / vn
                for i in range(j, n):
                    r[i, col] -= f * vs[j, i]
            for i in range(j, n):
                vs[j, i] /= math.sqrt(vn)
    x = np.zeros((n, n - d))
    for i in range(n - d):
        x[d + i, i] = 1.0
    for j in range(d - 1, -1, -1):
        for col in range(n - d):
            dot = 0.0
            for i in range(j, n):
                dot += vs[j, i] * x[i, col]
            for i in range(j, n):
                x[i, col] -= 2.0 * dot * vs[j, i]
    return x


@njit(cache=True, fastmath=_FM)
def _svd(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD c = u diag(s) vt of the small square core, s descending.

    One-sided Jacobi (Hestenes): rotate pairs of columns of c until they are orthogonal,
    accumulating the rotations in vt; accurate to working precision. Measured against numba's LAPACK
    call: 1.8 vs 4.3 us at q = 5, 22 vs 36 us at q = 16, 260 vs 210 us at q = 40. Columns of u for
    singular values that are exactly 0 are left 0 (they only ever get weight 0).
    """
    q = c.shape[0]
    # Columns count as orthogonal when |<a_p, a_k>| <= q eps ||a_p|| ||a_k||, the rounding error of
    # the dot product itself: a tighter bound is unreachable and would keep rotating forever.
    tol = q * 2.3e-16
    a = c.T.copy()  # row j = column j of c
    vt = np.eye(q)  # row j = column j of v
    for _ in range(40):
        rotated = False
        for p in range(q - 1):
            ap = a[p]
            vp = vt[p]
            for k in range(p + 1, q):
                ak = a[k]
                vk = vt[k]
                alpha = 0.0
                beta = 0.0
                gamma = 0.0
                for i in range(q):
                    alpha += ap[i] * ap[i]
                    beta += ak[i] * ak[i]
                    gamma += ap[i] * ak[i]
                if abs(gamma) <= tol * math.sqrt(alpha * beta):
                    continue
                rotated = True
                zeta = (beta - alpha) / (2.0 * gamma)
                t = math.copysign(1.0, zeta) / (abs(zeta) + math.sqrt(1.0 + zeta * zeta))
                cs = 1.0 / math.sqrt(1.0 + t * t)
                sn = cs * t
                for i in range(q):
                    x = ap[i]
                    ap[i] = cs * x - sn * ak[i]
                    ak[i] = sn * x + cs * ak[i]
                    y = vp[i]
                    vp[i] = cs * y - sn * vk[i]
                    vk[i] = sn * y + cs * vk[i]
        if not rotated:
            break
    norms = np.empty(q)
    for j in range(q):
        acc = 0.0
        for i in range(q):
            acc += a[j, i] * a[j, i]
        norms[j] = math.sqrt(acc)
    order = np.arange(q)  # selection sort by descending norm (q is small; np.argsort compiles slowly)
    for j in range(q):
        best = j
        for i in range(j + 1, q):
            if norms[order[i]] > norms[order[best]]:
                best = i
        order[j], order[best] = order[best], order[j]
    u = np.zeros((q, q))
    s = np.empty(q)
    v_sorted = np.empty((q, q))
    for j in range(q):
        o = order[j]
        s[j] = norms[o]
        inv = 1.0 / s[j] if s[j] > 0.0 else 0.0
        for i in range(q):
            u[i, j] = a[o, i] * inv
            v_sorted[j, i] = vt[o, i]
    return u, s, v_sorted


@njit(cache=True)
def _truncation(sigma: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Biased rank-r reduction of diag(sigma): T = I[:, :r], cx = sigma[:r]."""
    t = np.zeros((sigma.shape[0], r))
    cx = np.empty(r)
    for i in range(r):
        t[i, i] = 1.0
        cx[i] = sigma[i]
    return t, cx


@njit(cache=True)
def min_variance_mixing(sigma: np.ndarray, r: int, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-variance unbiased rank-r estimate of diag(sigma) (LRT v1 §4.4.2 eq. 7; Benzing et al.).

    sigma: q descending singular values (q > r). Returns (T, cx): T (q x r) with orthonormal columns
    and cx (r) such that E_signs[T diag(cx) T^T] = diag(sigma). With 1-based i:
    m = min i with (r - i + 1) sigma_i <= sum_{j>=i} sigma_j, k = r - m + 1, s1 = sum_{j>=m} sigma_j;
    sigma_1..sigma_{m-1} are kept, sigma_m..sigma_q are mixed into k slots of weight s1/k by
    X (rows with squared norms p_j = sigma_j k / s1, orthonormal columns) with an independent random
    sign per row. X is the Householder complement of the frame y (||y_j||^2 = 1 - p_j); for
    q = r + 1 that is the x0 / Householder construction of the paper.
    """
    q = sigma.shape[0]
    tail = np.zeros(q + 1)
    for i in range(q - 1, -1, -1):
        tail[i] = tail[i + 1] + sigma[i]
    m = r - 1
    for i in range(r):
        if (r - i) * sigma[i] <= tail[i] * (1.0 + 1e-12):
            m = i
            break
    k = r - m
    s1 = tail[m]
    if s1 <= 0.0:  # nothing to mix: the top-r truncation is exact
        return _truncation(sigma, r)
    n_mix = q - m
    w = np.empty(n_mix)
    for j in range(n_mix):
        p = sigma[m + j] * k / s1
        w[j] = 1.0 - min(max(p, 0.0), 1.0)
    # Renormalise so that sum(w) = q - r exactly despite the clipping above.
    tot = 0.0
    for j in range(n_mix):
        tot += w[j]
    if tot > 0.0:
        for j in range(n_mix):
            w[j] = min(w[j] * (q - r) / tot, 1.0)
    x = _householder_complement(_carry_frame(w, q - r))
    t = np.zeros((q, r))
    cx = np.empty(r)
    for i in range(m):
        t[i, i] = 1.0
        cx[i] = sigma[i]
    for j in range(n_mix):
        for c in range(k):
            t[m + j, m + c] = signs[j] * x[j, c]
    for c in range(k):
        cx[m + c] = s1 / k
    return t, cx


@njit(cache=True, fastmath=_FM)
def _scale(x: np.ndarray, norm: float) -> None:
    """x <- x / norm (no-op for norm 0)."""
    if norm > 0.0:
        f = np.float32(1.0 / norm)
        for e in range(x.shape[0]):
            x[e] *= f


@njit(cache=True, fastmath=_FM)
def _rotate_quantize(q: np.ndarray, qa: int, w: np.ndarray, t: np.ndarray, levels: float) -> float:
    """q[:r] <- (w t)^T q[:qa] with w (qa x qa), t (qa x r); re-quantize q[:r]; return the step.

    The product goes through the scratch rows q[-r:]. Quantization (LRT v1 App. C; reference code):
    scale = max|Q| / levels, Q <- floor(Q/scale + 1/2) * scale; levels = 2^(b-1) - 1 for b-bit
    factors, 0 disables it.
    """
    r = t.shape[1]
    n = q.shape[1]
    mix = np.zeros((r, qa), q.dtype)  # (W T)^T
    for j in range(r):
        for i in range(qa):
            acc = 0.0
            for k in range(qa):
                acc += w[i, k] * t[k, j]
            mix[j, i] = acc
    out = q[q.shape[0] - r :]
    np.dot(mix, q[:qa], out)
    amax = _absmax(out)
    quantize = levels > 0.0 and amax > 0.0
    scale = np.float32(amax / levels) if quantize else np.float32(1.0)
    inv = np.float32(levels / amax) if quantize else np.float32(1.0)
    half = np.float32(0.5)
    for j in range(r):
        o = out[j]
        dst = q[j]
        if quantize:
            for e in range(n):
                dst[e] = np.floor(o[e] * inv + half) * scale
        else:
            for e in range(n):
                dst[e] = o[e]
    return scale if quantize else 0.0


@njit(cache=True)
def _step(
    ql: np.ndarray,
    qr: np.ndarray,
    cx: np.ndarray,
    qstep: np.ndarray,
    dz: np.ndarray,
    a: np.ndarray,
    t0: int,
    t1: int,
    unbiased: bool,
    kappa: float,
    project: bool,
    levels: float,
    signs: np.ndarray,
    stats: np.ndarray,
) -> None:
    """One SKS/OK step: fold rows t0..t1-1 of dz (T x n_out), a (T x n_in) at once (LRT v1 §4.6, App. A).

    1. each term is Gram-Schmidt'ed against the kept basis and the step's earlier new directions;
       its normalised residuals become new basis rows, its coefficients a row of G_L, G_R (the
       residual norm in its new slot);
    2. kappa gate (LRT v1 App. H): if cx[0] > kappa ||a_res|| ||dz_res||, both nonzero, skip the
       term (``project`` False, the paper) or keep only its in-span part (``project`` True); a
       term in the kept span on either side adds no ill-conditioned direction and is not gated;
    3. C = G_L^T G_R + diag(cx, 0) (qa x qa, qa <= r + c), SVD C = U S V^T;
    4. rank qa -> r: top r (biased) or minimum-variance mixing (unbiased, random signs);
    5. Q_L <- Q_L U T, Q_R <- Q_R V T, re-quantized.
    """
    r = cx.shape[0]
    nt = t1 - t0
    qmax = r + nt
    tol_l = max(SPAN_TOL, qstep[0] * math.sqrt(r * ql.shape[1]))
    tol_r = max(SPAN_TOL, qstep[1] * math.sqrt(r * qr.shape[1]))
    gl = np.zeros((nt, qmax), ql.dtype)
    gr = np.zeros((nt, qmax), qr.dtype)
    nb = r
    j = 0
    for t in range(t0, t1):
        xl = ql[nb]
        xr = qr[nb]
        norm_l, nl = _project(ql, nb, dz[t], xl, gl[j])
        norm_r, nr = _project(qr, nb, a[t], xr, gr[j]) if norm_l > 0.0 else (0.0, 0.0)
        if norm_l == 0.0 or norm_r == 0.0:
            gl[j] = 0.0
            gr[j] = 0.0
            stats[0] += 1  # a zero term adds nothing
            continue
        # Pythagoras gives the residual norms for the gate unless they are small differences.
        exact_l = nl < max(REORTH, tol_l) * norm_l
        exact_r = nr < max(REORTH, tol_r) * norm_r
        if exact_l:
            nl = _subtract(ql, nb, xl, gl[j], norm_l, tol_l)
        if exact_r:
            nr = _subtract(qr, nb, xr, gr[j], norm_r, tol_r)
        if nl > 0.0 and nr > 0.0 and cx[0] > kappa * nl * nr:
            stats[1] += 1
            if not project:
                gl[j] = 0.0
                gr[j] = 0.0
                continue
            nl = 0.0  # gate='project': keep the term's in-span part, drop its residual
            nr = 0.0
        else:
            if not exact_l:
                nl = _subtract(ql, nb, xl, gl[j], norm_l, tol_l)
            if not exact_r:
                nr = _subtract(qr, nb, xr, gr[j], norm_r, tol_r)
        stats[0] += 1
        if nl > 0.0 or nr > 0.0:
            gl[j, nb] = nl
            gr[j, nb] = nr
            _scale(xl, nl)
            _scale(xr, nr)
            nb += 1
        j += 1
    if j == 0:
        return
    qa = nb
    c = np.zeros((qa, qa))
    for i in range(r):
        c[i, i] = cx[i]
    for s in range(j):
        for p in range(qa):
            gp = float(gl[s, p])
            if gp != 0.0:
                for v in range(qa):
                    c[p, v] += gp * gr[s, v]
    u, sig, vt = _svd(c)
    if unbiased and qa > r and sig[r] > 1e-15 * sig[0]:
        rot, new_cx = min_variance_mixing(sig, r, signs[stats[2] : stats[2] + qa])
    else:
        rot, new_cx = _truncation(sig, r)
    if unbiased:
        stats[2] += qmax
    qstep[0] = _rotate_quantize(ql, qa, u, rot, levels)
    qstep[1] = _rotate_quantize(qr, qa, np.ascontiguousarray(vt.T), rot, levels)
    for i in range(r):
        cx[i] = new_cx[i]


@njit(cache=True)
def _copy_rows(dst: np.ndarray, d0: int, src: np.ndarray, s0: int, count: int) -> None:
    """dst[d0 : d0 + count] = src[s0 : s0 + count] for 2-D arrays."""
    for i in range(count):
        d = dst[d0 + i]
        s = src[s0 + i]
        for e in range(d.shape[0]):
            d[e] = s[e]


@njit(cache=True)
def stream(
    ql: np.ndarray,
    qr: np.ndarray,
    cx: np.ndarray,
    qstep: np.ndarray,
    pend_dz: np.ndarray,
    pend_a: np.ndarray,
    dz: np.ndarray,
    a: np.ndarray,
    unbiased: bool,
    kappa: float,
    project: bool,
    levels: float,
    flush: bool,
    signs: np.ndarray,
    stats: np.ndarray,
) -> int:
    """Fold the rows of dz (T x n_out), a (T x n_in) in order, c = pend_dz.shape[0] terms per step.

    State: ql (2r + c x n_out), qr (2r + c x n_in): rows 0..r-1 the kept bases (Q_L^T, Q_R^T),
    the rest scratch; cx (r) the weights; qstep (2) the quantization steps of the two bases (0: not
    quantized); pend_dz, pend_a (c rows) the terms waiting for a full chunk; stats (int64) = [terms
    folded, terms skipped by the gate, next position in ``signs``, pending terms]. ``flush`` also
    folds an incomplete pending chunk.
    Returns -1, or 2 t + side (side 0: dz, 1: a) for the first row t holding NaN/inf, in which
    case nothing was changed.
    """
    bad = _first_nonfinite(dz)
    if bad >= 0:
        return 2 * bad
    bad = _first_nonfinite(a)
    if bad >= 0:
        return 2 * bad + 1
    c = pend_dz.shape[0]
    zero = np.int64(0)  # int64 variables, not literals: one specialisation of _step and _copy_rows
    t = zero
    n = dz.shape[0]
    p = stats[3]
    if p > 0:
        take = min(c - p, n)
        _copy_rows(pend_dz, p, dz, t, take)
        _copy_rows(pend_a, p, a, t, take)
        p += take
        t = take
        if p == c:
            _step(ql, qr, cx, qstep, pend_dz, pend_a, zero, c, unbiased, kappa, project, levels, signs, stats)
            p = 0
    while n - t >= c:
        _step(ql, qr, cx, qstep, dz, a, t, t + c, unbiased, kappa, project, levels, signs, stats)
        t += c
    rest = n - t
    _copy_rows(pend_dz, p, dz, t, rest)
    _copy_rows(pend_a, p, a, t, rest)
    p += rest
    if flush and p > 0:
        _step(ql, qr, cx, qstep, pend_dz, pend_a, zero, p, unbiased, kappa, project, levels, signs, stats)
        p = 0
    stats[3] = p
    return -1
