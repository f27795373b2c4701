"""Significance tests for comparing two models evaluated on the same cases.

* :func:`f_test` — the cascade paper's F-test on the models' output
  distributions per class (Cascade-SEME, Med. Phys. 2021, section 5.B, Figs. 12
  and 17);
* :func:`mcnemar` / :func:`mcnemar_test` — McNemar's test on paired
  correct/incorrect decisions (statsmodels conventions);
* :func:`delong_test` / :func:`delong_macro_test` — DeLong's test for two
  correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988) computed with the fast
  midrank algorithm of Sun & Xu (IEEE SPL 21(11), 2014);
* :func:`compare_models` — all of them for every pair of models.

Undefined results are ``None`` so every row is strict JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
from scipy import stats as sps

from covidx.evaluation.metrics import _check_classification_inputs

# Below this many discordant pairs McNemar uses the exact binomial test (the usual
# rule of thumb, e.g. mlxtend / Fagerland et al. 2013: the chi-square approximation
# needs b + c >= 25).
MCNEMAR_EXACT_BELOW = 25


# --------------------------------------------------------------------------- F-test (cascade paper 5.B)
def f_test(n1, n2) -> dict:
    """Two-sample F-test of equal variances, ``F = Ftest(N1, N2)`` of the cascade paper (5.B).

    The paper compares, for each class, the *output distributions* of two
    models: ``N_i`` is model i's output for that class over the test images
    (see :func:`compare_models`). It names only "the F-test" on two
    distributions; the F-test on two samples is the variance-ratio test
    (MATLAB ``vartest2``, Excel ``F.TEST``), implemented here:

        F = s1^2 / s2^2,   s_j^2 = 1/(n_j - 1) * sum_i (x_ji - mean_j)^2,
        F ~ F(n1 - 1, n2 - 1) under H0: sigma1^2 = sigma2^2,
        p = 2 * min(P(F' <= F), P(F' >= F))   (two-sided, capped at 1).

    The test treats the two samples as independent although the outputs are
    paired on the same images; it asks whether a structural change altered
    the spread of the model's responses, as in the paper. Use
    :func:`delong_test` / :func:`mcnemar` for paired accuracy comparisons.

    Returns ``{"statistic", "df1", "df2", "p_value"}``; ``statistic`` is ``None``
    when ``s2^2 = 0 < s1^2`` (p = 0), and F = 1, p = 1 when both variances are 0.
    """
    n1 = np.asarray(n1, dtype=np.float64).ravel()
    n2 = np.asarray(n2, dtype=np.float64).ravel()
    if n1.size < 2 or n2.size < 2:
        raise ValueError("the F-test needs at least 2 values per sample")
    df1, df2 = n1.size - 1, n2.size - 1
    v1, v2 = n1.var(ddof=1), n2.var(ddof=1)
    if v2 == 0:
        statistic, p = (1.0, 1.0) if v1 == 0 else (None, 0.0)
    else:
        statistic = float(v1 / v2)
        dist = sps.f(df1, df2)
        p = float(min(1.0, 2.0 * min(dist.cdf(statistic), dist.sf(statistic))))
    return {"statistic": statistic, "df1": int(df1), "df2": int(df2), "p_value": p}


# --------------------------------------------------------------------------- McNemar
def mcnemar_table(y_true, y_pred_a, y_pred_b) -> np.ndarray:
    """2x2 table of paired decisions: rows model A correct/wrong, columns model B correct/wrong."""
    y_true = np.asarray(y_true)
    a = np.asarray(y_pred_a) == y_true
    b = np.asarray(y_pred_b) == y_true
    return np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)


def mcnemar_test(table, exact: bool | None = None, correction: bool = True) -> dict:
    """McNemar's test on a 2x2 paired table ``[[a, b], [c, d]]`` (only b and c matter).

    Same conventions as ``statsmodels.stats.contingency_tables.mcnemar``:

    * exact: statistic = min(b, c), p = min(1, 2 * Binom(b + c, 1/2).cdf(min(b, c)))
      (the two-sided exact binomial test);
    * chi-square: statistic = (|b - c| - 1)^2 / (b + c) with continuity correction
      (``(b - c)^2 / (b + c)`` without), p = P(chi2_1 >= statistic).

    ``exact=None`` picks the exact test when b + c < 25 (:data:`MCNEMAR_EXACT_BELOW`).
    With no discordant pairs the models are indistinguishable: p = 1.
    """
    table = np.asarray(table)
    if table.shape != (2, 2):
        raise ValueError(f"McNemar needs a 2x2 table, got shape {table.shape}")
    b, c = int(table[0, 1]), int(table[1, 0])
    n = b + c
    if exact is None:
        exact = n < MCNEMAR_EXACT_BELOW
    if exact:
        statistic = float(min(b, c))
        p = 1.0 if n == 0 else float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), n, 0.5)))
        method = "exact binomial"
    else:
        if n == 0:
            statistic, p = 0.0, 1.0
        else:
            diff = abs(b - c) - (1 if correction else 0)
            statistic = float(max(diff, 0) ** 2 / n)
            p = float(sps.chi2.sf(statistic, 1))
        method = "chi-square, continuity-corrected" if correction else "chi-square"
    return {"statistic": statistic, "p_value": p, "b": b, "c": c, "method": method}


def mcnemar(y_true, y_pred_a, y_pred_b, exact: bool | None = None, correction: bool = True) -> dict:
    """McNemar's test that models A and B have the same accuracy on the same cases.

    ``b`` counts cases only A classifies correctly, ``c`` those only B does.
    """
    return mcnemar_test(mcnemar_table(y_true, y_pred_a, y_pred_b), exact=exact, correction=correction)


# --------------------------------------------------------------------------- DeLong
def _structural_components(positive: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong structural components of R score vectors, by midranks (Sun & Xu 2014).

    ``scores`` is (R, N). With m positives X and n negatives Y, midranks T_Z
    over all cases, T_X within positives and T_Y within negatives give

        AUC = (sum_i T_Z(X_i) - m(m+1)/2) / (m n),
        V10(X_i) = (T_Z(X_i) - T_X(X_i)) / n,      (fraction of negatives below X_i)
        V01(Y_j) = 1 - (T_Z(Y_j) - T_Y(Y_j)) / m,  (fraction of positives above Y_j)

    with ties counted 1/2. Returns ``auc`` (R,) and ``v`` (R, N) holding V10 at
    positive and V01 at negative positions.
    """
    m, n = int(positive.sum()), int((~positive).sum())
    t_z = sps.rankdata(scores, axis=1)
    t_x = sps.rankdata(scores[:, positive], axis=1)
    t_y = sps.rankdata(scores[:, ~positive], axis=1)
    auc = (t_z[:, positive].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v = np.empty_like(t_z)
    v[:, positive] = (t_z[:, positive] - t_x) / n
    v[:, ~positive] = 1.0 - (t_z[:, ~positive] - t_y) / m
    return auc, v


def _influence(positive: np.ndarray, auc: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-case contribution (V - AUC) / group size, whose sum of squares builds the DeLong variance."""
    m, n = positive.sum(), (~positive).sum()
    return (v - auc[:, None]) / np.where(positive, m, n)[None, :]


def _grouped_variance(psi: np.ndarray, groups: np.ndarray) -> float | None:
    """Var(sum_k psi_k) for cases drawn independently within ``groups``:

        sum_g n_g / (n_g - 1) * sum_{k in g} (psi_k - mean_g psi)^2.

    For one AUC with groups = {positives, negatives} this is exactly DeLong's
    S10 / m + S01 / n. ``None`` when a group has fewer than 2 cases.
    """
    total = 0.0
    for g in np.unique(groups):
        values = psi[groups == g]
        if values.size < 2:
            return None
        total += values.size / (values.size - 1) * np.sum((values - values.mean()) ** 2)
    return float(total)


def _z_test(diff: float, var: float | None) -> tuple[float | None, float | None]:
    if var is None:
        return None, None
    if var <= 1e-15:  # both models rank identically up to a constant: no spread to test against
        return (0.0, 1.0) if abs(diff) < 1e-12 else (None, 0.0)
    z = diff / np.sqrt(var)
    return float(z), float(2.0 * sps.norm.sf(abs(z)))


def _check_binary(y_true) -> np.ndarray:
    positive = np.asarray(y_true).astype(bool).ravel()
    if positive.sum() < 2 or (~positive).sum() < 2:
        raise ValueError("DeLong needs at least 2 positive and 2 negative cases")
    return positive


def delong_auc_variance(y_true, y_score) -> dict:
    """AUC, its DeLong variance and 95% CI (normal approximation, clipped to [0, 1])."""
    positive = _check_binary(y_true)
    scores = np.asarray(y_score, dtype=np.float64).reshape(1, -1)
    auc, v = _structural_components(positive, scores)
    var = _grouped_variance(_influence(positive, auc, v)[0], positive)
    half = 1.959963984540054 * np.sqrt(var)
    ci = [float(max(0.0, auc[0] - half)), float(min(1.0, auc[0] + half))]
    return {"auc": float(auc[0]), "variance": var, "ci": ci}


def delong_test(y_true, y_score_a, y_score_b) -> dict:
    """DeLong's test of H0: AUC_A = AUC_B for two scores of the same cases (binary ``y_true``).

        z = (AUC_A - AUC_B) / sqrt(Var),  Var = L S L^T,  L = [1, -1],
        S = S10 / m + S01 / n,  S10, S01 = covariance (ddof 1) of the V10 / V01 components,

    p = 2 (1 - Phi(|z|)). Returns ``{"auc_a", "auc_b", "difference", "variance", "z", "p_value"}``.
    """
    positive = _check_binary(y_true)
    scores = np.vstack([np.asarray(y_score_a, np.float64).ravel(), np.asarray(y_score_b, np.float64).ravel()])
    auc, v = _structural_components(positive, scores)
    phi = _influence(positive, auc, v)
    var = _grouped_variance(phi[0] - phi[1], positive)
    diff = float(auc[0] - auc[1])
    z, p = _z_test(diff, var)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": diff, "variance": var, "z": z, "p_value": p}


def delong_macro_test(y_true, y_prob_a, y_prob_b) -> dict:
    """DeLong-type test of equal macro (mean one-vs-rest) AUC for two K-class models.

    The macro AUC difference D = 1/K' sum_c (AUC_c,A - AUC_c,B) runs over the
    K' classes with at least one positive and one negative case. Its variance
    comes from the same structural components as the per-class test: each case
    k contributes psi_k = 1/K' sum_c (phi_c,A(k) - phi_c,B(k)) with
    phi_c(k) = (V_c(k) - AUC_c) / (size of k's side in class c's split), and
    cases are independent within each true class, so

        Var(D) = sum_g n_g/(n_g - 1) sum_{k in class g} (psi_k - mean_g psi)^2.

    With two classes this equals :func:`delong_test` exactly. Classes with
    fewer than 2 cases make the variance undefined (``None``).
    """
    y_true = np.asarray(y_true).ravel()
    y_prob_a = np.asarray(y_prob_a, np.float64)
    y_prob_b = np.asarray(y_prob_b, np.float64)
    classes = [c for c in range(y_prob_a.shape[1]) if 0 < np.sum(y_true == c) < len(y_true)]
    if not classes:
        return {"auc_a": None, "auc_b": None, "difference": None, "variance": None, "z": None, "p_value": None}
    psi = np.zeros(len(y_true))
    aucs = np.zeros(2)
    for c in classes:
        positive = y_true == c
        auc, v = _structural_components(positive, np.vstack([y_prob_a[:, c], y_prob_b[:, c]]))
        phi = _influence(positive, auc, v)
        psi += (phi[0] - phi[1]) / len(classes)
        aucs += auc / len(classes)
    var = _grouped_variance(psi, y_true)
    diff = float(aucs[0] - aucs[1])
    z, p = _z_test(diff, var)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "variance": var, "z": z, "p_value": p}


# --------------------------------------------------------------------------- all pairs
def compare_models(results: Mapping[str, tuple], class_names: Sequence[str]) -> list[dict]:
    """Every pair of models on the same test cases: F-test per class, McNemar, DeLong per class and macro.

    ``results`` maps a model name to ``(y_true, y_prob)``; all models must be
    evaluated on the same cases in the same order (the tests are paired).
    One flat row per pair (CSV-ready), in the order of ``results``:

        model_a, model_b, n, accuracy_a, accuracy_b,
        mcnemar_b, mcnemar_c, mcnemar_statistic, mcnemar_p, mcnemar_method,
        f_<class>_statistic, f_<class>_p                         (cascade paper 5.B),
        auc_<class>_a, auc_<class>_b, delong_<class>_z, delong_<class>_p,
        auc_macro_a, auc_macro_b, delong_macro_z, delong_macro_p

    The F-test for class c compares column c of the two probability arrays
    (each model's output distribution for that class over all test images).
    DeLong values of a class without 2 positive and 2 negative cases are ``None``.
    """
    if len(results) < 2:
        raise ValueError("compare_models needs at least two models")
    checked = {}
    reference = None
    for name, (y_true, y_prob) in results.items():
        y_true, y_prob = _check_classification_inputs(y_true, y_prob, class_names)
        if reference is None:
            reference = y_true
        elif not np.array_equal(reference, y_true):
            raise ValueError(f"model {name!r} was evaluated on different cases (y_true differs)")
        checked[name] = y_prob
    y_true = reference
    rows = []
    for name_a, name_b in combinations(checked, 2):
        prob_a, prob_b = checked[name_a], checked[name_b]
        pred_a, pred_b = prob_a.argmax(axis=1), prob_b.argmax(axis=1)
        mc = mcnemar(y_true, pred_a, pred_b)
        row = {
            "model_a": name_a,
            "model_b": name_b,
            "n": int(len(y_true)),
            "accuracy_a": float(np.mean(pred_a == y_true)),
            "accuracy_b": float(np.mean(pred_b == y_true)),
            "mcnemar_b": mc["b"],
            "mcnemar_c": mc["c"],
            "mcnemar_statistic": mc["statistic"],
            "mcnemar_p": mc["p_value"],
            "mcnemar_method": mc["method"],
        }
        for c, cls in enumerate(class_names):
            f = f_test(prob_a[:, c], prob_b[:, c])
            row[f"f_{cls}_statistic"] = f["statistic"]
            row[f"f_{cls}_p"] = f["p_value"]
        for c, cls in enumerate(class_names):
            positive = y_true == c
            if positive.sum() >= 2 and (~positive).sum() >= 2:
                d = delong_test(positive, prob_a[:, c], prob_b[:, c])
            else:
                d = {"auc_a": None, "auc_b": None, "z": None, "p_value": None}
            row[f"auc_{cls}_a"], row[f"auc_{cls}_b"] = d["auc_a"], d["auc_b"]
            row[f"delong_{cls}_z"], row[f"delong_{cls}_p"] = d["z"], d["p_value"]
        d = delong_macro_test(y_true, prob_a, prob_b)
        row["auc_macro_a"], row["auc_macro_b"] = d["auc_a"], d["auc_b"]
        row["delong_macro_z"], row["delong_macro_p"] = d["z"], d["p_value"]
        rows.append(row)
    return rows
