"""What ``privacy=distributed`` needs of the rest of a run's configuration (checked before any work).

The dimension-dependent checks (bits too few for the cohort and clip, noise that cannot reach the
target) need the model and live with the plan (:func:`strategies.distributed_dp.make_plan_for`).
"""

from __future__ import annotations

import math

from fedpriv.config_schema import RunConfig
from fedpriv.errors import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def min_survivors(rc: RunConfig) -> int:
    """t: the fewest clients a released sum holds. Default: 80% of a cohort two standard deviations
    below the expected one (Poisson), at least 2: rounds are rarely dropped, and the noise a full
    cohort carries is about 1.2x (in std) what the guarantee needs (each client adds 1/t of it)."""
    t = rc.privacy.distributed.min_survivors
    if t is not None:
        return t
    m = rc.clients_per_round if rc.sampling != "all" else rc.num_clients
    q = 1.0 if rc.sampling == "all" else min(1.0, rc.clients_per_round / rc.num_clients)
    return max(2, int(0.8 * (m - 2 * math.sqrt(m * (1 - q)))))


def share_threshold(rc: RunConfig) -> int:
    """r: shares that recover a client's secret (default: a majority of its neighbourhood and itself)."""
    r = rc.privacy.distributed.threshold
    return r if r is not None else rc.privacy.distributed.neighbours // 2 + 1


def check_distributed(rc: RunConfig) -> None:
    """Refuse (one line) a distributed-DP configuration whose guarantee or protocol cannot hold."""
    pr = rc.privacy
    if pr.mode != "distributed":
        return
    d = pr.distributed
    _require(pr.target_epsilon is not None and 0 < pr.target_epsilon < float("inf"), "privacy.target_epsilon",
             f"distributed DP calibrates its noise to a finite budget > 0, got {pr.target_epsilon}")
    _require(pr.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {pr.clip_norm}")
    _require(8 <= d.bits <= 62, "privacy.distributed.bits", f"must be in [8, 62], got {d.bits}")
    _require(d.calibrate_for in ("released_model", "server"), "privacy.distributed.calibrate_for",
             f"got {d.calibrate_for!r}; allowed: released_model, server")
    _require(d.colluders >= 0, "privacy.distributed.colluders", f"must be >= 0, got {d.colluders}")
    _require(d.neighbours >= 2, "privacy.distributed.neighbours", f"must be >= 2, got {d.neighbours}")
    r, t = share_threshold(rc), min_survivors(rc)
    _require(2 <= r <= d.neighbours, "privacy.distributed.threshold",
             f"must be in [2, neighbours={d.neighbours}] (fewer than 2 lets one neighbour recover a secret), got {r}")
    _require(t <= rc.clients_per_round, "privacy.distributed.min_survivors",
             f"{t} survivors can never come from an expected cohort of clients_per_round={rc.clients_per_round}: "
             "every round would be dropped")
    _require(t > d.colluders, "privacy.distributed.min_survivors",
             f"{t} survivors with {d.colluders} colluding clients leave no honest noise share: the target cannot be "
             "reached at the threshold; raise min_survivors or lower colluders")
    _require(t >= 2, "privacy.distributed.min_survivors", f"a sum of fewer than 2 clients is one update: got {t}")
    _require(rc.sampling in ("poisson", "all"), "sampling",
             f"distributed DP's accountant covers poisson (amplified for the released model) and all, got {rc.sampling}")
    _require(rc.schedule.name == "constant", "schedule.name",
             f"distributed DP adds the same noise every round (its shares are fixed in advance), got {rc.schedule.name}")
    _require(rc.analytics.mode == "none", "analytics.mode",
             "federated analytics' Laplace releases are not part of the distributed mechanism; use analytics=none")
