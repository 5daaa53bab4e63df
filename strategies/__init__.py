"""Server strategies: Flower's aggregation strategies, and the central-DP wrapper around them."""

from strategies.aggregator import FlowerAggregator
from strategies.factory import build_aggregator, build_flower_strategy

__all__ = ["FlowerAggregator", "build_aggregator", "build_flower_strategy"]
