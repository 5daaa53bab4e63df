"""Compose ``conf/`` with Hydra and validate the result, every error one line.

:func:`compose_config` is used where ``@hydra.main`` is not (``flwr run``, deployment, tests);
:func:`compose_jobs` is what ``scripts/simulate.py`` runs before ``@hydra.main``: it composes the
command line's overrides as Hydra will (every job of a ``-m`` sweep, expanded by Hydra's own
override parser and basic sweeper) and validates each, so that nothing starts unless all can.
A Hydra or OmegaConf error becomes a :class:`ConfigError` of one line naming the key and what is
allowed (:func:`hydra_message`).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpriv.config import ConfigError, RunConfig, allowed_keys, explicit_keys, omegaconf_message, parse_config
from fedpriv.config_schema import group_schemas, register_schemas, selector_key
from fedpriv.data import check_data_root

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

register_schemas()


class Job(NamedTuple):
    """One run of a (multi)run: its Hydra task overrides and its validated configuration."""

    overrides: list[str]
    config: RunConfig

    def describe(self, number: int, total: int) -> str:
        return describe_job(self.overrides, number, total)


def describe_job(overrides: Sequence[str], number: int, total: int) -> str:
    """How an error names the sweep job it is about (Hydra numbers jobs from 0)."""
    return f"sweep job {number} of {total}: {' '.join(overrides) or '(no overrides)'}; no job was started"


def conf_dir() -> Path:
    """``$FEDPRIV_CONF``, the copy inside an installed wheel, or the project's ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (os.environ.get("FEDPRIV_CONF"), here / "conf", here.parent / "conf"):
        if candidate and (Path(candidate) / "config.yaml").exists():
            return Path(candidate)
    raise ConfigError("cannot find the configuration folder conf/ (set FEDPRIV_CONF)")


def group_options(group: str) -> list[str]:
    """The options users choose from: the group's YAML files (``base`` is the schema, not an option)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose_config(overrides: Sequence[str] | str = ()) -> RunConfig:
    """The validated configuration for these Hydra overrides (e.g. ``["dataset=fashion_mnist"]``)."""
    return compose_jobs(overrides, from_shell=False)[0].config


def compose_jobs(
    overrides: Sequence[str] | str = (),
    multirun: bool = False,
    config_name: str = "config",
    from_shell: bool = True,
    config_dir: Path | None = None,
) -> list[Job]:
    """The validated configuration of every job these overrides give (one unless ``multirun``),
    composed from ``config_dir`` (default :func:`conf_dir`) as ``@hydra.main`` composes it."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3", job_name="fedpriv"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        try:
            if not multirun:
                cfgs = [hydra.compose_config(config_name, list(overrides), run_mode=RunMode.RUN,
                                             from_shell=from_shell, with_log_configuration=False)]
            else:
                master = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.MULTIRUN,
                                              from_shell=from_shell, with_log_configuration=False)
                cfgs = [hydra.config_loader.load_sweep_config(master, job) for job in sweep_jobs(master)]
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(hydra_message(exc)) from None
        jobs = []
        for number, cfg in enumerate(cfgs):
            task = raw_overrides(cfg.hydra.overrides.task)
            try:
                jobs.append(Job(task, validate_composed(cfg)))
            except ConfigError as exc:
                if len(cfgs) == 1:
                    raise
                raise ConfigError(f"{exc} ({describe_job(task, number, len(cfgs))})") from None
        return jobs


def sweep_jobs(master: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands them (config's sweeper params first)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = master.hydra.sweeper
    task = raw_overrides(master.hydra.overrides.task)
    if sweeper.get("_target_") != BASIC_SWEEPER:  # another sweeper picks its jobs as it goes
        parsed = OverridesParser.create().parse_overrides(task)
        return [[o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]]
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + task)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def validate_composed(cfg: DictConfig) -> RunConfig:
    """A composed config (with its ``hydra`` node) as a checked :class:`RunConfig`."""
    choices = cfg.hydra.runtime.choices
    _check_unknown_hydra_keys(cfg)
    for group in group_schemas():
        key, choice, options = selector_key(group), choices.get(group), group_options(group)
        if choice == "base":
            raise ConfigError(f"config key '{group}': base is the schema that every option extends, not an option; "
                              f"allowed: {', '.join(options)}")
        value = OmegaConf.select(cfg, key) if key else None
        if key and choice is not None and value != choice:  # privacy=central privacy.mode=none: which one?
            instead = (f"{group}={value} instead of {group}={choice} {key}={value}" if value in options
                       else f"{group}=<option>, options: {', '.join(options)}")
            raise ConfigError(f"config key '{key}': got {value!r}, which contradicts {group}={choice}; "
                              f"allowed: choose the option with the group alone ({instead})")
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)  # type: ignore[union-attr]
    rc = parse_config(container, explicit_keys(raw_overrides(cfg.hydra.overrides.task)))
    check_data_root(rc.data.root)
    return rc


