"""Preflight: everything a run and every one of its clients will need, checked before any work.

The schema (:mod:`fedpriv.config`) refuses bad keys and values; this goes further, the way a
client would: it reads the data set, builds the partition and every client's rows (for data generated per
client on demand, Synthetic: every row count a client can have, never the population's rows), builds the
model and the server's privacy plan, and under local DP every client's DP-SGD plan (the same
calibration the client will run). Whatever would otherwise fail in every client after Ray started
(and end "completed" with an untrained model) is refused here in one line; what would run but
destroy the model (a noise far larger than the signal) is a one-line warning.
"""

from __future__ import annotations

import logging

import numpy as np

from fedpriv.anonymisation.report import check_anonymisation
from fedpriv.config import ConfigError, RunConfig
from fedpriv.data import SyntheticDataset, client_split, partition_indices
from fedpriv.data.synthetic import possible_row_counts
from fedpriv.errors import DataError, UserError
from fedpriv.gpu_fit import check_gpu_fit, visible_gpu_info
from fedpriv.language_model import base_bytes
from fedpriv.privacy.local import noise_plan, planned_participations, sampling_plan
from fedpriv.run_folder import check_run_folder
from fedpriv.simulation import check_placement, visible_gpus
from fedpriv.task import dataset_for, is_language_model, new_model, partition_params
from strategies import build_aggregator

log = logging.getLogger("fedpriv")


def preflight(rc: RunConfig) -> list[str]:
    """Refuse (one line) what cannot run; return one-line warnings for what should not."""
    check_run_folder(rc)  # a wrong resume or a folder holding another run: refused, folder untouched
    check_placement(rc.placement)
    if rc.device == "cuda" and visible_gpus() == 0:
        raise ConfigError("config key 'device': cuda, but this machine shows no CUDA GPU; use device=auto or cpu")
    try:
        ds = dataset_for(rc)
    except DataError as exc:
        raise UserError(f"data: {exc}") from None
    if rc.partition.scheme == "natural" and ds.natural_ids is None and not isinstance(ds, SyntheticDataset):
        raise ConfigError(f"config key 'partition.scheme': natural needs a data set with natural clients; "
                          f"{rc.dataset.name} has none")
    try:
        model = new_model(rc)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"config key 'model.name': {exc}") from None
    if is_language_model(rc) and rc.placement.address is None:  # a cluster's GPUs are not ours to see
        pl = rc.placement
        check_gpu_fit(dtype=rc.model.dtype, workers_gpu_share=pl.num_gpus_per_client,
                      server_on_gpu=pl.server_device == "cuda" or (pl.server_device == "auto" and visible_gpus() > 0),
                      base_bytes=base_bytes(model), trainable_numbers=model.travelling_parameters(),
                      gpus=visible_gpu_info())
    rows = client_rows(rc, ds)
    if rc.anonymisation.enabled:  # every client's table anonymised as the client will; what cannot be is refused
        released = check_anonymisation(rc, ds)
        rows = released if rc.client_mode == "virtual" else rows
    aggregator = build_aggregator(rc)  # the server's privacy plan: an impossible budget fails here
    warnings = []
    if rc.privacy.mode in ("central", "central_local"):
        warnings += central_noise_warnings(rc, aggregator.plan)
    if rc.privacy.mode in ("local", "central_local"):
        warnings += check_local_plans(rc, rows)
    return warnings


