"""Fitting helpers for calibration: non-negative least squares and the small-M GEMM curve.

Pure numpy so profiles can be refit from saved measurements without torch.
"""

from __future__ import annotations

import numpy as np


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray, iterations: int = 50) -> np.ndarray:
    """argmin ||A x - b|| subject to x >= 0, by active-set elimination of negative coefficients.

    Solve, drop the columns whose coefficient came out negative, solve again; repeat until every
    kept coefficient is non-negative. Not Lawson-Hanson's full method, but exact whenever the
    unconstrained solution on the final support is non-negative, which is the case for the few,
    well-separated features calibration uses.
    """
    matrix = np.asarray(matrix, dtype=float)
    target = np.asarray(target, dtype=float)
    active = np.ones(matrix.shape[1], dtype=bool)
    solution = np.zeros(matrix.shape[1])
    for _ in range(iterations):
        if not active.any():
            break
        coefficients, *_ = np.linalg.lstsq(matrix[:, active], target, rcond=None)
        if (coefficients >= 0).all():
            solution[:] = 0.0
            solution[active] = coefficients
            return solution
        indices = np.flatnonzero(active)
        active[indices[coefficients < 0]] = False
    return solution


def fit_gemm_curve(rows: np.ndarray, flops: np.ndarray, nbytes: np.ndarray, seconds: np.ndarray,
                   bandwidth: float) -> tuple[float, float]:
    """(gemm_flops, m_half) minimising the log error of max(F / (P M/(M+h)), B / bw) against measured times.

    A grid over h (log-spaced) with P solved per h from the compute-bound points; cheap and robust.
    """
    rows, flops, nbytes, seconds = (np.asarray(x, dtype=float) for x in (rows, flops, nbytes, seconds))
    best = (np.inf, float(np.max(flops / seconds)), 0.0)
    for m_half in np.concatenate([[0.0], np.geomspace(0.5, 4096, 120)]):
        curve = rows / (rows + m_half)
        # For each h, try peaks around the best observed compute rate corrected for the curve.
        base = np.max(flops / seconds / curve)
        for peak in base * np.geomspace(0.7, 1.6, 60):
            predicted = np.maximum(flops / (peak * curve), nbytes / bandwidth)
            error = float(np.sum(np.log(predicted / seconds) ** 2))
            if error < best[0]:
                best = (error, float(peak), float(m_half))
    return best[1], best[2]


def relative_errors(predicted, measured) -> np.ndarray:
    predicted, measured = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return (predicted - measured) / measured
