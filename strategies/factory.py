"""Build the Flower strategy (and its privacy wrapper) a configuration names."""

from __future__ import annotations

import logging

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from fedpriv.config import RunConfig


def _not_evaluation_skipped(record: logging.LogRecord) -> bool:
    """fedpriv evaluates centrally by design; Flower's notice that it skips federated evaluation is noise."""
    return "Federated evaluation will be skipped" not in str(record.msg)


logging.getLogger("flwr").addFilter(_not_evaluation_skipped)


def build_flower_strategy(rc: RunConfig) -> Strategy:
    """One of Flower's own strategies; client sampling is done by fedpriv, not by it."""
    s = rc.strategy
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1)
    if s.name == "fedavg":
        return FedAvg(**common)
    if s.name == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    if s.name == "fedavgm":
        return FedAvgM(server_learning_rate=s.server_lr, server_momentum=s.server_momentum, **common)
    if s.name == "fedadam":
        return FedAdam(eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **common)
    raise ValueError(f"unknown strategy {s.name!r}")


def build_aggregator(rc: RunConfig):
    """The server-side aggregation for ``rc``: plain, or wrapped with central DP."""
    from strategies.aggregator import FlowerAggregator

    inner = FlowerAggregator(build_flower_strategy(rc))
    if rc.privacy.mode in ("central", "central_local"):
        from strategies.central_dp import CentralDPAggregator

        return CentralDPAggregator.from_config(rc, inner)
    return inner
