"""Fitting helpers for calibration: non-negative least squares and the small-M GEMM curve.

Pure numpy so profiles can be refit from saved measurements without torch.
"""

from __future__ import annotations

import numpy as np


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray, iterations: int = 200) -> np.ndarray:
    """argmin ||A x - b|| subject to x >= 0 (Lawson and Hanson's active-set method).

    Exact on the final support, which the simpler "drop every negative coefficient at once" is
    not when features are correlated (the per-layer and per-chunk-step overheads are).
    """
    matrix = np.asarray(matrix, dtype=float)
    target = np.asarray(target, dtype=float)
    columns = matrix.shape[1]
    solution = np.zeros(columns)
    passive = np.zeros(columns, dtype=bool)
    tolerance = 1e-10 * max(1.0, float(np.abs(matrix).max(initial=0.0)) * float(np.abs(target).max(initial=0.0)))
    for _ in range(iterations):
        gradient = matrix.T @ (target - matrix @ solution)
        candidates = ~passive & (gradient > tolerance)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, gradient, -np.inf))] = True
        while True:
            trial = np.zeros(columns)
            trial[passive], *_ = np.linalg.lstsq(matrix[:, passive], target, rcond=None)
            if (trial[passive] > 0).all():
                solution = trial
                break
            # Step from the current solution toward the trial until a coefficient reaches zero.
            shrinking = passive & (trial <= 0)
            steps = solution[shrinking] / (solution[shrinking] - trial[shrinking])
            solution = solution + steps.min() * (trial - solution)
            passive &= solution > 1e-15
            solution[~passive] = 0.0
    return solution


def fit_relative_l1(features: np.ndarray, targets: np.ndarray, measured: np.ndarray,
                    ridge: np.ndarray | None = None, ridge_targets: np.ndarray | None = None,
                    iterations: int = 25, floor: float = 0.01) -> np.ndarray:
    """Non-negative x minimising sum |features x - targets| / measured (plus a ridge), by IRLS.

    The accuracy target is a median absolute relative error, which least squares serves poorly:
    a few steps that nothing in the model explains (a rebuild, a page fault) pull every
    coefficient toward them. Iteratively reweighted least squares with weights 1 / |residual|
    (floored at ``floor``, i.e. 1%) converges to the least-absolute-deviation fit.
    """
    matrix = np.asarray(features, dtype=float) / np.asarray(measured, dtype=float)[:, None]
    target = np.asarray(targets, dtype=float) / np.asarray(measured, dtype=float)
    ridge = np.zeros((0, matrix.shape[1])) if ridge is None else np.asarray(ridge, dtype=float)
    ridge_targets = np.zeros(len(ridge)) if ridge_targets is None else np.asarray(ridge_targets, dtype=float)
    weights = np.ones(len(target))
    solution = np.zeros(matrix.shape[1])
    for _ in range(iterations):
        root = np.sqrt(weights)
        solution = nonnegative_least_squares(np.vstack([matrix * root[:, None], ridge]),
                                             np.concatenate([target * root, ridge_targets]))
        new_weights = 1.0 / np.maximum(np.abs(matrix @ solution - target), floor)
        new_weights /= new_weights.mean()  # keeps the ridge's pull comparable across iterations
        if np.allclose(new_weights, weights, rtol=1e-3):
            break
        weights = new_weights
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
