"""Parse and check a run's configuration before any work starts.

The schema (keys, types, defaults) is :mod:`fedpriv.config_schema`. Hydra composes ``conf/``;
:func:`parse_config` turns the result into :class:`RunConfig` (unknown keys and wrong types are
refused by OmegaConf's structured merge) and :func:`check_config` refuses values out of range and
values that the chosen option never reads. Every refusal is a :class:`ConfigError` whose message
is one line naming the key and what is allowed. Allowed names come from the registries that use
them (fedpriv.data's loaders and partition schemes, fedpriv.models); strategy names are checked by
``strategies.factory``, which sits above this module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpriv.config_schema import (
    GRAD_SAMPLE_MODES,
    PRIVACY_MODES,
    AuditConfig,
    DataConfig,
    DatasetConfig,
    EvalConfig,
    LocalPrivacyConfig,
    ModelConfig,
    PartitionConfig,
    PlacementConfig,
    PrivacyConfig,
    RunConfig,
    ScheduleConfig,
    StrategyConfig,
    TrackingConfig,
    TrainConfig,
    field_default,
    group_schemas,
)
from fedpriv.data import DATASETS, SCHEMES
from fedpriv.distributed_config import check_distributed
from fedpriv.errors import ConfigError
from fedpriv.model_config import check_model
from fedpriv.sampling import SCHEMES as SAMPLINGS
from fedpriv.sampling import cyclic_groups

__all__ = [
    "ConfigError", "RunConfig", "parse_config", "check_config", "to_dict", "from_dict", "allowed_keys",
    "AuditConfig", "DataConfig", "DatasetConfig", "EvalConfig", "LocalPrivacyConfig", "ModelConfig",
    "PartitionConfig", "PlacementConfig", "PrivacyConfig", "ScheduleConfig", "StrategyConfig",
    "TrackingConfig", "TrainConfig",
]

SCHEDULES = ("constant", "linear", "cosine", "step", "phases")  # fedpriv.privacy.plan.schedule_shape
# Floats that may be +inf: the central target epsilon, a documented reference point ("clip, do not noise").
INFINITY_ALLOWED = ("privacy.target_epsilon",)
TEXT_DATASETS = ("sent140", "shakespeare", "shakespeare_lm")  # where exposure.secrets can be planted


def parse_config(cfg: DictConfig | dict, explicit: set[str] | None = None,
                 dropped: list[str] | None = None) -> RunConfig:
    """Merge a composed config into the schema; refuse unknown keys and wrong types in one line.

    ``explicit``: the value keys the user set on the command line (None: treat every key as set).
    A value the chosen option never reads is refused if the user set it, and reset to its default
    if a preset set it (``experiment=quickstart privacy=none``: the preset's privacy settings do
    not apply to the non-private twin, and saying so is not the user's mistake); ``dropped`` gets
    one line for each such reset.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    cfg = dict(cfg)  # type: ignore[arg-type]
    cfg.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        rc: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc)) from None
    check_config(rc, explicit, dropped)
    return rc


def omegaconf_message(exc: OmegaConfBaseException) -> str:
    """One line for OmegaConf's error: the key, what is wrong, and what is allowed."""
    key = getattr(exc, "full_key", None) or "?"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in first and "Key" in first:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"config key '{key}': no such key; allowed here: {', '.join(allowed_keys(parent))}"
    if first.startswith("Invalid type assigned") and allowed_keys(key):
        return f"config key '{key}': is a section, not a value; allowed: its keys ({', '.join(allowed_keys(key))})"
    return f"config key '{key}': {first}"


def allowed_keys(dotted_parent: str) -> list[str]:
    """The keys of the schema node at ``dotted_parent`` ("" is the root)."""
    node: Any = RunConfig
    for part in [p for p in dotted_parent.split(".") if p]:
        sub = {f.name: f for f in dataclasses.fields(node)}.get(part)
        if sub is None or sub.default_factory is dataclasses.MISSING:
            return []
        node = type(sub.default_factory())  # type: ignore[misc]
    return [f.name for f in dataclasses.fields(node)]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"got {value!r}; allowed: {', '.join(allowed)}")