def client_rows(rc: RunConfig, ds) -> np.ndarray:
    """Every client's number of training rows; refuses a partition that leaves a client empty."""
    p = rc.partition
    if rc.client_mode == "nodes":
        return np.zeros(0, dtype=int)  # each SuperNode brings its own data
    if isinstance(ds, SyntheticDataset):
        return synthetic_rows(rc)
    if p.scheme == "shard" and rc.num_clients * p.shards_per_client > len(ds.y_train):
        raise ConfigError(f"config key 'partition.shards_per_client': {rc.num_clients} clients x {p.shards_per_client} "
                          f"shards need {rc.num_clients * p.shards_per_client} shards of at least one row; "
                          f"{rc.dataset.name} has {len(ds.y_train)} training rows")
    try:
        parts = partition_indices(ds, p.scheme, rc.num_clients, rc.seed, **partition_params(rc))
    except (ValueError, ZeroDivisionError) as exc:  # flwr-datasets divides by zero for too many shards
        key = {"dirichlet": "partition.alpha", "shard": "partition.shards_per_client",
               "pathological": "partition.classes_per_client"}.get(p.scheme, "partition.scheme")
        raise ConfigError(f"config key '{key}': the {p.scheme} partition of {rc.dataset.name} over "
                          f"{rc.num_clients} clients fails: {(str(exc) or type(exc).__name__).splitlines()[0]}") from None
    if len(parts) != rc.num_clients:
        raise ConfigError(f"config key 'num_clients': {rc.num_clients}, but the {p.scheme} partition of "
                          f"{rc.dataset.name} has {len(parts)} clients")
    rows = np.array([len(client_split(idx, rc.data.val_fraction, rc.seed, c)[0]) if len(idx) else 0
                     for c, idx in enumerate(parts)])
    empty = int(np.sum(rows == 0))
    if empty:
        hint = {"dirichlet": "raise partition.alpha", "shard": "lower partition.shards_per_client"}.get(p.scheme, "")
        raise ConfigError(f"config key 'partition': {empty} of {rc.num_clients} clients get no training rows "
                          f"({p.scheme}); {hint + ' or ' if hint else ''}lower num_clients")
    return rows


def synthetic_rows(rc: RunConfig) -> np.ndarray:
    """Synthetic clients are generated on demand: every training-row count a client can have (at least
    50 rows, so none is empty), whatever the population: O(1), not one generator per client."""
    return np.unique([len(client_split(np.arange(n), rc.data.val_fraction, rc.seed, 0)[0])
                      for n in possible_row_counts()])


def central_noise_warnings(rc: RunConfig, plan) -> list[str]:
    """A noise whose std on the average exceeds a whole clipped update (z >= E[m]) drowns the signal."""
    z = max(plan.noise_multipliers) if plan.noise_multipliers else 0.0
    if z >= plan.denominator > 0:
        return [f"privacy: noise multiplier {z:.3g} with an expected cohort of {plan.denominator:g}: the noise on the "
                f"average update has std {z / plan.denominator:.3g} x clip_norm in every coordinate, more than a whole "
                f"clipped update's norm; expect the model not to learn (raise target_epsilon or clients_per_round)"]
    return []


def check_local_plans(rc: RunConfig, rows: np.ndarray) -> list[str]:
    """Every client's DP-SGD plan, as the client will compute it: impossible ones refused."""
    lo = rc.privacy.local
    if lo.noise_multiplier is not None and not lo.noise_multiplier >= 0:
        raise ConfigError(f"config key 'privacy.local.noise_multiplier': must be >= 0, got {lo.noise_multiplier}")
    if lo.grad_sample_mode == "ghost" and lo.clipping != "flat":
        raise ConfigError("config key 'privacy.local.clipping': per_layer needs grad_sample_mode hooks, functorch or "
                          "ew; ghost clipping supports only clipping=flat")
    planned_participations(rc)  # refuses expected_rounds < 1
    largest = 0.0
    # One calibration per distinct row count (cached), the client's own: DP-SGD composed with its planned
    # analytics=local releases; analytics that spend the budget alone are refused here (ConfigError).
    for n in sorted(set(int(r) for r in rows)):
        zs = noise_plan(rc, sampling_plan(n, rc.train.batch_size, rc.train.local_epochs))
        largest = max(largest, max(zs))
    if largest > 10:
        return [f"privacy.local: DP-SGD needs noise multiplier up to {largest:.3g} per step for "
                f"target_epsilon={lo.target_epsilon}; expect the model not to learn (raise the budget or the batch)"]
    return []
