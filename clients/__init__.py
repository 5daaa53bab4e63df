"""Client-side logic: local training (plain and DP-SGD) and what a client does to its update."""

from clients.training import train

__all__ = ["train"]
