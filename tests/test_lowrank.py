"""Tests of edgetrain.lowrank: the streaming Kronecker-sum accumulator (SKS/OK) and MaxNorm."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.lowrank import MaxNorm, StreamingKroneckerSum
from edgetrain.lowrank._kernels import _svd, min_variance_mixing


def _rel(est: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(est - exact) / np.linalg.norm(exact))


def _low_rank_terms(rng: np.random.Generator, n: int, m: int, k: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """t terms whose dz lie in a k-dim subspace of R^n and a in a k-dim subspace of R^m."""
    dz = rng.normal(size=(t, k)) @ rng.normal(size=(k, n))
    a = rng.normal(size=(t, k)) @ rng.normal(size=(k, m))
    return dz, a


def _decaying_terms(rng: np.random.Generator, n: int, m: int, t: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Coherent terms: E[dz a^T] = sum_k decay^(2k) u_k v_k^T, a decaying spectrum."""
    k = min(n, m)
    u = np.linalg.qr(rng.normal(size=(n, k)))[0]
    v = np.linalg.qr(rng.normal(size=(m, k)))[0]
    g = rng.normal(size=(t, k)) * decay ** np.arange(k)
    return g @ u.T, g @ v.T


def _mean_and_var(dz: np.ndarray, a: np.ndarray, runs: int, **kw: object) -> tuple[np.ndarray, np.ndarray]:
    ests = []
    for seed in range(runs):
        acc = StreamingKroneckerSum(dz.shape[1], a.shape[1], seed=seed, **kw)
        acc.add(dz, a)
        ests.append(acc.estimate())
    ests = np.stack(ests)
    return ests.mean(0), ests.var(0, ddof=1)


# --- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("chunk", [1, 4])
def test_rank_le_r_sum_is_reproduced_exactly(unbiased: bool, chunk: int) -> None:
    rng = np.random.default_rng(0)
    dz, a = _low_rank_terms(rng, 40, 30, 3, 60)
    acc = StreamingKroneckerSum(40, 30, rank=3, unbiased=unbiased, factor_bits=None, chunk=chunk, seed=1)
    acc.add(dz, a)
    assert acc.count == 60 and acc.skipped == 0
    assert _rel(acc.estimate(), dz.T @ a) < 1e-5


def test_one_side_in_span_is_folded_exactly_and_not_gated() -> None:
    # a lives in a 2-dim subspace, dz is arbitrary: the sum has rank <= 2. Once the a-basis is full,
    # every a-residual is zero: the term adds no new direction pair and must not be dropped.
    rng = np.random.default_rng(1)
    dz = rng.normal(size=(50, 20))
    a = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 15))
    acc = StreamingKroneckerSum(20, 15, rank=2, factor_bits=None, seed=0)
    acc.add(dz, a)
    assert acc.skipped == 0
    assert _rel(acc.estimate(), dz.T @ a) < 1e-5


def test_sixteen_bit_factors_are_quantized_and_close() -> None:
    rng = np.random.default_rng(2)
    dz, a = _low_rank_terms(rng, 40, 30, 2, 20)
    acc = StreamingKroneckerSum(40, 30, rank=2, unbiased=False)
    acc.add(dz, a)
    for basis in (acc._ql[:2], acc._qr[:2]):  # stored bases: integer multiples of max|Q| / (2^15 - 1)
        steps = basis / (np.abs(basis).max() / (2**15 - 1))
        assert np.abs(steps - np.round(steps)).max() < 1e-2
    assert 1e-7 < _rel(acc.estimate(), dz.T @ a) < 1e-3


# --- biased: close to the optimal truncation ---------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 8])
def test_biased_error_close_to_optimal_truncation(chunk: int) -> None:
    rng = np.random.default_rng(3)
    dz, a = _decaying_terms(rng, 64, 48, 400, decay=0.7)
    exact = dz.T @ a
    sv = np.linalg.svd(exact, compute_uv=False)
    optimal = float(np.sqrt((sv[4:] ** 2).sum()) / np.linalg.norm(exact))
    acc = StreamingKroneckerSum(64, 48, rank=4, unbiased=False, kappa_th=None, chunk=chunk)
    acc.add(dz, a)
    err = _rel(acc.estimate(), exact)
    assert optimal <= err <= 1.08 * optimal, (err, optimal)


def test_gate_project_mode_beats_skip_on_a_long_coherent_stream() -> None:
    rng = np.random.default_rng(4)
    dz, a = _decaying_terms(rng, 64, 48, 400, decay=0.7)
    errs = {}
    for gate in ("skip", "project"):
        acc = StreamingKroneckerSum(64, 48, rank=4, unbiased=False, gate=gate)
        acc.add(dz, a)
        errs[gate] = _rel(acc.estimate(), dz.T @ a)
        assert acc.skipped > 200  # c_x[0] grows with the sum: the gate fires on most late terms
    assert errs["project"] < 0.3 < 0.8 < errs["skip"]


