"""Choosing the best configuration of a sweep on private data, with a guarantee that covers the choice.

Running every configuration of a sweep once and publishing the best run spends the privacy of every
run: the choice depends on all of them. Papernot & Steinke 2022 ("Hyperparameter tuning with Renyi
differential privacy", ICLR; arXiv 2110.03620) show that if the *number of runs is random* --
Poisson or truncated negative binomial (TNB), drawn before any run -- and only the best run is
released, the whole tuning costs little more than one run. The protocol fedpriv implements:

1. **Plan** (:func:`make_plan`, before any run): the candidates are the configurations of a grid
   whose swept keys do not change the run's privacy (learning rate, model, ...: every candidate
   has the same ledger, checked again at selection). Draw the number of runs ``K`` from the chosen
   distribution (OS-seeded generator: nobody may know K in advance), give each run a candidate
   chosen uniformly at random (for Poisson this is the same as drawing an independent
   Poisson(mean / k) count per candidate) and a fresh seed. The base mechanism ``Q`` is "train one
   uniformly chosen candidate and output (configuration, score)".
2. **Run** exactly the planned runs (the plan's Hydra commands), into one sweep folder.
3. **Select** (:func:`select`): check that the folder holds exactly the planned, finished runs; the
   score of each run is a figure its own guarantee covers (by default ``summary.json``'s
   ``final_accuracy``: the released model on the server's test split); release only the best run
   (its configuration, score, model). K, the per-candidate counts and every other run's files are
   operator-only: the guarantee assumes nobody sees them.

Accounting: dp-accounting's ``RepeatAndSelectDpEvent(one_run, mean, shape)`` on its RDP
accountant, where ``one_run`` is composed from one run's ledger events (``privacy.json``): Gaussian
releases as they were accounted, Laplace as ``LaplaceDpEvent``, other epsilon-DP releases as zCDP
(the exponential mechanism is epsilon-bounded-range, epsilon^2/8-zCDP, Cesar & Rogers 2021; any
other epsilon-DP mechanism epsilon^2/2-zCDP, Bun & Steinke 2016). Shapes: ``inf`` = Poisson,
1 = geometric, 0 = logarithmic, anything else in (0, inf) = TNB. The figure covers the guarantee the
events describe: the central (user-level) ledger; privacy=local runs keep theirs on the clients and are
refused, and under central_local the clients' example-level epsilons are not covered by it.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from fedpriv.config_schema import selector_key
from fedpriv.errors import ConfigError, DataError
from fedpriv.run_folder import CONFIG, PRIVACY, SUMMARY, read_metrics

from .accounting import RDP_ORDERS, _quiet_dp_accounting, release_dp_event  # (absl's notes hidden as the ledger does)
from .releases import REPLACE_ONE, DpRelease, release_from_dict
from .selection import MECHANISM as EXPONENTIAL_MECHANISM

PLAN = "selection_plan.json"  # operator-only: K and the counts must not be published
RESULT = "selection.json"  # the selection: only the winner and the tuning's epsilon
# Keys that change a run's privacy: sweeping them breaks "every candidate has the same ledger".
PRIVACY_KEYS = ("privacy", "schedule", "analytics", "selection", "audit", "num_rounds", "num_clients",
                "clients_per_round", "sampling", "dataset", "partition", "data", "seed", "resume", "run_dir")
_RELATIONS = {"add_or_remove_one": NeighboringRelation.ADD_OR_REMOVE_ONE,
              "replace_one": NeighboringRelation.REPLACE_ONE}


# ----------------------------------------------------------------------------- accounting


def release_event(r: DpRelease, relation: str) -> dp_event.DpEvent:
    """One release (count 1) as a dp-accounting event for the RDP accountant under ``relation``."""
    if r.kind in ("gaussian", "laplace"):  # the ledger's own events (replace-one halves the noise)
        return release_dp_event(r, relation)
    if r.kind == "pure":  # as zCDP here: the RDP accountant takes randomized response under replace-one only
        eps = r.standalone_epsilon(relation == REPLACE_ONE)
        return dp_event.ZCDpEvent(eps * eps / (8.0 if r.mechanism == EXPONENTIAL_MECHANISM else 2.0))
    raise DataError(f"privacy.json: a release of unknown kind {r.kind!r}")


def run_event(events: Sequence[dict[str, Any]], relation: str) -> dp_event.DpEvent:
    """One run's ledger (privacy.json's ``events``) as one composed dp-accounting event."""
    parts = []
    for e in events:
        try:
            r = release_from_dict(e)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"privacy.json: a ledger event it cannot read ({exc})") from None
        if r.is_non_private:
            return dp_event.NonPrivateDpEvent()
        if not r.is_free:
            parts.append(dp_event.SelfComposedDpEvent(release_event(r, relation), r.count))
    return dp_event.ComposedDpEvent(parts)


def check_distribution(mean: float, shape: float) -> None:
    if not (math.isfinite(mean) and mean >= 1):
        raise ConfigError(f"repeat-and-select 'mean' must be >= 1 (the expected number of runs), got {mean}")
    if math.isnan(shape) or shape < 0:
        raise ConfigError(f"repeat-and-select 'shape' must be >= 0 (inf = Poisson), got {shape}")


def tuning_epsilon(one_run: dp_event.DpEvent, mean: float, shape: float, delta: float, relation: str) -> float:
    """Epsilon at ``delta`` of releasing the best of K runs, K ~ (mean, shape): dp-accounting's RDP."""
    check_distribution(mean, shape)
    acc = rdp_lib.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=_RELATIONS[relation])
    with _quiet_dp_accounting():
        acc.compose(dp_event.RepeatAndSelectDpEvent(one_run, float(mean), float(shape)))
    return float(acc.get_epsilon(delta))


