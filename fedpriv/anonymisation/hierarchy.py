"""Generalisation hierarchies of quasi-identifiers: the configuration's checks, each level's labels,
and the number a generalised value trains as.

A quasi-identifier (QI) is a column an outsider can know about a person and link on (age, sex, a
routine measurement). Its hierarchy climbs from the exact value (level 0) through nested bands
(numeric: ``[40, 45)`` -> ``[40, 50)`` -> ``[40, 60)``) or straight (categorical) to ``*``, the value
withheld. Generalisation is full-domain: one level for the whole column of a client's table.

Written here rather than taken from anjana: anjana applies a hierarchy but takes it as given
tables; building the tables from a short configuration (widths and a domain), checking that they
cover the data and nest, and turning a band back into a model feature is this project's part.
This module is pure (numpy only) and imports no anonymisation library.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from fedpriv.config_schema import AnonymisationConfig, QuasiIdentifierConfig
from fedpriv.errors import ConfigError

STAR = "*"  # the top of every hierarchy: the value withheld
KEY = "anonymisation"


def _refuse(key: str, message: str) -> None:
    raise ConfigError(f"config key '{KEY}.{key}': {message}")


def fmt(value: float) -> str:
    """A value as it appears in a label (``63``, ``2.3``)."""
    return f"{float(value):g}"


def specs(cfg: AnonymisationConfig) -> dict[str, QuasiIdentifierConfig]:
    """The QIs by column name, in the configuration's order."""
    return {q.column: q for q in cfg.quasi_identifiers}


def _qi_key(cfg: AnonymisationConfig, name: str) -> str:
    """``quasi_identifiers.<i>`` of column ``name`` (the configuration's list index)."""
    index = next(i for i, q in enumerate(cfg.quasi_identifiers) if q.column == name)
    return f"quasi_identifiers.{index}"


def is_numeric(spec: QuasiIdentifierConfig) -> bool:
    return bool(spec.bands)


def num_levels(spec: QuasiIdentifierConfig) -> int:
    """Levels above the exact value: one per band width, then ``*``."""
    return len(spec.bands) + 1


def level_meaning(spec: QuasiIdentifierConfig, level: int) -> str:
    """What a level means, in words (``bands of 10``)."""
    if level == 0:
        return "exact value"
    if level == num_levels(spec):
        return "withheld (*)"
    return f"bands of {fmt(spec.bands[level - 1])}"


def describe(spec: QuasiIdentifierConfig) -> dict:
    """The hierarchy as published in privacy.json: its levels, and what it covers."""
    out = {"levels": [level_meaning(spec, lvl) for lvl in range(num_levels(spec) + 1)]}
    if is_numeric(spec):
        out["domain"] = f"[{fmt(spec.domain[0])}, {fmt(spec.domain[1])})"
        out["trains_as"] = "a band's midpoint; * as the training rows' mean"
    else:
        out["values"] = [fmt(v) for v in spec.values]
        out["trains_as"] = "the value; * as the training rows' mean"
    return out


def check_config(cfg: AnonymisationConfig, columns: Sequence[str], sensitive: str) -> None:
    """Refuse, in one line naming the key, a configuration that cannot anonymise these columns.

    ``columns``: the table's feature columns (the QIs and identifiers must be among them);
    ``sensitive``: the target column, never a QI (l-diversity is measured on it).
    """
    if cfg.k < 2:
        _refuse("k", f"must be >= 2 (k=1 is every table, no protection), got {cfg.k}")
    if cfg.l_diversity is not None and cfg.l_diversity < 2:
        _refuse("l_diversity", f"must be >= 2 or null (not asked), got {cfg.l_diversity}")
    if not 0 <= cfg.max_suppression < 1:
        _refuse("max_suppression", f"must be in [0, 1) (a share of a client's rows), got {cfg.max_suppression}")
    if not cfg.quasi_identifiers:
        _refuse("quasi_identifiers", "none given: name the columns an outsider could link on, with their hierarchies")
    known = [c for c in columns if c != sensitive]
    names = [q.column for q in cfg.quasi_identifiers]
    for i, name in enumerate(names):
        if name not in known:
            _refuse(f"quasi_identifiers.{i}.column",
                    f"unknown column {name!r}; the data set's columns: {', '.join(known)}")
        if name in names[:i]:
            _refuse(f"quasi_identifiers.{i}.column", f"{name} is listed twice")
    for name in cfg.identifiers:
        if name not in known:
            _refuse("identifiers", f"unknown column {name!r}; the data set's columns: {', '.join(known)}")
    both = sorted(set(names) & set(cfg.identifiers))
    if both:
        _refuse("identifiers", f"{', '.join(both)} cannot be both removed and generalised")
    for i, spec in enumerate(cfg.quasi_identifiers):
        check_hierarchy(f"quasi_identifiers.{i}", spec)


