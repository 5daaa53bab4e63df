"""From a composed configuration to a finished simulation: validate, preflight, run, report.

Every user error (bad key or value, missing data, impossible budget, GPU placement without a
GPU) stops here, before Ray starts, with one line on stderr and exit code 2. Ctrl-C stops with
one line and exit code 130, keeping every finished round (``resume=true run_dir=...`` goes on).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from fedpriv.compose import raw_overrides
from fedpriv.config import ConfigError, RunConfig, explicit_keys, parse_config
from fedpriv.errors import UserError
from fedpriv.logs import configure_logging
from fedpriv.preflight import preflight
from fedpriv.simulation import run_simulation
from fedpriv.tracking.sweep import apply_sweep_context, is_multirun

__all__ = ["fail", "final_report", "interrupted", "launch", "preflight"]


def fail(message: str) -> None:
    print(f"fedpriv: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def interrupted(rc: RunConfig | None, rounds: int = 0) -> None:
    """Ctrl-C: one line naming what was kept and how to go on; exit code 130 (128 + SIGINT).
    ``rc`` None: the simulation had not started (the run folder is as it was)."""
    if rc is None:
        line = "fedpriv: interrupted before the simulation started; the run folder is as it was"
    elif rounds == 0:
        line = f"fedpriv: interrupted before round 1 finished; nothing to resume in {rc.run_dir}"
    else:
        line = (f"fedpriv: interrupted: {rounds}/{rc.num_rounds} rounds kept in {rc.run_dir}; continue with "
                f"resume=true run_dir={rc.run_dir}")
    print(line, file=sys.stderr, flush=True)
    sys.exit(130)


def launch(container: dict[str, Any], hydra_config: Any = None) -> float:
    """Validate, preflight and run; returns the final test accuracy (the value sweepers optimise)."""
    configure_logging()
    try:
        explicit = explicit_keys(raw_overrides(hydra_config.overrides.task)) if hydra_config is not None else None
        dropped: list[str] = []
        rc = parse_config(container, explicit, dropped)
        warnings = preflight(rc)
    except (ConfigError, UserError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable
    except KeyboardInterrupt:  # before Ray: nothing started, nothing written
        interrupted(None)
        raise  # unreachable
    for note in dropped:  # e.g. experiment=quickstart privacy=distributed: the preset's adaptive clipping
        print(f"fedpriv: note: {note}", file=sys.stderr, flush=True)
    for warning in warnings:
        print(f"fedpriv: warning: {warning}", file=sys.stderr, flush=True)
    if hydra_config is not None:
        apply_sweep_context(rc, hydra_config)
    try:
        # a sweep's jobs run one after another in this process: they share Ray and its warm workers
        summary = run_simulation(rc, keep_workers=is_multirun(hydra_config))  # Ctrl-C: a clean stop from here on
    except KeyboardInterrupt:  # before the simulation took over Ctrl-C
        interrupted(None)
        raise  # unreachable
    if summary.get("stop_reason") == "interrupted":
        interrupted(rc, int(summary["rounds_completed"]))
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
    if "epsilon_against_server" in summary:
        lines.append(
            f"fedpriv: distributed DP with secure aggregation (user-level): epsilon {_epsilon_text(summary['epsilon'])} "
            f"for the released model ({summary.get('sampling', '')} sampling, cohorts kept secret), "
            f"{_epsilon_text(summary['epsilon_against_server'])} against the server, at delta {summary['delta']:.2e} over "
            f"the whole run ({summary.get('accountant', '')})"
        )
    elif "epsilon" in summary:
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
    if "full_model_numbers" in summary:
        lines.append(
            f"fedpriv: each reply carries {summary['update_numbers']:,} numbers ({summary['update_bytes'] / 1024:.1f} KiB), "
            f"{100 * summary['update_numbers'] / summary['full_model_numbers']:.2f}% of the full model's "
            f"{summary['full_model_numbers']:,}; the frozen base never travels"
        )
    if "exposure_planted_mean" in summary:
        lines.append(
            f"fedpriv: exposure of {summary['exposure_secrets']} planted secrets ({summary['exposure_repeats']} copies "
            f"each): mean {summary['exposure_planted_mean']:.2f} bits (max {summary['exposure_planted_max']:.2f}), "
            f"held-out secrets {summary['exposure_held_out_mean']:.2f}; the guarantee allows a mean up to "
            f"{summary['exposure_ceiling']:.2f} of the {summary['exposure_measurable_bits']:.2f} measurable "
            f"(exposure.json; the model includes the secrets: do not ship it)"
        )
    for caveat in summary.get("privacy_caveats", []):
        lines.append(f"fedpriv: caveat: {caveat}")
    lines.append(f"fedpriv: outputs in {rc.run_dir}")
    return "\n".join(lines)