def one_run_epsilon(one_run: dp_event.DpEvent, delta: float, relation: str) -> float:
    acc = rdp_lib.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=_RELATIONS[relation])
    with _quiet_dp_accounting():
        acc.compose(one_run)
    return float(acc.get_epsilon(delta))


# ----------------------------------------------------------------------------- planning


def draw_runs(mean: float, shape: float, rng: np.random.Generator) -> int:
    """K, the number of runs: Poisson(mean) (shape inf) or TNB(shape, gamma) with that mean."""
    check_distribution(mean, shape)
    if math.isinf(shape):
        return int(rng.poisson(mean))
    if mean == 1:
        return 1
    # The same gamma that dp-accounting's accountant derives from (mean, shape), so the plan and the
    # accountant describe one distribution (dp-accounting has no public sampler for it).
    gamma = rdp_lib._gamma_truncated_negative_binomial(shape, mean)
    if shape == 0:  # logarithmic: P(k) proportional to (1 - gamma)^k / k
        return int(rng.logseries(1.0 - gamma))
    while True:  # negative binomial NB(shape, gamma) conditioned on K > 0
        k = int(rng.negative_binomial(shape, gamma))
        if k > 0:
            return k


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ['a', 'b', '[1,2]']: commas inside brackets or quotes do not split."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return out + [cur]


