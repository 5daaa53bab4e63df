"""Build the Flower strategy (and its privacy wrapper) a configuration names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from fedpriv.config import ConfigError, RunConfig, StrategyConfig
from strategies.aggregator import FlowerAggregator
from strategies.central_dp import CentralDPAggregator
from strategies.distributed_dp import DistributedDPAggregator


# The registry: config strategy.name -> builder. conf/strategy/<name>.yaml is what users choose from;
# the keys each strategy reads are marked in fedpriv.config_schema.StrategyConfig.
STRATEGIES: dict[str, Callable[[StrategyConfig, dict[str, Any]], Strategy]] = {
    "fedavg": lambda s, common: FedAvg(**common),
    "fedprox": lambda s, common: FedProx(proximal_mu=s.proximal_mu, **common),
    "fedavgm": lambda s, common: FedAvgM(server_learning_rate=s.server_lr, server_momentum=s.server_momentum, **common),
    "fedadam": lambda s, common: FedAdam(eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **common),
}


def build_flower_strategy(rc: RunConfig) -> Strategy:
    """One of Flower's own strategies; client sampling is done by fedpriv, not by it."""
    s = rc.strategy
    builder = STRATEGIES.get(s.name)
    if builder is None:
        raise ConfigError(f"config key 'strategy.name': got {s.name!r}; allowed: {', '.join(STRATEGIES)}")
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1)
    return builder(s, common)


def build_aggregator(rc: RunConfig):
    """The server-side aggregation for ``rc``: plain, or wrapped with central DP."""
    inner = FlowerAggregator(build_flower_strategy(rc))
    if rc.privacy.mode in ("central", "central_local"):
        return CentralDPAggregator.from_config(rc, inner)
    if rc.privacy.mode == "distributed":
        return DistributedDPAggregator.from_config(rc, inner)
    return inner