# --- unbiased: the mean over seeds converges to the exact sum ---------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
def test_unbiased_mean_converges_to_exact_sum(chunk: int) -> None:
    rng = np.random.default_rng(5)
    dz, a = rng.normal(size=(12, 8)), rng.normal(size=(12, 6))
    exact = dz.T @ a
    runs = 400
    kw = dict(rank=2, kappa_th=None, factor_bits=None, chunk=chunk)
    mean, var = _mean_and_var(dz, a, runs, unbiased=True, **kw)
    # Single run: large variance (full-rank isotropic data), reported for reference.
    single_rel_std = float(np.sqrt(var.sum()) / np.linalg.norm(exact))
    assert 0.3 < single_rel_std < 3.0
    # ||mean - exact||^2 ~ sum(var) / runs for an unbiased estimator; allow 2x (chi-square, 48 dof).
    z = float(((mean - exact) ** 2).sum() / (var.sum() / runs))
    assert z < 2.0, (z, single_rel_std)
    # The same statistic rejects the biased (top-r) estimator: the test has power.
    biased, _ = _mean_and_var(dz, a, 2, unbiased=False, **kw)
    assert float(((biased - exact) ** 2).sum() / (var.sum() / runs)) > 20.0


def test_chunked_and_per_term_agree_in_expectation() -> None:
    rng = np.random.default_rng(6)
    dz, a = rng.normal(size=(16, 8)), rng.normal(size=(16, 6))
    kw = dict(rank=2, kappa_th=None, factor_bits=None, unbiased=True)
    m1, v1 = _mean_and_var(dz, a, 300, chunk=1, **kw)
    m8, v8 = _mean_and_var(dz, a, 300, chunk=8, **kw)
    z = float(((m1 - m8) ** 2).sum() / ((v1.sum() + v8.sum()) / 300))
    assert z < 2.0
    assert v8.sum() < v1.sum()  # folding 8 terms at once throws away less per term


@settings(max_examples=40, deadline=None)
@given(
    sigma=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=7),
    r_frac=st.floats(0.0, 1.0),
)
def test_min_variance_mixing_is_unbiased_and_orthonormal(sigma: list[float], r_frac: float) -> None:
    s = np.sort(np.asarray(sigma))[::-1].copy()
    s[0] += 1.0
    q = s.shape[0]
    r = 1 + int(r_frac * (q - 2))
    total = np.zeros((q, q))
    patterns = list(itertools.product([-1.0, 1.0], repeat=q))
    for signs in patterns:
        t, cx = min_variance_mixing(s, r, np.asarray(signs))
        np.testing.assert_allclose(t.T @ t, np.eye(r), atol=1e-9)
        assert np.all(cx >= 0) and np.all(np.diff(cx[: r - 1]) <= 1e-12 * s[0])
        total += t @ np.diag(cx) @ t.T
    np.testing.assert_allclose(total / len(patterns), np.diag(s), atol=1e-9 * s[0])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12), st.integers(0, 2**32 - 1))
def test_small_jacobi_svd(q: int, rank: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(q, min(rank, q))) @ rng.normal(size=(min(rank, q), q)) * 10 ** rng.normal()
    u, s, vt = _svd(c)
    scale = max(np.abs(c).max(), 1e-300)
    assert np.abs(u @ np.diag(s) @ vt - c).max() <= 1e-13 * scale
    np.testing.assert_allclose(vt @ vt.T, np.eye(q), atol=1e-13)
    keep = s > 1e-12 * max(s[0], 1e-300)
    np.testing.assert_allclose(u[:, keep].T @ u[:, keep], np.eye(int(keep.sum())), atol=1e-12)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, np.linalg.svd(c, compute_uv=False), atol=1e-13 * scale)


# --- numerics over long runs -------------------------------------------------------------------------


@pytest.mark.parametrize("factor_bits, tol", [(None, 1e-5), (16, 1e-3)])
def test_bases_stay_orthonormal_over_thousands_of_steps(factor_bits: int | None, tol: float) -> None:
    rng = np.random.default_rng(7)
    acc = StreamingKroneckerSum(64, 48, rank=4, factor_bits=factor_bits, kappa_th=None, seed=0)
    acc.add(rng.normal(size=(3000, 64)), rng.normal(size=(3000, 48)))
    left, right = acc.factors()  # L = Q_L diag(sqrt c_x), R = Q_R diag(sqrt c_x)
    for f in (left, right):
        g = f.T @ f
        d = np.sqrt(np.diag(g))
        assert np.abs(g / np.outer(d, d) - np.eye(4)).max() < tol
    np.testing.assert_allclose(np.linalg.norm(left, axis=0), np.linalg.norm(right, axis=0), rtol=tol)


