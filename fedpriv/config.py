"""The typed schema of a run's configuration, and the checks that run before any work starts.

Hydra composes ``conf/``; :func:`parse_config` turns the result into :class:`RunConfig`
(unknown keys and wrong types are refused by OmegaConf's structured merge) and
:func:`check_config` refuses values out of range. Every refusal is a :class:`ConfigError`
whose message is one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpriv.errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "parse_config", "check_config", "to_dict", "from_dict"]

DATASETS = ("digits", "fashion_mnist", "cifar10", "heart_disease", "shakespeare")
PARTITIONS = ("iid", "dirichlet", "pathological", "shard", "natural")
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedprox")
SAMPLINGS = ("poisson", "fixed", "all")
PRIVACY_MODES = ("none", "central", "local", "central_local")
SCHEDULES = ("constant", "linear", "cosine", "step", "phases")


@dataclass
class DataConfig:
    root: Optional[str] = None  # folder with the data files; else $FEDPRIV_DATA, then system folders
    val_fraction: float = 0.1  # share of each client's rows held out for its validation split


@dataclass
class DatasetConfig:
    name: str = "digits"


@dataclass
class PartitionConfig:
    scheme: str = "iid"
    alpha: float = 0.5  # dirichlet concentration; smaller is more skewed
    classes_per_client: int = 2  # pathological
    shards_per_client: int = 2  # shard


@dataclass
class ModelConfig:
    name: str = "auto"  # auto picks by data set: logreg (tabular), mlp (digits), cnn (images), char_gru
    hidden: list[int] = field(default_factory=lambda: [64])
    width: int = 32


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    server_lr: float = 1.0  # fedavgm
    server_momentum: float = 0.0  # fedavgm
    eta: float = 0.01  # fedadam server learning rate
    eta_l: float = 0.0316  # fedadam client learning rate (informational in Flower)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    proximal_mu: float = 0.0  # fedprox proximal term, applied by clients


@dataclass
class PlacementConfig:
    name: str = "cpu"
    num_cpus_per_client: float = 1.0  # Ray CPUs per client actor (fractions allowed)
    num_gpus_per_client: float = 0.0  # Ray GPUs per client actor (e.g. 0.25: four clients per GPU)
    address: Optional[str] = None  # an existing Ray cluster ("auto" or "host:port"); None starts one
    num_cpus: Optional[int] = None  # CPUs Ray may use on this machine (None: all)
    num_gpus: Optional[int] = None  # GPUs Ray may use on this machine (None: all it finds)
    object_store_memory: Optional[int] = None  # bytes
    num_nodes: Optional[int] = None  # Flower nodes simulated (None: enough for one round's cohort)
    server_device: str = "cpu"  # where the server evaluates: cpu | cuda | auto


@dataclass
class LocalPrivacyConfig:
    """Example-level DP-SGD on each client (Opacus)."""

    target_epsilon: Optional[float] = None  # per-client budget over all its rounds
    noise_multiplier: Optional[float] = None  # set directly instead of a target
    delta: float = 1e-5  # per-client delta; should be < 1 / (rows of the smallest client)
    max_grad_norm: float = 1.0  # per-example clipping norm
    grad_sample_mode: str = "ghost"  # hooks | functorch | ew | ghost
    clipping: str = "flat"  # flat | per_layer
    max_physical_batch_size: int = 256  # memory cap; logical batches are split, privacy unchanged
    secure_mode: bool = False  # Opacus's cryptographically safe noise (slower)
    expected_rounds: Optional[int] = None  # rounds a client plans for; None: num_rounds * q


@dataclass
class PrivacyConfig:
    """User-level central DP (server-side noise) and example-level local DP (clients)."""

    mode: str = "none"  # none | central | local | central_local
    target_epsilon: Optional[float] = None  # central budget for the whole run
    noise_multiplier: Optional[float] = None  # set directly instead of a target
    delta: Optional[float] = None  # None: min(1e-5, 1 / num_clients^1.1)
    clip_on: str = "server"  # server | client: who clips each update to clip_norm
    clipping: str = "fixed"  # fixed | adaptive (Andrew et al. 2021)
    clip_norm: float = 1.0  # L2 bound of one client's update (initial value if adaptive)
    target_unclipped_quantile: float = 0.5  # adaptive: fraction of updates to leave unclipped
    clip_lr: float = 0.2  # adaptive: geometric learning rate of the norm
    clipped_count_stddev: Optional[float] = None  # adaptive: None -> expected cohort / 20
    secure_rng: bool = True  # False: seeded noise, reproducible, NOT for release
    noise_sampler: str = "numpy"  # numpy (fast) | opendp (CSPRNG, floating-point safe: for a release)
    noise_cohort_size: Optional[int] = None  # calibrate noise for a larger cohort than simulated
    accountant: str = "pld"  # pld (reported) | rdp
    local: LocalPrivacyConfig = field(default_factory=LocalPrivacyConfig)


@dataclass
class ScheduleConfig:
    """The noise multiplier's shape over rounds (scaled to reach the target epsilon)."""

    name: str = "constant"
    end_factor: float = 1.0  # linear / cosine: last round's multiplier relative to the first
    step_size: int = 10  # step: rounds between changes
    gamma: float = 0.9  # step: factor at each change
    phases: list[Any] = field(default_factory=list)  # phases: [[rounds, relative multiplier], ...]