def grid(overrides: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(fixed overrides, candidates): ``key=a,b`` sweeps, ``key=a`` is fixed; the cartesian product."""
    fixed, swept = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"sweep override {item!r}: expected key=value or key=v1,v2,...")
        key, value = item.split("=", 1)
        values = _split_values(value)
        if len(values) == 1:
            fixed.append(item)
            continue
        if key.lstrip("+~").split(".")[0] in PRIVACY_KEYS or key.startswith("hydra"):
            raise ConfigError(f"sweep key {key!r} changes the runs' privacy (or their folders): repeat-and-select "
                              "needs one privacy configuration for every candidate; sweep it in separate tunings")
        swept.append([f"{key}={v}" for v in values])
    return fixed, [list(c) for c in itertools.product(*swept)] if swept else [[]]


def make_plan(overrides: Sequence[str], mean: float, shape: float, sweep_dir: str | Path,
              rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The random plan (see the module docstring); draws from the OS's entropy unless ``rng`` is given."""
    fixed, candidates = grid(overrides)
    rng = rng or np.random.default_rng(secrets.randbits(128))
    k = draw_runs(mean, shape, rng)
    choice = rng.integers(len(candidates), size=k)
    seeds = rng.choice(2 ** 31 - 1, size=k, replace=False) if k else []
    runs = [{"candidate": int(c), "seed": int(s)} for c, s in zip(choice, seeds)]
    return {"protocol": "repeat-and-select (Papernot & Steinke 2022)", "mean": float(mean), "shape": float(shape),
            "distribution": distribution_name(shape), "num_runs": k, "sweep_dir": str(sweep_dir),
            "fixed": fixed, "candidates": candidates, "runs": runs}


def distribution_name(shape: float) -> str:
    return {math.inf: "poisson", 1.0: "geometric", 0.0: "logarithmic"}.get(float(shape), "truncated negative binomial")


def commands(plan: dict[str, Any], launcher: str = "python scripts/simulate.py") -> list[str]:
    """One Hydra multirun command per drawn candidate (its runs as a list of seeds), one sweep folder."""
    out = []
    for index, candidate in enumerate(plan["candidates"]):
        seeds = [r["seed"] for r in plan["runs"] if r["candidate"] == index]
        if seeds:
            args = [f"hydra.sweep.dir={plan['sweep_dir']}", *plan["fixed"], *candidate,
                    "seed=" + ",".join(map(str, seeds))]
            out.append(f"{launcher} -m " + " ".join(_quote(a) for a in args))
    return out


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "._-=/:,+~" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


# ----------------------------------------------------------------------------- selection


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.lstrip("+~").split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _matches(config: dict[str, Any], overrides: Sequence[str]) -> bool:
    for item in overrides:
        key, value = item.split("=", 1)
        if key.lstrip("+~").split(".")[0] not in config:  # a preset (experiment=...) or Hydra's own key
            continue
        group_option = _dotted(config, key)
        if isinstance(group_option, dict):  # a group override (model=mlp): its selector holds the name
            group_option = _dotted(config, selector_key(key.lstrip("+~")) or key)
        if yaml.safe_load(value) != group_option and str(group_option) != value:
            return False
    return True


def find_runs(plan: dict[str, Any], sweep_dir: Path) -> list[Path]:
    """The planned runs' folders, in plan order; DataError for a missing, extra or unfinished run."""
    by_seed: dict[int, Path] = {}
    for cfg in sorted(sweep_dir.rglob(CONFIG)):
        if cfg.parent.name == ".hydra":
            continue
        seed = int(yaml.safe_load(cfg.read_text()).get("seed"))
        if seed in by_seed:
            raise DataError(f"{sweep_dir}: two runs with seed {seed}; the folder must hold exactly the planned runs")
        by_seed[seed] = cfg.parent
    planned = {r["seed"] for r in plan["runs"]}
    extra = sorted(str(p) for s, p in by_seed.items() if s not in planned)
    if extra:
        raise DataError(f"{sweep_dir}: runs not in the plan ({', '.join(extra)}): extra runs spend privacy the "
                        "tuning's epsilon does not cover")
    folders = []
    for r in plan["runs"]:
        folder = by_seed.get(r["seed"])
        if folder is None or not (folder / SUMMARY).exists():
            raise DataError(f"{sweep_dir}: planned run seed={r['seed']} ({' '.join(plan['candidates'][r['candidate']])}) "
                            "is missing or unfinished; run every planned run before selecting")
        config = yaml.safe_load((folder / CONFIG).read_text())
        if not _matches(config, plan["fixed"] + plan["candidates"][r["candidate"]]):
            raise DataError(f"{folder}: its config.yaml is not the planned candidate's configuration")
        folders.append(folder)
    return folders


def run_score(folder: Path, metric: str) -> float:
    """A published figure of one run: summary.json's ``metric``, else the last metrics.jsonl line's."""
    summary = json.loads((folder / SUMMARY).read_text())
    if metric in summary:
        return float(summary[metric])
    rows = [r for r in read_metrics(folder) if metric in r]
    if not rows:
        raise DataError(f"{folder}: no published figure {metric!r} in {SUMMARY} or metrics.jsonl")
    return float(rows[-1][metric])


def run_privacy(folder: Path) -> dict[str, Any]:
    path = folder / PRIVACY
    if not path.exists():
        raise DataError(f"{folder}: no {PRIVACY} (a run without DP has no guarantee to repeat)")
    report = json.loads(path.read_text())
    if "events" not in report:
        raise DataError(f"{path}: no ledger 'events' (repeat-and-select needs the central ledger; "
                        "privacy=local runs keep theirs on the clients)")
    # privacy=none with analytics lists only the analytics' releases: its training (the model, every
    # score) has no guarantee, so no finite tuning epsilon may be built from those events.
    try:
        own = float(report.get("epsilon"))
    except (TypeError, ValueError):
        own = math.nan
    if not math.isfinite(own):
        raise DataError(f"{path}: the run's own epsilon is {report.get('epsilon')!r}: its training has no guarantee, "
                        "so selecting among such runs has none either (repeat-and-select needs private runs)")
    return report


def select(plan: dict[str, Any], sweep_dir: str | Path, metric: str = "final_accuracy",
           delta: float | None = None) -> dict[str, Any]:
    """The best planned run and the epsilon of the whole tuning (see the module docstring)."""
    sweep_dir = Path(sweep_dir)
    folders = find_runs(plan, sweep_dir)
    result: dict[str, Any] = {"protocol": plan["protocol"], "distribution": plan["distribution"],
                              "mean": plan["mean"], "shape": plan["shape"], "metric": metric,
                              "candidates": plan["candidates"], "fixed": plan["fixed"]}
    if not folders:
        return result | {"winner": None, "epsilon": 0.0, "note": "K = 0 runs were drawn: nothing is released"}
    reports = [run_privacy(f) for f in folders]
    first = reports[0]
    for f, rep in zip(folders, reports):
        if rep["events"] != first["events"] or rep.get("neighbouring_relation") != first.get("neighbouring_relation"):
            raise DataError(f"{f}: its ledger differs from {folders[0]}'s; every run must have the same privacy")
    relation = first.get("neighbouring_relation", "add_or_remove_one")
    delta = float(first["delta"] if delta is None else delta)
    one_run = run_event(first["events"], relation)
    scores = [run_score(f, metric) for f in folders]
    best = int(np.argmax(scores))  # ties: the first in the plan's (random) order
    winner = plan["runs"][best]
    return result | {
        "winner": {"run_dir": str(folders[best]), "candidate": plan["candidates"][winner["candidate"]],
                   "score": scores[best]},
        "epsilon": tuning_epsilon(one_run, plan["mean"], plan["shape"], delta, relation),
        "delta": delta, "neighbouring_relation": relation, "accountant": "rdp (dp-accounting RepeatAndSelectDpEvent)",
        "one_run_epsilon": one_run_epsilon(one_run, delta, relation),
        "one_run_epsilon_reported": first.get("epsilon"),
    }