# --- kappa gate ------------------------------------------------------------------------------------


def test_kappa_gate_skips_the_whole_term() -> None:
    e = np.eye(6)
    acc = StreamingKroneckerSum(6, 6, rank=2, unbiased=False, kappa_th=100.0, factor_bits=None)
    acc.add(10 * e[0], 10 * e[0])  # c_x[0] = 100
    acc.add(e[0] + 0.99 * e[1], e[0] + e[1])  # residual product 0.99: 100 > 99 -> skipped, in-span part too
    assert (acc.count, acc.skipped) == (1, 1)
    np.testing.assert_allclose(acc.estimate(), 100 * np.outer(e[0], e[0]), atol=1e-4)
    acc.add(1.02 * e[2], e[2])  # 100 > 102 is false -> folded
    assert (acc.count, acc.skipped) == (2, 1)
    np.testing.assert_allclose(acc.estimate(), 100 * np.outer(e[0], e[0]) + 1.02 * np.outer(e[2], e[2]), atol=1e-4)


def test_kappa_gate_disabled_and_project_mode() -> None:
    e = np.eye(6)
    big, small = (10 * e[0], 10 * e[0]), (e[0] + 0.5 * e[1], e[0] + 0.5 * e[1])
    off = StreamingKroneckerSum(6, 6, rank=2, unbiased=False, kappa_th=None, factor_bits=None)
    proj = StreamingKroneckerSum(6, 6, rank=2, unbiased=False, gate="project", factor_bits=None)
    for acc in (off, proj):
        acc.add(*big)
        acc.add(*small)
    assert off.skipped == 0 and proj.skipped == 1 and proj.count == 2
    np.testing.assert_allclose(off.estimate(), np.outer(*big) + np.outer(*small), atol=1e-4)
    np.testing.assert_allclose(proj.estimate(), 101 * np.outer(e[0], e[0]), atol=1e-4)


# --- edge cases and errors ----------------------------------------------------------------------------


