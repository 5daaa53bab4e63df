"""k-anonymity (and l-diversity) of one table: rows in, released rows and a report out.

:func:`anonymise` is the step a client runs on its own rows before it trains: remove the direct
identifiers, generalise the quasi-identifiers (QIs) along their hierarchies, suppress (withhold)
the rows that still sit in an equivalence class smaller than ``k`` (or, when asked, with fewer
than ``l`` distinct values of the sensitive column), within a bound on the rows withheld. The
search (which QI to generalise next, when to suppress) is anjana's (Datafly-style greedy,
full-domain generalisation); k and l of the released table are checked with pycanon, and the
function refuses to release a table that fails the check, whatever the search returned.

What k-anonymity protects against: linking a released row to a person through the QIs (each
released row matches at least k people's QIs). What it does not: it is not differential privacy
(the model trained on the rows carries no epsilon from it); without l-diversity every row of a
class may share the diagnosis (attribute disclosure); an attacker who knows more than the QIs
(background knowledge, other columns) is outside its model.

anjana and pycanon are imported where used: a run without anonymisation never loads them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpriv.anonymisation import hierarchy as hier
from fedpriv.config_schema import AnonymisationConfig
from fedpriv.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

STRIDE = 1_000_000  # anjana sees each level's labels as integer codes level * STRIDE + i (see _codes)
ROW = "_row"  # the input position of each row, carried through anjana to know which rows were released


@dataclass
class Released:
    """One anonymised table.

    ``table``: the released rows (identifiers removed, QIs as labels such as ``[40, 50)`` or ``*``,
    other columns unchanged); ``kept``: their positions in the input, ascending; ``levels``: the
    generalisation level of each QI; ``report``: the figures of :func:`table_report` (raw,
    data-dependent: for the operator, not for publication).
    """

    table: Any
    kept: np.ndarray
    levels: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)


def class_sizes(frame: pd.DataFrame, qis: Sequence[str]) -> np.ndarray:
    """The size of every equivalence class (rows sharing all QI values), counted with pandas."""
    return frame.groupby(list(qis), dropna=False, sort=False).size().to_numpy()


def risk(frame: pd.DataFrame, qis: Sequence[str]) -> dict[str, float]:
    """Re-identification risk of a table under linkage on the QIs (prosecutor model: the attacker
    knows the person is in the table and knows their QIs).

    ``unique_fraction``: share of rows alone in their class (identified by the QIs alone);
    ``prosecutor_max``: 1 / smallest class size (the most exposed row's chance of being singled out);
    ``prosecutor_mean``: mean over rows of 1 / their class size (= classes / rows).
    """
    sizes = class_sizes(frame, qis)
    rows = int(sizes.sum())
    return {
        "rows": rows,
        "classes": len(sizes),
        "k": int(sizes.min()),
        "unique_fraction": float(sizes[sizes == 1].sum() / rows),
        "prosecutor_max": float(1.0 / sizes.min()),
        "prosecutor_mean": float(len(sizes) / rows),
    }


def homogeneous_fraction(frame: pd.DataFrame, qis: Sequence[str], sensitive: str) -> float:
    """Share of rows whose class holds one value of the sensitive column: linking such a row to its
    class reveals that value (attribute disclosure), however large the class."""
    distinct = frame.groupby(list(qis), dropna=False)[sensitive].transform("nunique")
    return float((distinct == 1).mean())


def _codes(cfg: AnonymisationConfig, frame: pd.DataFrame) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """anjana's hierarchy tables and each QI column as level-0 codes.

    anjana wants, per QI, one array per level, parallel over the column's distinct values; it
    finds a value's position in level l-1 and reads level l there. Integer codes (not strings)
    keep pandas 3 from turning the columns into Arrow strings, which anjana 1.2.3 rejects.
    """
    import pandas as pd

    tables, columns = {}, {}
    for name, spec in hier.specs(cfg).items():
        base = np.unique(frame[name].to_numpy(dtype=np.float64))
        levels = {}
        for lvl in range(hier.num_levels(spec) + 1):
            labels = [hier.label(spec, v, lvl) for v in base]
            index = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
            levels[lvl] = pd.Series([lvl * STRIDE + index[lab] for lab in labels], dtype=np.int64)
        tables[name] = levels
        columns[name] = levels[0].to_numpy()[np.searchsorted(base, frame[name].to_numpy(dtype=np.float64))]
    return tables, columns


def _search(cfg: AnonymisationConfig, coded: pd.DataFrame, sensitive: str, tables: dict) -> pd.DataFrame:
    """anjana's search; its progress prints are swallowed (they name k and l of a client's table)."""
    from anjana.anonymity import k_anonymity, l_diversity

    qis = list(hier.specs(cfg))
    percent = 100.0 * cfg.max_suppression  # anjana's supp_level is a percentage of the rows
    with contextlib.redirect_stdout(io.StringIO()):
        if cfg.l_diversity is None:
            return k_anonymity(coded, [], qis, cfg.k, percent, tables)
        return l_diversity(coded, [], qis, sensitive, cfg.k, cfg.l_diversity, percent, tables)


def anonymise(table: pd.DataFrame, cfg: AnonymisationConfig, sensitive: str) -> Released:
    """Anonymise one table; refuse (ConfigError / DataError, one line) what cannot be done as configured.

    ``table``: one client's rows, one column per feature plus ``sensitive`` (the target; its
    l-diversity is what ``cfg.l_diversity`` asks for). ``cfg``: k, l, the bound on rows withheld,
    the identifiers (removed) and the QIs with their hierarchies. The input is not modified.
    """
    import pandas as pd
    import pycanon.anonymity

    hier.check_config(cfg, list(table.columns), sensitive)
    qis = list(hier.specs(cfg))
    hier.check_coverage(cfg, {q: table[q].to_numpy() for q in qis})
    n = len(table)
    if n < cfg.k:
        raise DataError(f"anonymisation: a table of {n} rows cannot be {cfg.k}-anonymous (k > rows)")
    data = table.drop(columns=list(cfg.identifiers)).reset_index(drop=True)
    tables, columns = _codes(cfg, data)
    coded = pd.DataFrame({**columns, sensitive: data[sensitive].to_numpy(), ROW: np.arange(n)})
    out = _search(cfg, coded, sensitive, tables)
    asked = f"{cfg.k}-anonymous" + (f" and {cfg.l_diversity}-diverse" if cfg.l_diversity else "")
    if len(out) == 0:
        raise DataError(f"anonymisation: a table of {n} rows cannot be made {asked} with at most "
                        f"{cfg.max_suppression:.0%} of its rows withheld, even with every QI at '*'")
    out = out[[*qis, sensitive, ROW]].sort_values(ROW).reset_index(drop=True)
    kept = out[ROW].to_numpy(dtype=np.int64)
    # Checked here, not trusted: the library's k and l of the released table, and the rows withheld.
    k_ok = pycanon.anonymity.k_anonymity(out, qis) >= cfg.k
    l_ok = cfg.l_diversity is None or pycanon.anonymity.l_diversity(out, qis, [sensitive]) >= cfg.l_diversity
    if not (k_ok and l_ok) or n - len(kept) > cfg.max_suppression * n + 1e-9:
        raise DataError(f"anonymisation: the search returned a table that is not {asked} within the "
                        f"suppression bound; nothing is released")
    levels = {}
    for q in qis:
        found = set((out[q].to_numpy() // STRIDE).tolist())
        if len(found) != 1:  # full-domain generalisation: one level per column
            raise DataError(f"anonymisation: column {q} came back at mixed levels {sorted(found)}")
        levels[q] = found.pop()
    released = data.iloc[kept].reset_index(drop=True)
    for q in qis:
        spec = hier.specs(cfg)[q]
        released[q] = pd.Series([hier.label(spec, v, levels[q]) for v in released[q].to_numpy(dtype=np.float64)],
                                dtype=object)
    result = Released(released, kept, levels)
    result.report = table_report(cfg, data, result, sensitive)
    return result


def table_report(cfg: AnonymisationConfig, raw: pd.DataFrame, released: Released, sensitive: str) -> dict[str, Any]:
    """The figures of one anonymised table (raw, data-dependent: operator-only).

    k and l achieved: pycanon's check of the released table. Information loss: the generalisation
    intensity (mean over QIs of level / top level: 0 = exact values, 1 = every QI withheld) and the
    discernibility metric (pycanon: sum of squared class sizes, each withheld row charged the
    table's size), given per row (the mean number of rows a row cannot be told apart from).
    Re-identification risk (:func:`risk`) of the raw table's QIs and of the released one.
    """
    import pycanon.anonymity
    import pycanon.metrics

    qis = list(hier.specs(cfg))
    table = released.table
    n, m = len(raw), len(table)
    raw_dm = float(sum(int(s) ** 2 for s in class_sizes(raw, qis)))
    dm = float(pycanon.metrics.discernability_metric(raw, table, qis))
    return {
        "rows": n,
        "rows_released": m,
        "rows_suppressed": n - m,
        "suppressed_fraction": (n - m) / n,
        "k_requested": cfg.k,
        "k_achieved": int(pycanon.anonymity.k_anonymity(table, qis)),
        "l_requested": cfg.l_diversity,
        "l_achieved": int(pycanon.anonymity.l_diversity(table, qis, [sensitive])),
        "generalisation": {q: {"level": lvl, "top": hier.num_levels(hier.specs(cfg)[q]),
                               "meaning": hier.level_meaning(hier.specs(cfg)[q], lvl)}
                           for q, lvl in released.levels.items()},
        "information_loss": {
            "generalisation_intensity": float(np.mean([lvl / hier.num_levels(hier.specs(cfg)[q])
                                                       for q, lvl in released.levels.items()])),
            "discernibility_per_row_before": raw_dm / n,
            "discernibility_per_row": dm / n,
            "average_class_size": m / max(1, len(class_sizes(table, qis))),
        },
        "risk_before": {**risk(raw, qis), "homogeneous_fraction": homogeneous_fraction(raw, qis, sensitive)},
        "risk_after": {**risk(table, qis), "homogeneous_fraction": homogeneous_fraction(table, qis, sensitive)},
    }


def trained_features(cfg: AnonymisationConfig, raw: np.ndarray, columns: Sequence[str], released: Released,
                     fill: np.ndarray) -> np.ndarray:
    """The released rows as model features, in the raw table's units: a QI at its level's number
    (exact value, band midpoint, or ``fill`` of its column for ``*``), other columns as they were.

    ``raw``: the input rows (float, one column per name in ``columns``, identifiers included);
    identifier columns train as ``fill`` (their value is gone from every released row).
    """
    x = np.array(raw[released.kept], dtype=np.float64)
    for j, name in enumerate(columns):
        if name in cfg.identifiers:
            x[:, j] = fill[j]
        elif name in hier.specs(cfg):
            spec, lvl = hier.specs(cfg)[name], released.levels[name]
            x[:, j] = [hier.trained_value(spec, v, lvl, fill[j]) for v in x[:, j]]
    return x
