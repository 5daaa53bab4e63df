"""What a run's (epsilon, delta) guarantee allows a membership attacker at most.

An attacker who decides "member" or "not member" from the released model runs a hypothesis test.
Under (epsilon, delta)-DP every test's true-positive rate TPR at false-positive rate FPR lies in
the region of Kairouz, Oh & Viswanath (ICML 2015, Theorem 2.1):

    TPR <= min(e^eps * FPR + delta,  1 - e^-eps * (1 - delta - FPR))

(the first from P[reject | member] <= e^eps P[reject | non-member] + delta, the second from the
same inequality on the complement, with the roles swapped). From it:

* the AUC ceiling: the area under that curve (exact, piecewise: it is linear up to
  FPR* = (1 - delta) / (e^eps + 1), then linear up to FPR = 1 - delta, then 1);
* the balanced-accuracy ceiling: (1 + max(TPR - FPR)) / 2 with max(TPR - FPR) =
  (e^eps - 1 + 2 delta) / (e^eps + 1), reached at FPR*.

The run's full privacy profile (delta as a function of epsilon, which the accountant knows) gives
a tighter curve: the infimum over every (eps, delta(eps)) pair. These ceilings use only the one
published pair, which is what a reader of privacy.json can check.

Which unit the bound is about comes from the guarantee: under central DP it is user-level (adding
or removing one client with all its rows); under local DP-SGD it is example-level (zero-out of one
example of one client). An example-level membership test whose member and non-member worlds differ
by the presence of the example's owner is covered by a user-level guarantee, because the example is
part of exactly one user's data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_FPRS = (0.001, 0.01)


@dataclass(frozen=True)
class Guarantee:
    """One DP guarantee a run states in privacy.json.

    ``epsilon``/``delta``: the published figures (epsilon ``inf`` for no guarantee); ``unit``: what
    one neighbouring step adds or removes (a user, or one example of one client); ``source``: the
    privacy.json key it was read from.
    """

    name: str
    unit: str
    epsilon: float
    delta: float
    source: str


NO_GUARANTEE = Guarantee("none", "none", math.inf, 1.0, "privacy.json states no epsilon: a run without differential privacy")


def tpr_ceiling(fpr: Any, epsilon: float, delta: float) -> Any:
    """Largest TPR any test can reach at ``fpr`` under (epsilon, delta)-DP (array in, array out)."""
    f = np.clip(np.asarray(fpr, dtype=float), 0.0, 1.0)
    if not math.isfinite(epsilon):
        out = np.ones_like(f)
    else:
        first = math.exp(epsilon) * f + delta
        second = 1.0 - math.exp(-epsilon) * (1.0 - delta - f)
        out = np.clip(np.minimum(first, second), 0.0, 1.0)
    return float(out) if np.ndim(out) == 0 else out


def advantage_ceiling(epsilon: float, delta: float) -> float:
    """Largest TPR - FPR of any test (membership advantage): (e^eps - 1 + 2 delta) / (e^eps + 1)."""
    if not math.isfinite(epsilon):
        return 1.0
    return min(1.0, (math.expm1(epsilon) + 2.0 * delta) / (math.exp(epsilon) + 1.0))


def balanced_accuracy_ceiling(epsilon: float, delta: float) -> float:
    """Largest (TPR + 1 - FPR) / 2 of any test."""
    return 0.5 * (1.0 + advantage_ceiling(epsilon, delta))


def auc_ceiling(epsilon: float, delta: float) -> float:
    """Area under :func:`tpr_ceiling` over FPR in [0, 1], exact."""
    if not math.isfinite(epsilon) or delta >= 1.0:
        return 1.0
    e = math.exp(epsilon)
    knee = (1.0 - delta) / (e + 1.0)  # where the two lines cross
    top = 1.0 - delta  # where the second line reaches TPR = 1
    area = e * knee**2 / 2.0 + delta * knee
    area += (top - knee) - math.exp(-epsilon) * (1.0 - delta - knee) ** 2 / 2.0
    area += 1.0 - top
    return min(1.0, area)


def ceilings(guarantee: Guarantee, fprs: tuple[float, ...] = DEFAULT_FPRS) -> dict[str, Any]:
    """Every ceiling of one guarantee, JSON-ready (public: computed from published figures only)."""
    eps, delta = guarantee.epsilon, guarantee.delta
    return {
        "guarantee": guarantee.name,
        "unit": guarantee.unit,
        "epsilon": eps,
        "delta": delta,
        "source": guarantee.source,
        "auc": auc_ceiling(eps, delta),
        "tpr_at_fpr": {fpr_key(f): tpr_ceiling(f, eps, delta) for f in fprs},
        "balanced_accuracy": balanced_accuracy_ceiling(eps, delta),
        "advantage": advantage_ceiling(eps, delta),
    }


def combined(sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Guarantees that hold together (central and local): the smallest ceiling of each figure."""
    if len(sections) == 1:
        return dict(sections[0])
    keys = sections[0]["tpr_at_fpr"]
    return {
        "guarantee": " and ".join(s["guarantee"] for s in sections),
        "unit": "the tighter of the guarantees at each figure",
        "auc": min(s["auc"] for s in sections),
        "tpr_at_fpr": {k: min(s["tpr_at_fpr"][k] for s in sections) for k in keys},
        "balanced_accuracy": min(s["balanced_accuracy"] for s in sections),
        "advantage": min(s["advantage"] for s in sections),
    }


def fpr_key(fpr: float) -> str:
    """``0.001`` -> ``"0.1%"``: the key a figure at that FPR is stored under."""
    return f"{fpr * 100:g}%"


def _as_float(value: Any) -> float:
    return math.inf if value in ("inf", None) else float(value)


def guarantees_of(report: dict[str, Any] | None) -> list[Guarantee]:
    """The guarantees a run's privacy.json states (only its published figures are read)."""
    if report is None:
        return [NO_GUARANTEE]
    out: list[Guarantee] = []
    if "epsilon" in report and "delta" in report:
        eps, source = _as_float(report["epsilon"]), "privacy.json epsilon, delta"
        audit = report.get("audit") if isinstance(report.get("audit"), dict) else {}
        if float(audit.get("noise_scale", 1.0)) != 1.0:
            # An audit preset that drew less noise than planned (audit=nonprivate | broken): the claimed
            # epsilon does not hold; the accountant's epsilon of the noise actually drawn does.
            eps = _as_float(audit.get("accountant_epsilon_of_noise_drawn"))
            source = "privacy.json audit.accountant_epsilon_of_noise_drawn (audit.noise_scale != 1), delta"
        out.append(Guarantee("central", str(report.get("unit", "user (client)")), eps, float(report["delta"]), source))
    local = report.get("local")
    if isinstance(local, dict):
        # privacy=local publishes the largest client's epsilon; central_local publishes the bound each
        # client enforces (or nothing, when no privacy.local.target_epsilon was set).
        key = "epsilon_max" if local.get("epsilon_max") is not None else "epsilon_bound"
        if local.get(key) is not None:
            out.append(Guarantee("local", "example (one example of one client, zero-out)", _as_float(local[key]),
                                 float(local["delta"]), f"privacy.json local.{key}, local.delta"))
    return out or [NO_GUARANTEE]
