"""The typed schema of a run's configuration: one dataclass per config group, and their defaults.

These dataclasses are the one source of truth for keys, types and default values. They are
registered with Hydra's ConfigStore (:func:`register_schemas`): ``base_config`` types the root of
``conf/config.yaml`` and ``<group>/base`` is the base of every option of a group (its YAML starts
with ``defaults: [base, _self_]``), so a group's YAML file lists only what differs from here.

Field metadata says which option reads a field (:func:`read_if`) and which field names the option
(:data:`SELECTS`); :func:`fedpriv.config.check_config` refuses a value that the chosen option
never reads, and :func:`fedpriv.compose.compose_config` a selector that contradicts the group.
This module imports nothing of fedpriv's (no data, model or strategy code).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")  # Opacus's per-example gradient engines
SELECTS = {"selects": True}  # metadata of the field that names a group's chosen option


def config_group(schema: type) -> Any:
    """A config group's node: ``conf/<name>/`` holds its options, ``<name>/base`` is its schema."""
    return field(default_factory=schema, metadata={"group": True})


def read_if(selector: str, *values: Any, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A field read only when the same node's ``selector`` field is one of ``values``."""
    return field(default=default, default_factory=default_factory, metadata={"read_if": (selector, values)})


@dataclass
class DataConfig:
    # Folder holding the data files; null: $FEDPRIV_DATA, ../shared/data, then /usr/share/datasets.
    # A folder given here must exist: it is never silently replaced by another one.
    root: Optional[str] = None
    val_fraction: float = 0.1  # share of each client's rows held out for its validation split


@dataclass
class DatasetConfig:
    name: str = field(default="digits", metadata=SELECTS)  # one of fedpriv.data's loaders
    # Synthetic(alpha, beta) (LEAF / FedProx): std of the clients' model means u_k (how different their
    # labelling functions are) and of their feature means B_k (how different their inputs are); >= 0.
    alpha: float = read_if("name", "synthetic", default=1.0)
    beta: float = read_if("name", "synthetic", default=1.0)
    iid: bool = read_if("name", "synthetic", default=False)  # Synthetic-IID: one shared model (alpha, beta unused)


@dataclass
class PartitionConfig:
    scheme: str = field(default="iid", metadata=SELECTS)  # one of fedpriv.data's partition schemes
    alpha: float = read_if("scheme", "dirichlet", default=0.5)  # Dirichlet concentration; smaller is more skewed
    classes_per_client: int = read_if("scheme", "pathological", default=2)
    shards_per_client: int = read_if("scheme", "shard", default=2)


_LM = ("auto", "transformer")  # auto picks the transformer for sent140


@dataclass
class ModelConfig:
    # auto picks by data set: logreg (tabular), mlp (digits), cnn (images), char_gru (shakespeare),
    # transformer (sent140)
    name: str = field(default="auto", metadata=SELECTS)
    hidden: list[int] = read_if("name", "auto", "mlp", "char_gru", default_factory=lambda: [64])  # layer widths
    width: int = read_if("name", "auto", "cnn", default=32)  # channels of the CNN's first block
    # transformer (fedpriv/language_model.py): a Hugging Face model fine-tuned with LoRA adapters (peft).
    # A local model folder (save_pretrained; loaded with local_files_only, its tokenizer.json if it has one);
    # public: the data set's public checkpoint (fedpriv/pretraining.py: pretrained on text no client holds,
    # once per machine, cached); null: a small Llama built from layers/dim/heads, randomly initialised.
    pretrained: Optional[str] = read_if("name", *_LM, default=None)
    layers: int = read_if("name", *_LM, default=2)  # null or public only: decoder layers
    dim: int = read_if("name", *_LM, default=64)  # null or public only: hidden size (MLP 4x)
    heads: int = read_if("name", *_LM, default=4)  # null or public only: attention heads
    # lora: only the adapters (and a classification head) train and travel, the base stays frozen on every
    # worker; full: every weight trains and travels (the bytes and utility baseline).
    finetune: str = read_if("name", *_LM, default="lora")
    lora_rank: int = read_if("name", *_LM, default=4)
    lora_alpha: float = read_if("name", *_LM, default=8.0)  # adapter scale alpha / rank
    lora_targets: list[str] = read_if("name", *_LM, default_factory=lambda: ["q_proj", "v_proj"])  # module names
    # float32 | bfloat16: the frozen base's storage and the forward pass (autocast); the adapters, their
    # gradients, the clip and the noise stay float32. bfloat16 halves a worker's base (GPU placement:
    # more workers per GPU; needs an Ampere or newer GPU); on a CPU it runs, usually slower.
    dtype: str = read_if("name", *_LM, default="float32")
    # shakespeare (a causal LM): all: the loss at every position of a window (the next token of each);
    # last: the window's next character only. The privacy unit is one window either way.
    loss_positions: str = read_if("name", *_LM, default="all")


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class StrategyConfig:
    name: str = field(default="fedavg", metadata=SELECTS)  # one of strategies.factory.STRATEGIES
    server_lr: float = read_if("name", "fedavgm", default=1.0)
    server_momentum: float = read_if("name", "fedavgm", default=0.0)  # Hsu et al. 2019
    eta: float = read_if("name", "fedadam", default=0.01)  # server learning rate (Reddi et al. 2021)
    eta_l: float = read_if("name", "fedadam", default=0.0316)  # client learning rate (informational in Flower)
    beta_1: float = read_if("name", "fedadam", default=0.9)
    beta_2: float = read_if("name", "fedadam", default=0.99)
    tau: float = read_if("name", "fedadam", default=1e-3)
    proximal_mu: float = read_if("name", "fedprox", default=0.0)  # clients add (mu/2)||w - w_global||^2


@dataclass
class PlacementConfig:
    name: str = field(default="cpu", metadata=SELECTS)
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
    """Example-level DP-SGD on each client (Opacus); each client keeps its own ledger."""

    target_epsilon: Optional[float] = None  # per-client, example-level budget over all its rounds
    # Or set the noise directly (then target_epsilon, if set, is only the stop).
    noise_multiplier: Optional[float] = None
    delta: float = 1e-5  # per-client delta: keep it below 1 / (rows of the smallest client)
    max_grad_norm: float = 1.0  # per-example clipping norm
    # auto | hooks | functorch | ew | ghost. auto: the fastest measured (scripts/benchmark_dp_sgd.py):
    # ghost on a CPU with flat clipping (1.9x plain SGD vs 4.8x for hooks), hooks on CUDA (4.0x vs
    # 5.6x for ghost on an H200) and with per_layer clipping (ghost supports flat only).
    grad_sample_mode: str = "auto"
    clipping: str = "flat"  # flat | per_layer
    max_physical_batch_size: int = 256  # memory only; logical (Poisson) batches and privacy are unchanged
    secure_mode: bool = False  # Opacus CSPRNG (needs torchcsprng); else privacy.secure_rng decides the seeds
    # Participations a client calibrates for; None: ~98th percentile of Binomial(num_rounds, q). Under
    # analytics=local its own Laplace releases are planned alongside (fedpriv/privacy/local_plan.py).
    expected_rounds: Optional[int] = None


@dataclass
class DistributedPrivacyConfig:
    """Distributed DP (privacy=distributed): each client clips, encodes and noises its own update, and
    secure aggregation (SecAgg+) shows the server only the sum (fedpriv/privacy/distributed.py,
    fedpriv/secagg.py)."""

    bits: int = 20  # b: every message and the sum live modulo 2^b (what a reply weighs: b bits a number)
    # t: the fewest clients whose vectors a released sum holds; a round with fewer is dropped, never
    # released. Each client's noise share is calibrated so that any t survivors carry the whole noise.
    # None: 80% of a Poisson cohort 2 standard deviations below clients_per_round, at least 2.
    min_survivors: Optional[int] = None
    colluders: int = 0  # c: clients that may collude with the server; their own noise shares are not counted
    neighbours: int = 16  # k: SecAgg+'s neighbourhood (each client's secrets are shared among k others)
    threshold: Optional[int] = None  # r: shares that recover a secret; None: k // 2 + 1 (a majority)
    # The observer the target epsilon is for: released_model (anyone who sees the models but not who took
    # part: amplified by Poisson sampling) | server (the aggregator, which knows each round's cohort: no
    # amplification, a client counted in every round it can join). Both figures are always reported.
    calibrate_for: str = "released_model"


PRIVACY_MODES = ("none", "central", "local", "central_local", "distributed")  # the privacy group's options
_CENTRAL = ("central", "central_local")
_NOISED = ("central", "central_local", "distributed")  # a run-level (user-level) budget and clip norm
_DP = ("central", "local", "central_local", "distributed")
_LOCAL = ("local", "central_local")


@dataclass
class PrivacyConfig:
    """User-level central DP (clip, sum, noise on the server) and example-level DP-SGD (clients)."""

    mode: str = field(default="none", metadata=SELECTS)  # none | central | local | central_local
    # Central budget for the whole run: the noise is calibrated so that epsilon reaches it at the
    # last round. inf: clip, do not noise (a reference point with NO privacy guarantee).
    target_epsilon: Optional[float] = read_if("mode", *_NOISED, default=None)
    # Set instead of target_epsilon to fix the noise (the target, if set, then caps the run).
    noise_multiplier: Optional[float] = read_if("mode", *_CENTRAL, default=None)
    delta: Optional[float] = read_if("mode", *_NOISED, default=None)  # None: min(1e-5, 1 / num_clients^1.1)
    # server | client: clients clip before sending (same noise, same accounting; under
    # central_local the client clips its DP-SGD update too).
    clip_on: str = read_if("mode", *_CENTRAL, default="server")
    clipping: str = read_if("mode", *_CENTRAL, default="fixed")  # fixed | adaptive (Andrew et al. 2021)
    clip_norm: float = read_if("mode", *_NOISED, default=1.0)  # L2 bound of one client's update (initial if adaptive)
    target_unclipped_quantile: float = read_if("clipping", "adaptive", default=0.5)  # fraction left unclipped
    clip_lr: float = read_if("clipping", "adaptive", default=0.2)  # geometric learning rate of the norm
    clipped_count_stddev: Optional[float] = read_if("clipping", "adaptive", default=None)  # None: expected cohort / 20
    # False: noise (server and clients) and the clients' batch sampling seeded from seed/round/client:
    # reproducible, NOT for release.
    secure_rng: bool = read_if("mode", *_DP, default=True)
    # numpy: fast, float Gaussian on PCG64 | opendp: exact, floating-point safe, OpenSSL CSPRNG (for a
    # release; ~2 s a round for the 422k-parameter CNN).
    noise_sampler: str = read_if("mode", *_CENTRAL, default="numpy")
    # Calibrate the noise for a larger cohort than simulated (pfl-research style).
    noise_cohort_size: Optional[int] = read_if("mode", *_CENTRAL, default=None)
    # How the server's noise relates across rounds (fedpriv/privacy/correlated.py):
    #   gaussian: independent noise each round (DP-FedAvg), any sampling;
    #   tree: DP-FTRL's tree aggregation (Kairouz et al. 2021), no amplification assumed: needs
    #     sampling=cyclic (each client at most once per tree; the tree restarts every cyclic_groups rounds);
    #   bandmf: banded matrix factorization (Choquette-Choo et al. 2023), needs sampling=cyclic with
    #     cyclic_groups >= bands; amplified by the sampling within each group.
    # tree and bandmf need clipping=fixed and schedule=constant.
    mechanism: str = read_if("mode", *_CENTRAL, default="gaussian")
    bands: Optional[int] = read_if("mechanism", "bandmf", default=None)  # None: cyclic_groups (the most allowed)
    accountant: str = read_if("mode", "central", "local", "central_local", default="pld")  # pld (reported; tight) | rdp: the run's ledger and every client's
    local: LocalPrivacyConfig = read_if("mode", *_LOCAL, default_factory=LocalPrivacyConfig)
    distributed: DistributedPrivacyConfig = read_if("mode", "distributed", default_factory=DistributedPrivacyConfig)


@dataclass
class ScheduleConfig:
    """The noise multiplier's shape over rounds (scaled to reach the target epsilon)."""

    name: str = field(default="constant", metadata=SELECTS)  # constant | linear | cosine | step | phases
    end_factor: float = read_if("name", "linear", "cosine", default=1.0)  # last round's multiplier / the first's
    step_size: int = read_if("name", "step", default=10)  # rounds between changes
    gamma: float = read_if("name", "step", default=0.9)  # factor at each change
    # [[rounds, relative multiplier], ...]; the rounds must add up to num_rounds.
    phases: list[Any] = read_if("name", "phases", default_factory=list)


@dataclass
class TrackingConfig:
    wandb: bool = False  # Weights & Biases on top of the local files (which are always written)
    project: str = "fedpriv"
    entity: Optional[str] = None  # your W&B user or team; None: your default entity
    name: Optional[str] = None  # None: wandb picks one (in a sweep: the swept values)
    group: Optional[str] = None  # None: none, or the sweep folder in a multirun
    job_type: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto | online | offline | disabled
    log_model: bool = False  # upload model.pt (+ config.yaml) as a W&B artifact at the end
    progress: bool = True  # a progress bar on a terminal, one line per round in logs; False: quiet
    # True: wandb also gets the raw, operator-only diagnostics (NOT covered by the privacy guarantee).
    operator_diagnostics: bool = False


@dataclass
class EvalConfig:
    batch_size: int = 1024
    every: int = 1  # evaluate the global model centrally every k rounds (and at the last)


@dataclass
class AuditConfig:
    """Canary audit of central DP (fedpriv.audit). Enabling it changes the trained model:
    the canaries' updates are in it (privacy.json says so); audit a configuration, do not ship it."""

    enabled: bool = False
    # Canary directions m; each inserted into the population with probability 1/2, the rest held out.
    canaries: int = read_if("enabled", True, default=1000)
    confidence: float = read_if("enabled", True, default=0.95)  # simultaneous confidence of all lower bounds
    # Noise actually drawn / planned: 1 = a real audit; 0 = the non-private baseline; 0.1 = a broken run.
    noise_scale: float = 1.0
    seed: Optional[int] = read_if("enabled", True, default=None)  # None: derived from the run's seed


@dataclass
class ExposureConfig:
    """Secrets planted in clients' text, and how much of them the released model exposes
    (fedpriv.audit.exposure; Carlini et al. 2019). The shipped model holds them: audit, do not ship."""

    secrets: int = 0  # planted secrets, one client each (as many more are held out, never planted); 0: off
    # Copies of a secret in its holder's training rows. User-level DP covers any number (one user);
    # example-level DP-SGD covers r copies only as a group of r examples (r eps, r e^((r-1) eps) delta).
    repeats: int = 4
    length: int = 8  # symbols of a secret: tokens (Sent140) or lowercase letters (Shakespeare)
    candidates: int = 2000  # random candidates a secret is ranked among; at most log2(n + 1) bits measurable


@dataclass
class QuasiIdentifierConfig:
    """How one quasi-identifier column is generalised (fedpriv.anonymisation): level 0 is the exact
    value, then each band width in turn, then "*" (the value withheld). Either bands + domain
    (a numeric column) or values (a categorical one)."""

    column: str = ""  # the data set's column (heart_disease: age, sex, trestbps, chol, ...)
    # Interval widths, finest first, each a multiple of the one before (nested bands from domain[0]);
    # a generalised value trains as its band's midpoint, "*" as the training rows' mean.
    bands: list[float] = field(default_factory=list)
    domain: list[float] = field(default_factory=list)  # [low, high): a row outside is refused, never guessed
    values: list[float] = field(default_factory=list)  # a categorical column's values (generalised only to "*")


@dataclass
class AnonymisationConfig:
    """k-anonymity of each client's own rows before it trains (fedpriv.anonymisation): protects against
    linkage on the quasi-identifiers; it is NOT differential privacy. Tabular data sets only."""

    enabled: bool = False
    k: int = read_if("enabled", True, default=5)  # every released row shares its quasi-identifiers with >= k-1 others
    # Distinct target values (diagnoses) in every equivalence class; null: not asked (attribute disclosure open).
    l_diversity: Optional[int] = read_if("enabled", True, default=None)
    max_suppression: float = read_if("enabled", True, default=0.05)  # share of a client's rows it may withhold
    identifiers: list[str] = read_if("enabled", True, default_factory=list)  # direct identifiers: columns removed
    quasi_identifiers: list[QuasiIdentifierConfig] = read_if("enabled", True, default_factory=list)


@dataclass
class AnalyticsConfig:
    """Federated analytics released with the Laplace mechanism (pure, user-level DP; fedpriv.analytics),
    each release recorded in the run's ledger (central) or in each client's own ledger (local)."""

    # none | central (privacy none/central: a trusted server adds the noise; user level) | local (privacy=local:
    # each client noises its own figures, example level, in its own DP-SGD ledger)
    mode: str = field(default="none", metadata=SELECTS)
    # Epsilon of the label distribution released once before training. central: each client's label counts
    # normalised to sum 1 (L1 sensitivity 1 per client); local: each client's counts (1 per example).
    epsilon_label_histogram: Optional[float] = read_if("mode", "central", "local", default=0.5)
    # Epsilon of EACH validation release of the round's incoming global model on the sampled clients' own
    # held-out rows. central: the sum of their accuracies in [0, 1] and their count (L1 sensitivity 2 per
    # client); local: each client's number of correct predictions (1 per example). null: not released.
    epsilon_validation: Optional[float] = read_if("mode", "central", "local", default=0.2)
    validation_every: int = read_if("mode", "central", "local", default=1)  # release it every k rounds


@dataclass
class SelectionConfig:
    """Which round's global model is shipped as model.pt (fedpriv.selection); the candidates are the
    models the federated analytics validated (analytics=central or local, with epsilon_validation set)."""

    # last: the last model (nothing to account) | noisy_max: the exponential mechanism over the RAW
    # validation sums (trusted server; costs epsilon) | released_argmax: the best RELEASED (noisy)
    # validation accuracy (post-processing, free).
    method: str = field(default="last", metadata=SELECTS)
    # noisy_max's cost: pure, user-level epsilon (add/remove-one client), added to the run's total.
    epsilon: Optional[float] = read_if("method", "noisy_max", default=None)


@dataclass
class RunConfig:
    seed: int = 0
    num_clients: int = 20
    clients_per_round: int = 10  # expected cohort; each client joins a round with q = clients_per_round / num_clients
    num_rounds: int = 15
    sampling: str = "poisson"  # poisson | fixed | all | cyclic: must match what the privacy accountant assumes
    # cyclic: client i belongs to group i mod G; round t samples only group (t-1) mod G, each member with
    # probability min(1, clients_per_round * G / num_clients). None: num_clients // clients_per_round groups
    # (each client exactly once every G rounds). BandMF needs G >= privacy.bands; DP-FTRL restarts its tree every G.
    cyclic_groups: Optional[int] = read_if("sampling", "cyclic", default=None)
    client_mode: str = "virtual"  # virtual (simulation: any node acts for any client) | nodes (one node = one client)
    round_timeout: float = 300.0  # seconds to wait for a round's replies; a slower client counts as dropped
    resume: bool = False  # continue the run in run_dir from its last checkpoint
    run_dir: Optional[str] = None  # set by the launcher (Hydra's output folder)
    device: str = "auto"  # client training device: auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    dataset: DatasetConfig = config_group(DatasetConfig)
    partition: PartitionConfig = config_group(PartitionConfig)
    model: ModelConfig = config_group(ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = config_group(StrategyConfig)
    placement: PlacementConfig = config_group(PlacementConfig)
    privacy: PrivacyConfig = config_group(PrivacyConfig)
    schedule: ScheduleConfig = config_group(ScheduleConfig)
    tracking: TrackingConfig = config_group(TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = config_group(AuditConfig)
    exposure: ExposureConfig = field(default_factory=ExposureConfig)  # planted secrets (text data sets)
    analytics: AnalyticsConfig = config_group(AnalyticsConfig)  # Laplace-noised label histogram, validation
    anonymisation: AnonymisationConfig = config_group(AnonymisationConfig)  # each client's rows, before training
    selection: SelectionConfig = config_group(SelectionConfig)  # which round's model is shipped


def group_schemas() -> dict[str, type]:
    """Each config group (``conf/<group>/``) and its schema."""
    return {f.name: f.default_factory for f in fields(RunConfig) if f.metadata.get("group")}  # type: ignore[misc]


def selector_key(group: str) -> str | None:
    """The key whose value names the group's option (``privacy`` -> ``privacy.mode``), if any."""
    schema = group_schemas().get(group)
    for f in fields(schema) if schema is not None else ():
        if f.metadata.get("selects"):
            return f"{group}.{f.name}"
    return None


def field_default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore: ``base_config`` (the root) and ``<group>/base``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for name, schema in group_schemas().items():
        cs.store(group=name, name="base", node=schema)
