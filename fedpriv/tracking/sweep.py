"""Hydra multirun context: the runs of one sweep share a group, and the swept keys become tags.

``python scripts/simulate.py -m num_rounds=5 privacy=central privacy.target_epsilon=1,4,16`` gives every job the
group ``multirun_<date>_<time>`` (from the sweep folder) and the tag of its own swept value, e.g.
``privacy.target_epsilon=4``. Which keys are swept is read from the sweep's ``multirun.yaml``
(Hydra writes it before the first job starts, with the overrides as typed: ``...=1,4,16``) and from
``hydra.sweeper.params``; when neither is available, every override of the job becomes a tag.
Overrides of ``tracking``, ``run_dir`` and ``resume`` never become tags. Explicit
``tracking.group`` / ``tracking.name`` are kept; an unnamed run is named after its tags.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedpriv.config import RunConfig

log = logging.getLogger("fedpriv.tracking")

_NOT_TAGS = ("tracking", "run_dir", "resume", "hydra")
MAX_GROUP_LEN = 128  # W&B's limit


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    return OverridesParser.create().parse_overrides(list(overrides))


def _key(override: str) -> str:
    """The key an override string sets (``+a.b=1`` -> ``a.b``; ``~a`` -> ``a``)."""
    text = override.split("=", 1)[0].strip()
    return text.lstrip("+~").split("@", 1)[0]


def swept_keys(hydra_config: Any) -> set[str] | None:
    """Keys swept in this multirun, or None when the sweep's definition cannot be found."""
    keys: set[str] = set()
    found = False
    try:
        params = hydra_config.sweeper.params
        if params:
            keys.update(str(k) for k in dict(params).keys())
            found = True
    except Exception:  # noqa: BLE001
        pass
    try:
        from omegaconf import OmegaConf  # noqa: PLC0415

        path = Path(str(hydra_config.sweep.dir)) / "multirun.yaml"
        if path.exists():
            task = OmegaConf.load(path).hydra.overrides.task
            keys.update(o.key_or_group for o in _parse([str(t) for t in task]) if o.is_sweep_override())
            found = True
    except Exception as exc:  # noqa: BLE001
        log.debug("could not read the sweep definition: %s", exc)
    return keys if found else None


def sweep_group(sweep_dir: str) -> str:
    """``multirun/2024-05-01/12-00-00`` -> ``multirun_2024-05-01_12-00-00`` (at most 128 characters)."""
    group = sweep_dir.strip().strip("/").replace("/", "_").replace("\\", "_")
    return group[-MAX_GROUP_LEN:] or "multirun"


def is_multirun(hydra_config: Any) -> bool:
    """Whether this job is one of a Hydra multirun (``-m``); False without Hydra."""
    if hydra_config is None:
        return False
    try:
        from hydra.types import RunMode  # noqa: PLC0415

        return bool(hydra_config.mode == RunMode.MULTIRUN)
    except Exception:  # noqa: BLE001
        return False


def apply_sweep_context(rc: RunConfig, hydra_config: Any) -> None:
    """In a multirun, set the tracking group to the sweep folder and tag each run with its swept overrides."""
    if not is_multirun(hydra_config):
        return
    if rc.tracking.group is None:
        rc.tracking.group = sweep_group(str(hydra_config.sweep.dir))
    overrides = [str(o) for o in hydra_config.overrides.task if not _key(str(o)).startswith(_NOT_TAGS)]
    swept = swept_keys(hydra_config)
    if swept is not None:
        overrides = [o for o in overrides if _key(o) in swept]
    tags = list(rc.tracking.tags)
    new = [o for o in overrides if o not in tags]
    rc.tracking.tags = tags + new
    if rc.tracking.name is None and new:
        rc.tracking.name = ",".join(new)