def raw_overrides(overrides: Any) -> list[str]:
    """The command line's overrides as typed: an override's value may be an interpolation that only
    Hydra's run resolves (``hydra.sweep.subdir=${hydra.job.num}``), which reading the list would resolve."""
    return [str(o) for o in OmegaConf.to_container(overrides, resolve=False)] if isinstance(overrides, ListConfig) \
        else [str(o) for o in overrides]


def _check_unknown_hydra_keys(cfg: DictConfig) -> None:
    """``+hydra.x=1`` is added to Hydra's typed config and read by nobody: refuse it."""
    parser = OverridesParser.create()
    for override in parser.parse_overrides(raw_overrides(cfg.hydra.overrides.hydra)):
        if not (override.is_add() or override.is_force_add()) or override.is_sweep_override():
            continue
        key = override.key_or_group
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        fields = getattr(schema, "__dataclass_fields__", None)
        if fields is not None and leaf not in fields:
            raise ConfigError(f"config key '{key}': Hydra has no such setting; allowed here: {', '.join(fields)}")


# ------------------------------------------------------------------ Hydra's errors in one line

_MESSAGES = [  # (Hydra's message, its one line); {options}: the group's options, {groups}: all groups
    (r"Could not find '(?P<key>[\w/]+)/(?P<option>[^']+)'", "config key '{key}': no option '{option}'; allowed: {options}"),
    (r"Could not override '(?P<key>[^']+)'\.\s*No match in the defaults list",
     "config key '{key}': not a config group; allowed groups: {groups}"),
    (r"Could not append to config\. An item is already at '(?P<key>[^']+)'",
     "config key '{key}': already set by the configuration, so '+' cannot add it; allowed: override it without '+' "
     "({key}=...)"),
    (r"Could not add '(?P<key>[^'=]+)=[^']*'\. '[^']+' is already in the defaults list",
     "config key '{key}': already in the defaults list, so '+' cannot add it; allowed: choose it without '+' "
     "({key}=...), options: {options}"),
    (r"Multiple values for (?P<key>[\w/]+)\.",
     "config key '{key}': chosen twice (is it in the defaults list and given with '+'?); allowed: one choice, "
     "without '+' ({key}=...), options: {options}"),
    (r"Ambiguous value for argument '(?P<key>[^=']+)=(?P<value>[^']*)'",
     "config key '{key}': '{value}' is ambiguous; allowed: a list {key}=[{value}], a string {key}='{value}', "
     "or a sweep (add -m)"),
    (r"Could not delete from config\. '(?P<key>[^']+)' does not exist", "config key '{key}': nothing to delete there"),
]


def hydra_message(exc: BaseException) -> str:
    """Hydra's (multi-line) composition error as one line: the key, what is wrong, what is allowed."""
    text = " ".join(str(exc).split("Config search path")[0].split())
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {text}"
    for pattern, template in _MESSAGES:
        m = re.search(pattern, text)
        if m is not None:
            key = m["key"]
            options = group_options(key) if (conf_dir() / key).is_dir() else getattr(exc, "options", None) or []
            groups = sorted(p.name for p in conf_dir().iterdir() if p.is_dir())
            return template.format(**m.groupdict(), options=", ".join(options), groups=", ".join(groups))
    cause = _omegaconf_cause(exc)
    if cause is not None and getattr(cause, "full_key", None):
        return omegaconf_message(cause)
    m = re.search(r"Could not override '(?P<key>[^']+)'", text)
    if m is not None:
        parent = m["key"].rpartition(".")[0]
        return f"config key '{m['key']}': no such key; allowed here: {', '.join(allowed_keys(parent))}"
    return text or type(exc).__name__


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None