def test_zero_vectors_and_repeated_terms() -> None:
    acc = StreamingKroneckerSum(5, 4, rank=2, factor_bits=None, seed=0)
    acc.add(np.zeros(5), np.ones(4))
    acc.add(np.ones(5), np.zeros(4))
    assert acc.count == 2 and not np.any(acc.estimate())
    left, right = acc.factors()
    assert left.shape == (5, 2) and right.shape == (4, 2) and np.isfinite(left).all()
    dz, a = np.arange(5.0), np.arange(4.0) + 1
    for _ in range(3):  # in the span after the first: residual norm exactly 0
        acc.add(dz, a)
    assert acc.skipped == 0 and np.isfinite(acc.factors()[0]).all()
    np.testing.assert_allclose(acc.estimate(), 3 * np.outer(dz, a), rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_raises_and_leaves_state(bad: float) -> None:
    acc = StreamingKroneckerSum(5, 4, rank=2, chunk=2, seed=0)
    acc.add(np.ones(5), np.ones(4))
    before = acc.estimate()
    dz = np.ones((3, 5))
    dz[2, 1] = bad
    with pytest.raises(ValueError, match=r"dz holds NaN or inf \(row 2\)"):
        acc.add(dz, np.ones((3, 4)))
    a = np.ones(4)
    a[0] = bad
    with pytest.raises(ValueError, match=r"a holds NaN or inf \(row 0\)"):
        acc.add(np.ones(5), a)
    assert acc.count == 1 and acc.pending == 0
    np.testing.assert_array_equal(acc.estimate(), before)


@pytest.mark.parametrize(
    "dz_shape, a_shape",
    [((6,), (4,)), ((5,), (3,)), ((2, 5), (3, 4)), ((5,), (1, 4)), ((2, 2, 5), (2, 2, 4))],
)
def test_shape_mismatch_raises_with_expected_and_got(dz_shape: tuple, a_shape: tuple) -> None:
    acc = StreamingKroneckerSum(5, 4)
    with pytest.raises(ValueError, match=r"expected .* got dz.shape="):
        acc.add(np.ones(dz_shape), np.ones(a_shape))


def test_constructor_validation() -> None:
    for kw in (dict(rank=0), dict(chunk=0), dict(factor_bits=1), dict(kappa_th=0.0), dict(gate="drop")):
        with pytest.raises(ValueError):
            StreamingKroneckerSum(5, 4, **kw)


# --- API behaviour -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
def test_batched_and_per_term_adds_are_identical(chunk: int) -> None:
    rng = np.random.default_rng(8)
    dz, a = rng.normal(size=(20, 9)), rng.normal(size=(20, 7))
    one = StreamingKroneckerSum(9, 7, rank=3, chunk=chunk, seed=3)
    one.add(dz, a)
    rows = StreamingKroneckerSum(9, 7, rank=3, chunk=chunk, seed=3)
    rows.add(dz[:5], a[:5])
    for t in range(5, 20):
        rows.add(dz[t], a[t])
    assert rows.pending == 20 % chunk
    for x, y in zip(one.factors(), rows.factors(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert rows.pending == 0 and rows.count == 20


def test_seed_reproducibility_and_torch_input() -> None:
    rng = np.random.default_rng(9)
    dz, a = rng.normal(size=(30, 9)).astype(np.float32), rng.normal(size=(30, 7)).astype(np.float32)
    ests = []
    for seed, conv in ((1, np.asarray), (1, torch.from_numpy), (2, np.asarray)):
        acc = StreamingKroneckerSum(9, 7, rank=2, seed=seed)
        acc.add(conv(dz), conv(a))
        ests.append(acc.estimate())
    np.testing.assert_array_equal(ests[0], ests[1])
    assert not np.allclose(ests[0], ests[2])


def test_state_dict_resumes_bit_exactly() -> None:
    rng = np.random.default_rng(10)
    dz, a = rng.normal(size=(30, 9)), rng.normal(size=(30, 7))
    ref = StreamingKroneckerSum(9, 7, rank=2, chunk=4, seed=5)
    ref.add(dz, a)
    first = StreamingKroneckerSum(9, 7, rank=2, chunk=4, seed=5)
    first.add(dz[:13], a[:13])
    resumed = StreamingKroneckerSum(9, 7, rank=2, chunk=4, seed=99)
    resumed.load_state_dict(first.state_dict())
    resumed.add(dz[13:], a[13:])
    np.testing.assert_array_equal(resumed.estimate(), ref.estimate())
    with pytest.raises(ValueError, match="expected shape"):
        StreamingKroneckerSum(9, 8, rank=2, chunk=4).load_state_dict(first.state_dict())


def test_reset_and_memory() -> None:
    acc = StreamingKroneckerSum(256, 4096, rank=4)
    acc.add(np.ones(256), np.ones(4096))
    acc.reset()
    assert acc.count == 0 and not np.any(acc.estimate())
    assert acc.aux_memory_bits() == 4 * (256 + 4096) * 16 + 32 * 4 + 64
    assert StreamingKroneckerSum(256, 4096, rank=4, factor_bits=None, chunk=8).aux_memory_bits() == (
        4 * (256 + 4096) * 32 + 32 * 4 + 7 * (256 + 4096) * 8
    )


# --- MaxNorm -------------------------------------------------------------------------------------------


def test_maxnorm_closed_form() -> None:
    beta, eps = 0.999, 1e-4
    mn = MaxNorm(beta, eps)
    x1 = np.array([2.0, -4.0])
    mv = beta * eps + (1 - beta) * (4 + eps)  # state starts at x_mv = eps
    np.testing.assert_allclose(mn(x1), x1 / max(4 + eps, mv / (1 - beta)))
    x2 = np.array([0.5, 0.25])  # smaller than the running max: divided by the EMA, not by 0.5
    mv = beta * mv + (1 - beta) * (0.5 + eps)
    np.testing.assert_allclose(mn(x2), x2 / (mv / (1 - beta**2)))
    assert np.abs(mn(x2)).max() < 1.0


def test_maxnorm_constant_stream_and_torch() -> None:
    mn = MaxNorm()
    x = torch.tensor([3.0, -1.0])
    for _ in range(50):
        y = mn(x)
    assert isinstance(y, torch.Tensor)
    # x_mv starts at eps, so after k steps the corrected EMA is beta^k eps / (1 - beta^k) + 3 + eps.
    bk = 0.999**50
    torch.testing.assert_close(y, x / (bk * 1e-4 / (1 - bk) + 3.0 + 1e-4))
    mn.reset()
    assert mn.step == 0 and float(mn(np.zeros(3)).max()) == 0.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20), st.integers(1, 5))
def test_maxnorm_output_is_bounded(values: list[float], reps: int) -> None:
    mn = MaxNorm()
    x = np.asarray(values)
    for _ in range(reps):
        assert np.abs(mn(x)).max() <= 1.0
