"""From a composed configuration to a finished simulation: validate, preflight, run, report.

Every user error (bad key or value, missing data, impossible budget, GPU placement without a
GPU) stops here, before Ray starts, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from fedpriv.config import ConfigError, RunConfig, parse_config
from fedpriv.errors import UserError


def preflight(rc: RunConfig) -> None:
    """Checks that need more than the schema: data present and readable, placement, privacy plan."""
    from fedpriv.data import DataError
    from fedpriv.run_folder import check_run_folder
    from fedpriv.simulation import check_placement
    from fedpriv.task import dataset_for, new_model
    from strategies import build_aggregator

    check_run_folder(rc)  # a wrong resume or a folder holding another run: refused, folder untouched
    check_placement(rc.placement)
    try:
        ds = dataset_for(rc)
    except DataError as exc:
        raise UserError(f"data: {exc}") from None
    if rc.partition.scheme == "natural" and ds.natural_ids is None:
        raise ConfigError(f"config key 'partition.scheme': natural needs a data set with natural clients; {rc.dataset.name} has none")
    try:
        new_model(rc)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.name': {exc}") from None
    build_aggregator(rc)  # builds the privacy plan: an impossible budget fails here


def quiet_libraries() -> None:
    """Flower's deprecation notices and per-round INFO lines, and alembic's start-up chatter, hide
    fedpriv's own lines; keep their warnings that matter (errors) only."""
    import logging
    import warnings

    import flwr.common.logger  # noqa: F401  (its import sets the "flwr" logger to DEBUG: import it first)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def fail(message: str) -> None:
    print(f"fedpriv: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def launch(container: dict[str, Any], hydra_config: Any = None) -> float:
    """Validate, preflight and run; returns the final test accuracy (the value sweepers optimise)."""
    from fedpriv.simulation import run_simulation, write_config

    quiet_libraries()
    try:
        rc = parse_config(container)
        preflight(rc)
    except (ConfigError, UserError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable
    if hydra_config is not None:
        from fedpriv.tracking.sweep import apply_sweep_context

        apply_sweep_context(rc, hydra_config)
    if not rc.resume:  # a resumed run keeps the config.yaml it started with
        write_config(rc)
    summary = run_simulation(rc)
    print(final_report(summary, rc), flush=True)
    acc = summary.get("final_accuracy")
    return float(acc) if isinstance(acc, (int, float)) else math.nan


def _epsilon_text(value: Any) -> str:
    """summary.json stores an infinite epsilon as the string "inf" (JSON has no infinity)."""
    eps = float(value)
    return "inf (NO privacy guarantee)" if math.isinf(eps) else f"{eps:.3f}"


def _accuracy_text(value: Any) -> str:
    """summary.json stores NaN (no round evaluated) as null."""
    return f"{float(value):.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a (no round completed)"


def final_report(summary: dict[str, Any], rc: RunConfig) -> str:
    lines = [
        f"fedpriv: {summary['rounds_completed']}/{summary['rounds_planned']} rounds ({summary['stop_reason']}), "
        f"final test accuracy {_accuracy_text(summary['final_accuracy'])}, {summary['wall_seconds']:.1f} s",
    ]
    if "epsilon" in summary:
        lines.append(
            f"fedpriv: central DP (user-level): epsilon {_epsilon_text(summary['epsilon'])} at delta {summary['delta']:.2e} "
            f"over the whole run ({summary.get('accountant', '')}, {summary.get('sampling', '')} sampling)"
        )
    if "local_epsilon_max" in summary:
        lines.append(
            f"fedpriv: local DP-SGD (example-level, zero-out): max client epsilon "
            f"{_epsilon_text(summary['local_epsilon_max'])} at delta {summary['local_delta']:.1e}"
        )
    elif "local_epsilon_bound" in summary:
        bound = summary["local_epsilon_bound"]
        lines.append(
            "fedpriv: local DP-SGD (example-level, zero-out): "
            + (f"every client's epsilon at most {_epsilon_text(bound)} (enforced by the client)" if bound is not None
               else "per-client epsilons in operator_only/privacy_details.json (not published under central DP)")
            + f" at delta {summary['local_delta']:.1e}"
        )
    for caveat in summary.get("privacy_caveats", []):
        lines.append(f"fedpriv: caveat: {caveat}")
    lines.append(f"fedpriv: outputs in {rc.run_dir}")
    return "\n".join(lines)
