"""Tabular data: UCI Heart Disease, four hospitals as natural clients (cross-silo)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .base import DataError, FederatedDataset
from .holdout import HOLDOUT_FRACTION, HOLDOUT_SEED, readonly, stratified_holdout
from .locate import candidate_dirs, find_files, not_found

HEART_HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
HEART_FEATURES = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
)


def read_heart_disease(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All usable rows of the four hospitals: ``(features float64 (N, 10), y, hospital)``.

    Columns ``slope``, ``ca``, ``thal`` are dropped, then rows with a missing (``?``)
    feature or target; target is ``num > 0``. Sizes 303 / 261 / 46 / 130.
    """
    names = {h: f"processed.{h}.data" for h in HEART_HOSPITALS}
    files, notes = find_files(candidate_dirs(root, "heart-disease"), names, gz_ok=False)
    if files is None:
        raise not_found("UCI heart disease files (processed.{cleveland,hungarian,switzerland,va}.data)", notes)
    feats, ys, hosp = [], [], []
    for h_id, h in enumerate(HEART_HOSPITALS):
        path = files[h]
        try:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        header = [c.strip() for c in lines[0].split(",")] if lines else []
        missing = [c for c in (*HEART_FEATURES, "num") if c not in header]
        if missing:
            raise DataError(f"{path}: header lacks column(s) {', '.join(missing)}")
        cols = [header.index(c) for c in (*HEART_FEATURES, "num")]
        rows = []
        for n, line in enumerate(lines[1:], start=2):
            values = [v.strip() for v in line.split(",")]
            if len(values) != len(header):
                raise DataError(f"{path}: line {n} has {len(values)} fields, header has {len(header)}")
            try:
                rows.append([np.nan if values[c] == "?" else float(values[c]) for c in cols])
            except ValueError as exc:
                raise DataError(f"{path}: line {n}: {exc}") from None
        table = np.array(rows, dtype=np.float64).reshape(-1, len(cols))
        table = table[~np.isnan(table).any(axis=1)]
        feats.append(table[:, :-1])
        ys.append((table[:, -1] > 0).astype(np.int64))
        hosp.append(np.full(len(table), h_id, dtype=np.int64))
    return np.concatenate(feats), np.concatenate(ys), np.concatenate(hosp)


@dataclass(frozen=True, eq=False)
class RawTable:
    """A tabular data set's training rows before standardisation, for client-side steps that need the
    real values (anonymisation generalises ages into bands, not z-scores).

    ``x_train`` holds the same rows, in the same order, as the loaded data set's ``x_train``;
    ``mean`` / ``std`` are the standardisation the loader applied (``x = (raw - mean) / std``), so a
    transformed raw row goes back into the model's feature space the same way.
    """

    columns: tuple[str, ...]
    x_train: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def _heart_split(root: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(raw features, labels, hospital, test mask): the one split every caller shares."""
    x, y, hosp = read_heart_disease(root)
    return x, y, hosp, stratified_holdout(y, HOLDOUT_FRACTION, HOLDOUT_SEED, groups=hosp)


def _standardisation(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return mean, std


def heart_disease_raw(root: str | os.PathLike | None = None) -> RawTable:
    """The heart-disease training rows in their own units (years, mm Hg, mg/dl, codes)."""
    x, _, _, test = _heart_split(root)
    mean, std = _standardisation(x[~test])
    raw = x[~test]
    readonly(raw, mean, std)
    return RawTable(HEART_FEATURES, raw, mean, std)


# Data sets whose raw, named columns a client-side step can read (fedpriv.anonymisation).
RAW_TABLES = {"heart_disease": heart_disease_raw}


def load_heart_disease(root: str | os.PathLike | None = None) -> FederatedDataset:
    """UCI Heart Disease, four hospitals as natural clients (cross-silo).

    Test split: 20% of every (hospital, label) cell, fixed seed, pooled into one
    central test set. Features standardised with the training rows' mean/std (pooled
    over hospitals: a central preprocessing step, not covered by any privacy budget).
    """
    x, y, hosp, test = _heart_split(root)
    mean, std = _standardisation(x[~test])
    x = ((x - mean) / std).astype(np.float32)
    x_train, y_train, nat = x[~test], y[~test], hosp[~test]
    x_test, y_test = x[test], y[test]
    readonly(x_train, y_train, nat, x_test, y_test)
    return FederatedDataset(
        name="heart_disease",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=2,
        input_shape=(len(HEART_FEATURES),),
        task="tabular",
        natural_ids=nat,
        natural_names=HEART_HOSPITALS,
    )
