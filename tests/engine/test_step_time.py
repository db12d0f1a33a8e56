"""The online step-time estimator: recovers known costs, stays non-negative, waits for data."""

from __future__ import annotations

import random

import pytest

from joule.engine.step_time import StepTimeCoefficients, StepTimeEstimator


def _observe(estimator, truth, steps, noise=0.0, seed=0):
    rng = random.Random(seed)
    for _ in range(steps):
        prefill = rng.choice([0, 0, rng.randint(1, 2048)])
        decode = rng.randint(0 if prefill else 1, 256)
        seconds = truth.predict(prefill, decode) * (1 + rng.uniform(-noise, noise))
        estimator.observe(prefill, decode, seconds)


def test_fit_recovers_known_coefficients_exactly_without_noise():
    truth = StepTimeCoefficients(fixed_seconds=0.004, per_prefill_token=2.5e-5, per_decode_token=1.2e-4)
    estimator = StepTimeEstimator()
    _observe(estimator, truth, 200)
    fitted = estimator.coefficients()
    assert fitted.fixed_seconds == pytest.approx(truth.fixed_seconds, rel=1e-6)
    assert fitted.per_prefill_token == pytest.approx(truth.per_prefill_token, rel=1e-6)
    assert fitted.per_decode_token == pytest.approx(truth.per_decode_token, rel=1e-6)


def test_fit_is_close_under_noise_and_follows_a_changed_machine():
    old = StepTimeCoefficients(0.004, 2.5e-5, 1.2e-4)
    new = StepTimeCoefficients(0.008, 5e-5, 2.4e-4)  # e.g. a slower clock
    estimator = StepTimeEstimator(forgetting=0.98)
    _observe(estimator, old, 300, noise=0.05, seed=1)
    assert estimator.coefficients().per_prefill_token == pytest.approx(old.per_prefill_token, rel=0.1)
    _observe(estimator, new, 600, noise=0.05, seed=2)
    fitted = estimator.coefficients()
    assert fitted.per_prefill_token == pytest.approx(new.per_prefill_token, rel=0.1)
    assert fitted.per_decode_token == pytest.approx(new.per_decode_token, rel=0.1)
    assert fitted.fixed_seconds == pytest.approx(new.fixed_seconds, rel=0.25)


def test_coefficients_are_never_negative():
    estimator = StepTimeEstimator(min_observations=3)
    for prefill, decode, seconds in [(0, 1, 0.02), (0, 8, 0.01), (0, 64, 0.005), (100, 4, 0.03)]:
        estimator.observe(prefill, decode, seconds)  # time falling with decodes: a negative slope fits best
    fitted = estimator.coefficients()
    assert min(fitted.fixed_seconds, fitted.per_prefill_token, fitted.per_decode_token) >= 0


def test_no_estimate_before_enough_steps_unless_a_prior_is_given():
    estimator = StepTimeEstimator(min_observations=4)
    for _ in range(3):
        estimator.observe(10, 2, 0.01)
    estimator.observe(0, 0, 0.01)  # an empty step teaches nothing
    estimator.observe(5, 1, 0.0)  # nor one with no measured time
    assert not estimator.ready and estimator.coefficients() is None and estimator.predict(1, 1) is None
    prior = StepTimeCoefficients(0.01, 1e-4, 1e-3)
    seeded = StepTimeEstimator(min_observations=4, prior=prior)
    assert seeded.ready and seeded.coefficients() == prior


def test_max_prefill_tokens_within_a_step_time():
    costs = StepTimeCoefficients(0.010, 0.001, 0.002)
    assert costs.max_prefill_tokens(num_decode_tokens=4, step_seconds=0.050) == 32
    assert costs.max_prefill_tokens(num_decode_tokens=40, step_seconds=0.050) == 0
    assert StepTimeCoefficients(0.01, 0.0, 0.002).max_prefill_tokens(4, 0.05) is None  # prompts look free


@pytest.mark.parametrize("kwargs, field_name", [({"forgetting": 0.0}, "forgetting"),
                                                ({"min_observations": 0}, "min_observations")])
def test_bad_settings_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        StepTimeEstimator(**kwargs)
