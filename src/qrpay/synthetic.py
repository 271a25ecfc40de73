"""Synthetic credit histories with a known ground truth, for tests and the demo.

Each account has a hidden reliability (standard normal) that shapes most of
its history, so the features correlate the way real ones do; whether the
account defaults is then drawn from a logistic model of the features alone
(`true_log_odds`), so the truth is known exactly. `TRUTH` says, per feature, whether
more of it is riskier ("increasing") or safer ("decreasing"); `CLEAR` names
the features whose effect is strong enough that a fit on ~100k rows should
always find its direction. The bad rate is about 9%.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from qrpay.errors import InvalidArgument

FEATURES: tuple[str, ...] = (
    "social_insurance_months",  # 0-240; 0 for informal work
    "on_time_ratio",            # 0-1, bills paid on time; NaN for accounts < 3 months old
    "max_days_past_due",        # 0-180; -1 = never borrowed
    "trips_per_month",          # 0-120
    "account_age_months",       # 0-120
    "repayments_12m",           # 0-12 loan instalments repaid
    "late_payments_12m",        # 0-12
    "utilisation",              # 0-1.5 of the credit line; NaN without a line
    "income_band",              # 1-10; -1 = not declared
    "address_months",           # 0-240 at the current address
    "devices_linked",           # 1-8
    "night_trips_share",        # 0-1
)

# Direction of each feature's effect on default. Features with a direct term
# in the model follow its sign; late_payments_12m and address_months have
# none and act only through their correlation with reliability.
TRUTH: dict[str, str] = {
    "social_insurance_months": "decreasing",
    "on_time_ratio": "decreasing",
    "max_days_past_due": "increasing",
    "trips_per_month": "decreasing",
    "account_age_months": "decreasing",
    "repayments_12m": "decreasing",
    "late_payments_12m": "increasing",
    "utilisation": "increasing",
    "income_band": "decreasing",
    "address_months": "decreasing",
    "devices_linked": "increasing",
    "night_trips_share": "increasing",
}

CLEAR: tuple[str, ...] = (
    "social_insurance_months", "on_time_ratio", "max_days_past_due", "account_age_months",
    "late_payments_12m", "utilisation", "income_band", "devices_linked", "night_trips_share",
)

SPECIAL_CODE = -1.0   # max_days_past_due: never borrowed; income_band: not declared

_INTERCEPT = -3.3


def histories(n: int, seed: int = 0
              ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], tuple[str, ...]]:
    """n synthetic accounts: X (n x 12, float64, NaN = missing), y (True =
    defaulted) and the feature names. Deterministic for a seed."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgument("n must be a non-negative integer")
    rng = np.random.default_rng(seed)
    n = int(n)
    r = rng.standard_normal(n)               # hidden reliability: higher is safer

    def noise() -> npt.NDArray[np.float64]:
        return rng.standard_normal(n)

    age = np.minimum(120.0, np.floor(rng.gamma(1.6, 22.0, n)))
    formal = rng.random(n) < _sigmoid(0.6 + 0.8 * r)
    social = np.where(formal, np.clip(np.floor(rng.gamma(2.0, 30.0, n) * np.exp(0.25 * r)),
                                      1.0, 240.0), 0.0)
    on_time = np.round(_sigmoid(2.2 + 1.1 * r + 0.6 * noise()), 2)
    on_time[age < 3] = np.nan               # too new to have a record
    borrowed = rng.random(n) < 0.8
    repayments = np.where(borrowed, np.minimum(12.0, rng.poisson(5.0, n)), 0.0)
    late = rng.binomial(repayments.astype(np.int64), _sigmoid(-2.2 - 1.0 * r)).astype(np.float64)
    delinquent = rng.random(n) < _sigmoid(-1.2 - 1.2 * r + 0.5 * (late > 0))
    dpd = np.where(delinquent, np.minimum(180.0, 1.0 + np.floor(rng.exponential(30.0, n))), 0.0)
    dpd[~borrowed] = SPECIAL_CODE
    utilisation = np.round(np.clip(1.5 * _sigmoid(-0.3 - 0.7 * r + 0.8 * noise()), 0, 1.5), 2)
    utilisation[~borrowed | (rng.random(n) < 0.08)] = np.nan
    income = np.clip(np.round(5.0 + 1.6 * (0.5 * r + 0.87 * noise())), 1.0, 10.0)
    income[rng.random(n) < 0.15] = SPECIAL_CODE
    address = np.minimum(240.0, np.floor(rng.gamma(1.5, 30.0, n) * np.exp(0.3 * r)))
    # A few accounts link many devices (shared or farmed phones).
    farmed = rng.random(n) < 0.05
    devices = np.minimum(8.0, 1.0 + rng.poisson(np.where(farmed, 2.5, 0.3)))
    trips = np.minimum(120.0, np.floor(rng.gamma(2.2, 14.0, n)))
    night = np.round(np.clip(rng.beta(1.2, 7.0, n) + 0.2 * farmed * rng.random(n), 0, 1), 2)

    X = np.column_stack([social, on_time, dpd, trips, age, repayments, late, utilisation,
                         income, address, devices, night])
    y = rng.random(n) < _sigmoid(true_log_odds(X))
    return X, y, FEATURES


def true_log_odds(X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The ground truth: log-odds of default as a function of the features
    (what a perfect model would rank by; its AUC is the ceiling for a fit)."""
    (social, on_time, dpd, trips, age, repayments, _late, utilisation, income, _address,
     devices, night) = X.T
    new = np.isnan(on_time)
    never = dpd == SPECIAL_CODE
    undeclared = income == SPECIAL_CODE
    logit: npt.NDArray[np.float64] = (
            _INTERCEPT
            - 0.006 * social
            - 3.5 * np.where(new, 0.0, on_time - 0.85) + 0.6 * new
            + 0.015 * np.where(never, 0.0, dpd) + 0.6 * never
            - 0.004 * trips
            - 0.012 * age
            - 0.05 * repayments
            + 1.2 * np.where(np.isnan(utilisation), 0.4, utilisation)
            - 0.10 * np.where(undeclared, 0.0, income - 5.0) + 0.25 * undeclared
            + 0.35 * (devices - 1.0)
            + 2.0 * night)
    return logit


def _sigmoid(z: npt.NDArray[np.float64] | float) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))
    return out
