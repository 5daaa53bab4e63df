"""fedpriv: private federated learning on Flower.

Packages: ``fedpriv`` (config, data, models, privacy, tracking, the two Flower apps, launchers),
``strategies`` (server-side aggregation and central DP), ``clients`` (local training, DP-SGD).
"""

__version__ = "0.1.0"