@dataclass
class TrackingConfig:
    wandb: bool = False
    project: str = "fedpriv"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto | online | offline | disabled
    log_model: bool = False
    progress: bool = True  # a progress bar over rounds; False for quiet CI logs
    operator_diagnostics: bool = False  # also send raw, operator-only diagnostics to wandb (not covered by DP)


@dataclass
class EvalConfig:
    batch_size: int = 1024
    every: int = 1  # evaluate the global model centrally every k rounds (and at the last)


@dataclass
class AuditConfig:
    """Canary audit of central DP (fedpriv.audit; issue 7). Enabling it changes the trained model:
    the canaries' updates are in it (privacy.json says so); audit a configuration, do not ship it."""

    enabled: bool = False
    canaries: int = 1000  # canary directions m; each inserted into the population with prob 1/2, the rest held out
    confidence: float = 0.95  # simultaneous confidence of all the audit's lower bounds
    noise_scale: float = 1.0  # noise actually drawn / planned: 1 = real audit; 0 = non-private baseline; 0.1 = a broken run
    seed: Optional[int] = None  # canary directions, inclusion and sampling; None: derived from seed


@dataclass
class RunConfig:
    seed: int = 0
    num_clients: int = 20
    clients_per_round: int = 10  # expected cohort; Poisson rate q = clients_per_round / num_clients
    num_rounds: int = 15
    sampling: str = "poisson"  # poisson | fixed | all: must match the privacy accountant
    client_mode: str = "virtual"  # virtual: a Flower node acts for any client; nodes: one node = one client
    round_timeout: float = 300.0  # seconds to wait for a round's replies
    resume: bool = False  # continue the run in run_dir from its last checkpoint
    run_dir: Optional[str] = None  # set by the launcher (Hydra's output folder)
    device: str = "auto"  # client training device: auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def parse_config(cfg: DictConfig | dict) -> RunConfig:
    """Merge a composed config into the schema; refuse unknown keys and wrong types in one line."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    cfg = dict(cfg)  # type: ignore[arg-type]
    cfg.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        rc: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    check_config(rc)
    return rc


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in first and "Key" in first:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(parent)
        return f"unknown config key '{key}'; allowed here: {', '.join(allowed)}"
    return f"config key '{key}': {first}"


def _allowed_keys(dotted_parent: str) -> list[str]:
    node: Any = RunConfig
    for part in [p for p in dotted_parent.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        node = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        node = type(node)
    return [f.name for f in dataclasses.fields(node)]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"got {value!r}; allowed: {', '.join(allowed)}")


def check_config(rc: RunConfig) -> None:
    """Refuse values out of range, naming the key and what is allowed."""
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
    _one_of(p.scheme, PARTITIONS, "partition.scheme")
    _require(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")
    _require(p.classes_per_client >= 1, "partition.classes_per_client", f"must be >= 1, got {p.classes_per_client}")
    _require(p.shards_per_client >= 1, "partition.shards_per_client", f"must be >= 1, got {p.shards_per_client}")

    from fedpriv.models import MODEL_NAMES

    _one_of(rc.model.name, MODEL_NAMES, "model.name")
    _require(all(h >= 1 for h in rc.model.hidden), "model.hidden", f"layer widths must be >= 1, got {rc.model.hidden}")

    t = rc.train
    _require(t.local_epochs >= 1, "train.local_epochs", f"must be >= 1, got {t.local_epochs}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.momentum >= 0, "train.momentum", f"must be >= 0, got {t.momentum}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")

    s = rc.strategy
    _one_of(s.name, STRATEGIES, "strategy.name")
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
    _require(
        pr.noise_cohort_size is None or pr.noise_cohort_size >= 1,
        "privacy.noise_cohort_size",
        f"must be >= 1, got {pr.noise_cohort_size}",
    )
    lo = pr.local
    _one_of(lo.grad_sample_mode, ("hooks", "functorch", "ew", "ghost"), "privacy.local.grad_sample_mode")
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


def to_dict(rc: RunConfig) -> dict[str, Any]:
    """A plain, JSON-serialisable copy (what travels to Ray workers and into messages)."""
    return dataclasses.asdict(rc)


def from_dict(d: dict[str, Any]) -> RunConfig:
    return parse_config(d)