def check_hierarchy(key: str, spec: QuasiIdentifierConfig) -> None:
    """bands + domain (nested widths over [low, high)) or values, not both and not neither; ``key``
    is the QI's place in the configuration (``quasi_identifiers.0``)."""
    if bool(spec.bands) == bool(spec.values):
        _refuse(key, f"({spec.column}) give either bands and domain (a numeric column) or values "
                     f"(a categorical one)")
    if spec.values:
        if spec.domain:
            _refuse(f"{key}.domain", f"({spec.column}) a categorical column's hierarchy is its values; "
                                     f"domain is for bands")
        if len(set(spec.values)) != len(spec.values):
            _refuse(f"{key}.values", f"({spec.column}) repeated values in {list(spec.values)}")
        return
    if len(spec.domain) != 2 or not spec.domain[0] < spec.domain[1]:
        _refuse(f"{key}.domain", f"({spec.column}) must be [low, high) with low < high, got {list(spec.domain)}")
    widths = list(spec.bands)
    if any(not w > 0 for w in widths):
        _refuse(f"{key}.bands", f"({spec.column}) widths must be > 0, got {widths}")
    for finer, coarser in itertools.pairwise(widths):
        ratio = coarser / finer
        if ratio <= 1 or not math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-9):
            _refuse(f"{key}.bands", f"({spec.column}) each width must be a multiple (> 1) of the one before, "
                                    f"so that bands nest; got {fmt(finer)} then {fmt(coarser)}")


def outside(spec: QuasiIdentifierConfig, values: np.ndarray) -> int:
    """How many values the hierarchy does not cover (outside the domain, not a listed value, or NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if is_numeric(spec):
        low, high = spec.domain
        covered = (values >= low) & (values < high)
    else:
        covered = np.isin(values, np.asarray(spec.values, dtype=np.float64))
    return int(np.sum(~covered))


def check_coverage(cfg: AnonymisationConfig, table: dict[str, np.ndarray]) -> None:
    """Refuse a hierarchy that does not cover a column's values (no value is ever guessed into a band)."""
    for name, spec in specs(cfg).items():
        n = outside(spec, table[name])
        if n:
            what = (f"domain [{fmt(spec.domain[0])}, {fmt(spec.domain[1])})" if is_numeric(spec)
                    else f"values {[fmt(v) for v in spec.values]}")
            key = "domain" if is_numeric(spec) else "values"
            _refuse(f"{_qi_key(cfg, name)}.{key}", f"{n} row(s) of {name} hold a value outside the hierarchy's "
                                                   f"{what}; widen it (a value outside is never guessed into a band)")


def label(spec: QuasiIdentifierConfig, value: float, level: int) -> str:
    """The label of ``value`` at ``level``: ``63``, ``[60, 65)``, ``*``."""
    if level == 0:
        return fmt(value)
    if level >= num_levels(spec):
        return STAR
    width = spec.bands[level - 1]
    low = spec.domain[0]
    start = low + math.floor((value - low) / width) * width
    return f"[{fmt(start)}, {fmt(start + width)})"


def trained_value(spec: QuasiIdentifierConfig, value: float, level: int, fill: float) -> float:
    """The number a generalised value trains as: the exact value, a band's midpoint, or ``fill`` for ``*``
    (the training rows' mean, which standardises to 0: the model sees "no information")."""
    if level == 0:
        return float(value)
    if level >= num_levels(spec):
        return float(fill)
    width = spec.bands[level - 1]
    low = spec.domain[0]
    return low + math.floor((value - low) / width) * width + width / 2
