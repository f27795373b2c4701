"""covidx.evaluation.stats: F-test, McNemar, DeLong and compare_models against independent computations."""

import json

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from covidx.evaluation import stats as S


# --------------------------------------------------------------------------- F-test
def test_f_test_hand_computation():
    a = np.array([1.0, 2, 3, 4, 5])  # sample variance 2.5
    b = np.array([2.0, 4, 6, 8, 10, 12])  # sample variance 14
    r = S.f_test(a, b)
    f = 2.5 / 14
    assert r["statistic"] == pytest.approx(f)
    assert (r["df1"], r["df2"]) == (4, 5)
    assert r["p_value"] == pytest.approx(2 * sps.f.cdf(f, 4, 5))
    # two-sided: swapping the samples inverts F and keeps p
    swapped = S.f_test(b, a)
    assert swapped["statistic"] == pytest.approx(1 / f)
    assert swapped["p_value"] == pytest.approx(r["p_value"])
    assert swapped["p_value"] == pytest.approx(2 * sps.f.sf(1 / f, 5, 4))


def test_f_test_equal_and_different_spread():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 500)
    assert S.f_test(x, x + 3.0)["p_value"] == pytest.approx(1.0)  # shift only: same variance
    assert S.f_test(x, 3 * rng.normal(0, 1, 500))["p_value"] < 1e-10
    assert S.f_test(np.ones(5), np.ones(5)) == {"statistic": 1.0, "df1": 4, "df2": 4, "p_value": 1.0}
    assert S.f_test(x[:5], np.ones(5))["statistic"] is None
    with pytest.raises(ValueError):
        S.f_test([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------- McNemar
def test_mcnemar_agresti_worked_example():
    # Agresti, An Introduction to Categorical Data Analysis (2nd ed., 2007), Sec. 8.1, Table 8.1:
    # presidential approval of 1600 people in two surveys; 794 approve/approve, 150 approve/disapprove,
    # 86 disapprove/approve, 570 disapprove/disapprove. McNemar z = (86 - 150)/sqrt(236) = -4.17, z^2 = 17.36.
    table = [[794, 150], [86, 570]]
    r = S.mcnemar_test(table, exact=False, correction=False)
    assert r["statistic"] == pytest.approx(17.36, abs=0.005)
    assert np.sqrt(r["statistic"]) == pytest.approx(4.17, abs=0.005)
    assert r["p_value"] < 0.0001
    corrected = S.mcnemar_test(table)  # b + c = 236 >= 25: chi-square with continuity correction
    assert corrected["method"].startswith("chi-square")
    assert corrected["statistic"] == pytest.approx((64 - 1) ** 2 / 236)
    assert corrected["p_value"] == pytest.approx(sps.chi2.sf(63**2 / 236, 1))


def test_mcnemar_wikipedia_drug_example():
    # en.wikipedia.org/wiki/McNemar%27s_test, "Examples": before/after test results 101, 121, 59, 33;
    # chi^2 = (121 - 59)^2 / (121 + 59) = 21.35, p < 0.001.
    r = S.mcnemar_test([[101, 121], [59, 33]], exact=False, correction=False)
    assert r["statistic"] == pytest.approx(21.35, abs=0.01)
    assert r["p_value"] < 0.001


@pytest.mark.parametrize("b,c", [(1, 6), (0, 5), (7, 7), (3, 12), (10, 14)])
def test_mcnemar_exact_against_binomtest(b, c):
    r = S.mcnemar_test([[20, b], [c, 9]])
    assert r["method"] == "exact binomial"
    assert r["statistic"] == min(b, c)
    assert r["p_value"] == pytest.approx(sps.binomtest(min(b, c), b + c, 0.5).pvalue)
    assert r["p_value"] == pytest.approx(min(1.0, 2 * sum(sps.binom.pmf(i, b + c, 0.5) for i in range(min(b, c) + 1))))


def test_mcnemar_hand_value_and_degenerate_cases():
    assert S.mcnemar_test([[5, 1], [6, 5]])["p_value"] == pytest.approx(2 * 8 / 128)  # 2 * P(X <= 1), X ~ Bin(7, 1/2)
    assert S.mcnemar_test([[5, 0], [0, 5]])["p_value"] == 1.0
    assert S.mcnemar_test([[5, 0], [0, 5]], exact=False)["p_value"] == 1.0


def test_mcnemar_from_predictions():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    a = np.array([0, 1, 2, 0, 0, 0, 0, 1])  # wrong on 4, 5
    b = np.array([0, 2, 2, 1, 1, 2, 0, 0])  # wrong on 1, 3, 7
    table = S.mcnemar_table(y, a, b)
    assert table.tolist() == [[3, 3], [2, 0]]
    r = S.mcnemar(y, a, b)
    assert (r["b"], r["c"]) == (3, 2)


# --------------------------------------------------------------------------- DeLong
def _slow_delong(y, scores):
    """O(m n) DeLong (1988): Heaviside kernel over every positive/negative pair."""
    y = np.asarray(y).astype(bool)
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    cov = np.atleast_2d(np.cov(np.array(v10))) / m + np.atleast_2d(np.cov(np.array(v01))) / n
    return np.array(aucs), cov


def _binary_data(n=120, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = y * 1.0 + rng.normal(0, 1, n)
    b = y * 0.6 + 0.5 * a + rng.normal(0, 1, n)  # correlated with a
    if ties:
        a, b = np.round(a), np.round(b)
    return y, a, b


@pytest.mark.parametrize("ties", [False, True])
def test_delong_variance_matches_slow_reference(ties):
    y, a, b = _binary_data(ties=ties)
    aucs, cov = _slow_delong(y, [a, b])
    r = S.delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a)) and r["auc_a"] == pytest.approx(aucs[0])
    assert r["auc_b"] == pytest.approx(aucs[1])
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert r["variance"] == pytest.approx(var, rel=1e-10)
    assert r["z"] == pytest.approx((aucs[0] - aucs[1]) / np.sqrt(var))
    assert r["p_value"] == pytest.approx(2 * sps.norm.sf(abs(r["z"])))
    single = S.delong_auc_variance(y, a)
    assert single["variance"] == pytest.approx(cov[0, 0], rel=1e-10)
    assert single["ci"][0] < single["auc"] < single["ci"][1]


def test_delong_equal_and_different_aucs():
    y, a, b = _binary_data(n=300, seed=1)
    same = S.delong_test(y, a, np.exp(a))  # monotone transform: identical ranking, identical AUC
    assert same["difference"] == pytest.approx(0.0) and same["p_value"] == pytest.approx(1.0)
    noise = np.random.default_rng(5).normal(size=len(y))
    different = S.delong_test(y, a, noise)  # informative score vs noise
    assert different["auc_a"] > 0.7 and abs(different["auc_b"] - 0.5) < 0.1
    assert different["p_value"] < 1e-6
    flipped = S.delong_test(y, noise, a)
    assert flipped["z"] == pytest.approx(-different["z"]) and flipped["p_value"] == pytest.approx(different["p_value"])
    with pytest.raises(ValueError):
        S.delong_test([1, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_delong_macro_two_classes_equals_binary_test():
    y, a, b = _binary_data(n=150, seed=2)
    pa = np.stack([1 - sps.norm.cdf(a), sps.norm.cdf(a)], axis=1)
    pb = np.stack([1 - sps.norm.cdf(b), sps.norm.cdf(b)], axis=1)
    macro = S.delong_macro_test(y, pa, pb)
    binary = S.delong_test(y, pa[:, 1], pb[:, 1])
    for key in ("auc_a", "auc_b", "variance", "z", "p_value"):
        assert macro[key] == pytest.approx(binary[key], rel=1e-9)


def test_delong_macro_variance_is_calibrated_by_simulation():
    # Monte Carlo: the mean estimated Var(D) should match the spread of D over repeated test sets.
    rng = np.random.default_rng(0)
    k, per_class, reps = 3, 40, 400
    y = np.repeat(np.arange(k), per_class)
    diffs, variances = [], []
    for _ in range(reps):
        shared = rng.normal(0, 1, (len(y), k))
        la = 1.2 * np.eye(k)[y] + shared + 0.7 * rng.normal(0, 1, (len(y), k))
        lb = 0.8 * np.eye(k)[y] + shared + 0.7 * rng.normal(0, 1, (len(y), k))
        pa = np.exp(la) / np.exp(la).sum(axis=1, keepdims=True)
        pb = np.exp(lb) / np.exp(lb).sum(axis=1, keepdims=True)
        r = S.delong_macro_test(y, pa, pb)
        diffs.append(r["difference"])
        variances.append(r["variance"])
    ratio = np.mean(variances) / np.var(diffs, ddof=1)
    assert 0.8 < ratio < 1.25, ratio


# --------------------------------------------------------------------------- compare_models
def _three_models(n=240, absent=None, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    if absent is not None:
        y[y == absent] = (absent + 1) % 3
    out = {}
    for name, strength in [("m1", 1.5), ("m2", 0.5), ("m3", 1.4)]:
        logits = strength * np.eye(3)[y] + rng.normal(0, 1, (n, 3))
        out[name] = (y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return out


def test_compare_models_every_pair_consistent_with_single_tests():
    names = ["a", "b", "c"]
    results = _three_models()
    rows = S.compare_models(results, names)
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("m1", "m2"), ("m1", "m3"), ("m2", "m3")]
    y, p1 = results["m1"]
    _, p2 = results["m2"]
    row = rows[0]
    mc = S.mcnemar(y, p1.argmax(axis=1), p2.argmax(axis=1))
    assert row["mcnemar_p"] == pytest.approx(mc["p_value"]) and row["mcnemar_b"] == mc["b"]
    for c, cls in enumerate(names):
        assert row[f"f_{cls}_p"] == pytest.approx(S.f_test(p1[:, c], p2[:, c])["p_value"])
        assert row[f"delong_{cls}_p"] == pytest.approx(S.delong_test(y == c, p1[:, c], p2[:, c])["p_value"])
        assert row[f"auc_{cls}_a"] == pytest.approx(roc_auc_score(y == c, p1[:, c]))
    assert row["auc_macro_a"] == pytest.approx(roc_auc_score(y, p1, multi_class="ovr"))
    assert row["delong_macro_p"] < 0.01  # strong vs weak model
    json.dumps(rows, allow_nan=False)


def test_compare_models_absent_class_and_mismatch():
    results = _three_models(absent=2)
    rows = S.compare_models(results, ["a", "b", "c"])
    assert rows[0]["delong_c_p"] is None and rows[0]["auc_c_a"] is None
    assert rows[0]["delong_macro_p"] is not None
    json.dumps(rows, allow_nan=False)
    y, p = results["m2"]
    bad = dict(results, m2=(np.roll(y, 1), p))
    with pytest.raises(ValueError, match="different cases"):
        S.compare_models(bad, ["a", "b", "c"])
    with pytest.raises(ValueError):
        S.compare_models({"m1": results["m1"]}, ["a", "b", "c"])
