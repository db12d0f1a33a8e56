"""Online step-time estimator: predicts how long a step takes from its token counts.

The ``deadline`` policy needs to know how many prompt tokens a step can carry
before the running decodes miss their TPOT (Sarathi-Serve's rule). The model is
linear, ``seconds ~ a + b * prefill_tokens + c * decode_tokens``, fitted from
the durations ``EngineCore`` reports after every step (the simulator reports
its predicted durations the same way). Older steps fade with an exponential
forgetting factor so the fit follows a changing machine, and the coefficients
are kept non-negative (a negative cost per token would let a step grow without
limit). Until enough steps are seen the estimator is not ``ready`` and callers
must not cut anything on its word. Pure Python, no torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

NUM_FEATURES = 3  # intercept, prefill tokens, decode tokens
_RIDGE = 1e-9  # keeps a feature never seen (e.g. no prefill yet) at zero instead of undefined


@dataclass(frozen=True)
class StepTimeCoefficients:
    """``seconds = fixed_seconds + per_prefill_token * prefill + per_decode_token * decode``."""

    fixed_seconds: float
    per_prefill_token: float
    per_decode_token: float

    def predict(self, num_prefill_tokens: int, num_decode_tokens: int) -> float:
        return self.fixed_seconds + self.per_prefill_token * num_prefill_tokens + self.per_decode_token * num_decode_tokens

    def max_prefill_tokens(self, num_decode_tokens: int, step_seconds: float) -> int | None:
        """Most prefill tokens a step with these decodes may carry within ``step_seconds``; None: no limit."""
        if self.per_prefill_token <= 0:
            return None
        room = step_seconds - self.predict(0, num_decode_tokens)
        return max(0, int(room / self.per_prefill_token + 1e-9))  # 1e-9: 31.999... tokens is 32


class StepTimeEstimator:
    """Fits ``StepTimeCoefficients`` online by forgetting-weighted, non-negative least squares."""

    def __init__(self, forgetting: float = 0.995, min_observations: int = 8,
                 prior: StepTimeCoefficients | None = None):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}.")
        if isinstance(min_observations, bool) or not isinstance(min_observations, int) or min_observations < 1:
            raise ValueError(f"min_observations must be a positive integer, got {min_observations!r}.")
        self.forgetting = forgetting
        self.min_observations = min_observations
        self.prior = prior  # used until enough observations (e.g. the simulator's step model)
        self.num_observations = 0
        self._gram = [[0.0] * NUM_FEATURES for _ in range(NUM_FEATURES)]  # sum of w * x x^T
        self._moment = [0.0] * NUM_FEATURES  # sum of w * x * seconds
        self._fitted: StepTimeCoefficients | None = None

    def observe(self, num_prefill_tokens: int, num_decode_tokens: int, elapsed_seconds: float) -> None:
        """Record one executed step; steps with no tokens or no measured time teach nothing."""
        if elapsed_seconds <= 0 or num_prefill_tokens + num_decode_tokens <= 0:
            return
        features = (1.0, float(num_prefill_tokens), float(num_decode_tokens))
        for row in range(NUM_FEATURES):
            self._moment[row] = self.forgetting * self._moment[row] + features[row] * elapsed_seconds
            for column in range(NUM_FEATURES):
                self._gram[row][column] = self.forgetting * self._gram[row][column] + features[row] * features[column]
        self.num_observations += 1
        self._fitted = None

    @property
    def ready(self) -> bool:
        return self.num_observations >= self.min_observations or self.prior is not None

    def coefficients(self) -> StepTimeCoefficients | None:
        """The current fit, the prior before enough data, or None when there is neither."""
        if self.num_observations < self.min_observations:
            return self.prior
        if self._fitted is None:
            self._fitted = self._fit()
        return self._fitted

    def predict(self, num_prefill_tokens: int, num_decode_tokens: int) -> float | None:
        coefficients = self.coefficients()
        return None if coefficients is None else coefficients.predict(num_prefill_tokens, num_decode_tokens)

    def _fit(self) -> StepTimeCoefficients:
        """Non-negative least squares by trying every set of free coefficients (2^3 sets: cheap)."""
        best, best_loss = (0.0, 0.0, 0.0), self._loss((0.0, 0.0, 0.0))
        for size in range(1, NUM_FEATURES + 1):
            for free in itertools.combinations(range(NUM_FEATURES), size):
                solution = _solve(
                    [[self._gram[r][c] + (_RIDGE * self._scale(r) if r == c else 0.0) for c in free] for r in free],
                    [self._moment[r] for r in free],
                )
                if solution is None or min(solution) < 0:
                    continue
                beta = [0.0] * NUM_FEATURES
                for index, value in zip(free, solution):
                    beta[index] = value
                loss = self._loss(beta)
                if loss < best_loss:
                    best, best_loss = tuple(beta), loss
        return StepTimeCoefficients(*best)

    def _scale(self, index: int) -> float:
        return max(self._gram[index][index], 1.0)

    def _loss(self, beta) -> float:
        """Weighted squared error up to a constant: b^T G b - 2 b^T m."""
        quadratic = sum(beta[r] * self._gram[r][c] * beta[c] for r in range(NUM_FEATURES) for c in range(NUM_FEATURES))
        return quadratic - 2.0 * sum(beta[r] * self._moment[r] for r in range(NUM_FEATURES))


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is singular."""
    size = len(vector)
    rows = [list(matrix[r]) + [vector[r]] for r in range(size)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(rows[r][column]))
        if abs(rows[pivot][column]) < 1e-300:
            return None
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for r in range(size):
            if r != column:
                factor = rows[r][column] / rows[column][column]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[column])]
    return [rows[r][size] / rows[r][r] for r in range(size)]