def check_config(rc: RunConfig, explicit: set[str] | None = None, dropped: list[str] | None = None) -> None:
    """Refuse non-finite numbers, values out of range and values the chosen option never reads."""
    _check_finite(rc)
    _require(rc.num_clients >= 1, "num_clients", f"must be >= 1, got {rc.num_clients}")
    _require(rc.clients_per_round >= 1, "clients_per_round", f"must be >= 1, got {rc.clients_per_round}")
    _require(
        rc.clients_per_round <= rc.num_clients,
        "clients_per_round",
        f"must be <= num_clients ({rc.num_clients}), got {rc.clients_per_round}",
    )
    _require(rc.num_rounds >= 1, "num_rounds", f"must be >= 1, got {rc.num_rounds}")
    _require(rc.round_timeout > 0, "round_timeout", f"must be > 0 seconds, got {rc.round_timeout}")
    _one_of(rc.sampling, SAMPLINGS, "sampling")
    _one_of(rc.client_mode, ("virtual", "nodes"), "client_mode")
    _one_of(rc.device, ("auto", "cpu", "cuda"), "device")
    _one_of(rc.dataset.name, DATASETS, "dataset.name")
    _require(0.0 <= rc.data.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {rc.data.val_fraction}")

    p = rc.partition
    _one_of(p.scheme, SCHEMES, "partition.scheme")
    _require(rc.dataset.alpha >= 0, "dataset.alpha", f"must be >= 0, got {rc.dataset.alpha}")
    _require(rc.dataset.beta >= 0, "dataset.beta", f"must be >= 0, got {rc.dataset.beta}")
    _require(rc.dataset.name != "synthetic" or p.scheme == "natural", "partition.scheme",
             f"synthetic generates one client per id (natural); got {p.scheme!r}; use partition=natural")
    _require(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")
    _require(p.classes_per_client >= 1, "partition.classes_per_client", f"must be >= 1, got {p.classes_per_client}")
    _require(p.shards_per_client >= 1, "partition.shards_per_client", f"must be >= 1, got {p.shards_per_client}")

    check_model(rc, explicit)
    _require(all(h >= 1 for h in rc.model.hidden), "model.hidden", f"layer widths must be >= 1, got {rc.model.hidden}")

    t = rc.train
    _require(t.local_epochs >= 1, "train.local_epochs", f"must be >= 1, got {t.local_epochs}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.momentum >= 0, "train.momentum", f"must be >= 0, got {t.momentum}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")

    s = rc.strategy  # its name is checked by strategies.factory (a layer above this one)
    _require(s.server_lr > 0, "strategy.server_lr", f"must be > 0, got {s.server_lr}")
    _require(0 <= s.server_momentum < 1, "strategy.server_momentum", f"must be in [0, 1), got {s.server_momentum}")
    _require(s.eta > 0, "strategy.eta", f"must be > 0, got {s.eta}")
    _require(s.proximal_mu >= 0, "strategy.proximal_mu", f"must be >= 0, got {s.proximal_mu}")

    pl = rc.placement
    _require(pl.num_cpus_per_client > 0, "placement.num_cpus_per_client", f"must be > 0, got {pl.num_cpus_per_client}")
    _require(pl.num_gpus_per_client >= 0, "placement.num_gpus_per_client", f"must be >= 0, got {pl.num_gpus_per_client}")
    _require(pl.num_nodes is None or pl.num_nodes >= 1, "placement.num_nodes", f"must be >= 1, got {pl.num_nodes}")
    _one_of(pl.server_device, ("auto", "cpu", "cuda"), "placement.server_device")

    pr = rc.privacy
    _one_of(pr.mode, PRIVACY_MODES, "privacy.mode")
    _one_of(pr.clip_on, ("server", "client"), "privacy.clip_on")
    _one_of(pr.clipping, ("fixed", "adaptive"), "privacy.clipping")
    _one_of(pr.accountant, ("pld", "rdp"), "privacy.accountant")
    _one_of(pr.noise_sampler, ("numpy", "opendp"), "privacy.noise_sampler")
    _require(
        pr.secure_rng or pr.noise_sampler == "numpy",
        "privacy.noise_sampler",
        "opendp draws from a CSPRNG and cannot be seeded: it needs privacy.secure_rng=true",
    )
    _require(pr.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {pr.clip_norm}")
    _require(
        0 < pr.target_unclipped_quantile < 1,
        "privacy.target_unclipped_quantile",
        f"must be in (0, 1), got {pr.target_unclipped_quantile}",
    )
    _require(pr.clip_lr > 0, "privacy.clip_lr", f"must be > 0, got {pr.clip_lr}")
    _require(
        pr.target_epsilon is None or pr.target_epsilon > 0,
        "privacy.target_epsilon",
        f"must be > 0, got {pr.target_epsilon}",
    )
    _require(
        pr.noise_multiplier is None or pr.noise_multiplier >= 0,
        "privacy.noise_multiplier",
        f"must be >= 0, got {pr.noise_multiplier}",
    )
    _require(pr.delta is None or 0 < pr.delta < 1, "privacy.delta", f"must be in (0, 1), got {pr.delta}")
    _require(pr.noise_cohort_size is None or pr.noise_cohort_size >= 1, "privacy.noise_cohort_size",
             f"must be >= 1, got {pr.noise_cohort_size}")
    _check_participation(rc)
    check_distributed(rc)
    lo = pr.local
    _one_of(lo.grad_sample_mode, ("auto", *GRAD_SAMPLE_MODES), "privacy.local.grad_sample_mode")
    _one_of(lo.clipping, ("flat", "per_layer"), "privacy.local.clipping")
    _require(lo.max_grad_norm > 0, "privacy.local.max_grad_norm", f"must be > 0, got {lo.max_grad_norm}")
    _require(0 < lo.delta < 1, "privacy.local.delta", f"must be in (0, 1), got {lo.delta}")
    _require(
        lo.target_epsilon is None or lo.target_epsilon > 0,
        "privacy.local.target_epsilon",
        f"must be > 0, got {lo.target_epsilon}",
    )
    _require(
        lo.max_physical_batch_size >= 1,
        "privacy.local.max_physical_batch_size",
        f"must be >= 1, got {lo.max_physical_batch_size}",
    )

    _one_of(rc.schedule.name, SCHEDULES, "schedule.name")
    _one_of(rc.tracking.mode, ("auto", "online", "offline", "disabled"), "tracking.mode")
    _require(rc.eval.every >= 1, "eval.every", f"must be >= 1, got {rc.eval.every}")
    _require(rc.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {rc.eval.batch_size}")

    au = rc.audit
    _require(au.canaries >= 2, "audit.canaries", f"must be >= 2, got {au.canaries}")
    _require(0 < au.confidence < 1, "audit.confidence", f"must be in (0, 1), got {au.confidence}")
    _require(au.noise_scale >= 0, "audit.noise_scale", f"must be >= 0, got {au.noise_scale}")
    _require(
        not au.enabled or pr.mode in ("central", "central_local"),
        "audit.enabled",
        f"the canary audit needs central DP (privacy=central or central_local), got privacy.mode={pr.mode!r}",
    )
    _require(
        au.enabled or au.noise_scale == 1.0,
        "audit.noise_scale",
        "only an audit run (audit.enabled=true) may scale the noise actually drawn",
    )
    ex = rc.exposure
    for key in ("secrets", "repeats", "length", "candidates"):
        _require(getattr(ex, key) >= (key != "secrets"), f"exposure.{key}", f"got {getattr(ex, key)}, too small")
    _require(not ex.secrets or rc.dataset.name in TEXT_DATASETS, "exposure.secrets",
             f"secrets are planted in text: use a dataset of {', '.join(TEXT_DATASETS)} (got {rc.dataset.name})")
    _require(not ex.secrets or (ex.secrets <= rc.num_clients and rc.client_mode == "virtual"), "exposure.secrets",
             f"each needs its own simulated holder: at most num_clients ({rc.num_clients}), client_mode=virtual")
    an = rc.analytics
    _one_of(an.mode, ("none", "central", "local"), "analytics.mode")
    for key in ("epsilon_label_histogram", "epsilon_validation"):
        value = getattr(an, key)
        _require(value is None or value > 0, f"analytics.{key}", f"must be > 0 (or null: not released), got {value}")
    _require(an.validation_every >= 1, "analytics.validation_every", f"must be >= 1, got {an.validation_every}")
    _require(
        an.mode != "central" or pr.mode in ("none", "central"),
        "analytics.mode",
        f"analytics=central has the server add the noise, which privacy={pr.mode} does not trust (its clients' "
        "figures would leave them raw); use privacy=none or central, or analytics=local with privacy=local",
    )
    _require(
        an.mode != "local" or pr.mode == "local",
        "analytics.mode",
        f"analytics=local charges each client's own DP-SGD ledger (example level): it needs privacy=local, got "
        f"privacy={pr.mode}",
    )
    sel = rc.selection
    _one_of(sel.method, ("last", "noisy_max", "released_argmax"), "selection.method")
    _require(sel.method == "last" or (an.mode != "none" and an.epsilon_validation is not None), "selection.method",
             f"{sel.method} chooses by the clients' validation accuracy: it needs analytics (central or local) with "
             "analytics.epsilon_validation set")
    _require(sel.method == "last" or an.validation_every <= rc.num_rounds, "selection.method",
             f"no candidate: the first validation (round {an.validation_every}) comes after the last round")
    _require(sel.method != "noisy_max" or an.mode == "central", "selection.method",
             f"noisy_max reads the RAW validation sums, which only a trusted server holds (analytics=central); with "
             f"analytics={an.mode} use released_argmax (post-processing of the released figures)")
    _require(sel.method != "noisy_max" or (sel.epsilon is not None and sel.epsilon > 0), "selection.epsilon",
             f"noisy_max costs a finite epsilon > 0 (its pure-DP charge), got {sel.epsilon}")
    _check_read(rc, "", explicit, dropped)


_GROUPS = set(group_schemas()) | {"experiment"}  # a group choice (privacy=none) is not a value key


def explicit_keys(overrides: Any) -> set[str]:
    """The value keys a list of Hydra overrides sets (``privacy.target_epsilon=8`` -> that key)."""
    keys = set()
    for override in overrides:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if "." in key or key not in _GROUPS:
            keys.add(key)
    return keys


def _set_by(key: str, explicit: set[str] | None) -> bool:
    return explicit is None or any(key == e or key.startswith(e + ".") for e in explicit)


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, (list, tuple)) and any(_non_finite(v) for v in value)


def _check_finite(node: Any, path: str = "") -> None:
    """inf and nan are refused wherever a number must be finite (all but INFINITY_ALLOWED's +inf)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif _non_finite(value) and not (key in INFINITY_ALLOWED and value == math.inf):
            extra = " or inf (clip, do not noise: NO privacy guarantee)" if key in INFINITY_ALLOWED else ""
            raise ConfigError(f"config key '{key}': got {value}; allowed: a finite number{extra}")


def _first_difference(value: Any, default: Any, key: str) -> str | None:
    if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default):
        for f in dataclasses.fields(value):
            found = _first_difference(getattr(value, f.name), getattr(default, f.name), f"{key}.{f.name}")
            if found:
                return found
        return None
    return key if value != default else None


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _option(node: Any, path: str, selector: str, value: Any = dataclasses.MISSING) -> str:
    """``strategy=fedavg`` for a group's selector, else ``privacy.clipping=fixed``."""
    value = getattr(node, selector) if value is dataclasses.MISSING else value
    selects = next(f for f in dataclasses.fields(node) if f.name == selector).metadata.get("selects")
    return f"{path.rstrip('.')}={_text(value)}" if selects else f"{path}{selector}={_text(value)}"


def _check_read(node: Any, path: str, explicit: set[str] | None, dropped: list[str] | None = None) -> None:
    """A value that the chosen option never reads (``strategy.eta`` under fedavg) is a mistake
    when the user set it: refuse it rather than run something other than what was asked for. One
    a preset set is reset to its default."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        selector, readers = f.metadata.get("read_if", (None, ()))
        if selector is not None and getattr(node, selector) not in readers:
            key = _first_difference(value, field_default(f), f"{path}{f.name}")
            if key is not None and not _set_by(key, explicit):
                if dropped is not None:
                    dropped.append(f"{path}{f.name}={_text(value)} (set by a preset) is not read with "
                                   f"{_option(node, path, selector)}: dropped")
                setattr(node, f.name, field_default(f))
            elif key is not None:
                raise ConfigError(f"config key '{key}': not read with {_option(node, path, selector)} (it would be "
                                  f"ignored); allowed only with {' or '.join(_option(node, path, selector, r) for r in readers)}")
        elif dataclasses.is_dataclass(value):
            _check_read(value, f"{path}{f.name}.", explicit, dropped)


def _check_participation(rc: RunConfig) -> None:
    """Cyclic sampling and the correlated-noise mechanisms: what their accounting assumes must be what runs."""
    pr, central = rc.privacy, rc.privacy.mode in ("central", "central_local")
    _one_of(pr.mechanism, ("gaussian", "tree", "bandmf"), "privacy.mechanism")
    if rc.sampling == "cyclic":
        _require(rc.client_mode == "virtual", "sampling",
                 "cyclic needs client_mode=virtual: SuperNodes are indexed by their order among the connected nodes, "
                 "which shifts when one leaves, so a client's group (what the accounting relies on) would not be fixed")
        _require(rc.cyclic_groups is None or rc.cyclic_groups >= 1, "cyclic_groups", f"must be >= 1, got {rc.cyclic_groups}")
        groups = cyclic_groups(rc.num_clients, rc.clients_per_round, rc.cyclic_groups)
        _require(rc.clients_per_round * groups <= rc.num_clients, "cyclic_groups",
                 f"{groups} groups of about {rc.num_clients // groups} clients cannot give cohorts of "
                 f"{rc.clients_per_round}: at most {rc.num_clients // rc.clients_per_round} groups")
        _require(not central or rc.schedule.name == "constant", "schedule.name",
                 f"sampling=cyclic is accounted once per cycle of {groups} rounds: it needs schedule=constant, "
                 f"got {rc.schedule.name}")
    if not central or pr.mechanism == "gaussian":
        return
    mechanism = f"privacy.mechanism={pr.mechanism}"
    _require(pr.noise_sampler == "numpy", "privacy.noise_sampler",
             f"{mechanism} combines its draws linearly in float64, which undoes OpenDP's floating-point-safe sampling; "
             "use privacy.noise_sampler=numpy (and say so) or privacy.mechanism=gaussian")
    _require(rc.sampling == "cyclic", "sampling",
             f"{mechanism} needs sampling=cyclic (each client at most once every cyclic_groups rounds, what its "
             f"accounting assumes), got {rc.sampling}")
    _require(pr.clipping == "fixed", "privacy.clipping", f"{mechanism} needs privacy.clipping=fixed (adaptive "
             "clipping's noised count is not part of its correlated release)")
    if pr.mechanism == "bandmf":
        groups = cyclic_groups(rc.num_clients, rc.clients_per_round, rc.cyclic_groups)
        _require(pr.bands is None or 1 <= pr.bands <= groups, "privacy.bands",
                 f"must be in [1, cyclic_groups={groups}] (participations {groups} rounds apart must not share a "
                 f"band), got {pr.bands}")


def to_dict(rc: RunConfig) -> dict[str, Any]:
    """A plain, JSON-serialisable copy (what travels to Ray workers and into messages)."""
    return dataclasses.asdict(rc)


def from_dict(d: dict[str, Any]) -> RunConfig:
    return parse_config(d)
