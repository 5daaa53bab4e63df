"""A client's own rows, anonymised, as it trains on them (the same in simulation and deployment).

The client takes its rows (training and validation split together: its whole table) in their raw
units from the data set's :class:`~fedpriv.data.tabular.RawTable`, anonymises them
(:func:`fedpriv.anonymisation.kanon.anonymise`), encodes each generalised QI as a number (band
midpoint; ``*`` as the training rows' mean) and standardises the result exactly as the loader
standardised the data set. Suppressed rows are dropped from both splits.

Cached per process: a client loads its rows every round, and the result depends only on the
anonymisation configuration, the data set and the client's row indices.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from fedpriv.anonymisation.kanon import Released, anonymise, trained_features
from fedpriv.config import RunConfig
from fedpriv.data import FederatedDataset
from fedpriv.data.tabular import RAW_TABLES, RawTable
from fedpriv.errors import ConfigError

SENSITIVE = "label"  # the target: l-diversity is measured on it
_tables: dict[tuple, RawTable] = {}


def raw_table(rc: RunConfig, ds: FederatedDataset) -> RawTable:
    """The data set's raw, named columns; refuses a data set that has none (images, text)."""
    loader = RAW_TABLES.get(rc.dataset.name)
    if loader is None or ds.task != "tabular":
        raise ConfigError(f"config key 'anonymisation.enabled': anonymisation needs a tabular data set with named "
                          f"columns ({', '.join(RAW_TABLES)}); dataset.name={rc.dataset.name} is {ds.task} data")
    key = (rc.dataset.name, rc.data.root)
    if key not in _tables:
        _tables[key] = loader(rc.data.root)
    return _tables[key]


def client_table(table: RawTable, y: np.ndarray, idx: np.ndarray):
    """One client's rows as a DataFrame: the raw columns plus the target."""
    import pandas as pd

    frame = pd.DataFrame(np.asarray(table.x_train[idx], dtype=np.float64), columns=list(table.columns))
    frame[SENSITIVE] = np.asarray(y[idx])
    return frame


_cache: dict[tuple, Released] = {}


def anonymised_table(rc: RunConfig, ds: FederatedDataset, idx: np.ndarray) -> Released:
    """The anonymised table of the rows ``idx`` of the data set (a client's whole table)."""
    cfg = rc.anonymisation
    key = (json.dumps(asdict(cfg), sort_keys=True), rc.dataset.name, rc.data.root, np.asarray(idx).tobytes())
    if key not in _cache:
        table = raw_table(rc, ds)
        if len(_cache) >= 64:
            _cache.clear()
        _cache[key] = anonymise(client_table(table, ds.y_train, idx), cfg, SENSITIVE)
    return _cache[key]


def anonymised_rows(rc: RunConfig, ds: FederatedDataset, tr: np.ndarray, va: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_val, y_val)`` of a client whose rows are ``tr`` and ``va``, anonymised
    together (its whole table) and standardised as the data set was; suppressed rows are gone."""
    table = raw_table(rc, ds)
    idx = np.concatenate([tr, va])
    released = anonymised_table(rc, ds, idx)
    x = trained_features(rc.anonymisation, np.asarray(table.x_train[idx], dtype=np.float64), table.columns,
                         released, table.mean)
    x = ((x - table.mean) / table.std).astype(np.float32)
    y = np.asarray(ds.y_train[idx][released.kept], dtype=np.int64)
    train = released.kept < len(tr)
    return x[train], y[train], x[~train], y[~train]
