"""Client-side logic: local training (plain and DP-SGD) and what a client does to its update."""

from clients.training import evaluate, train

__all__ = ["train", "evaluate"]
