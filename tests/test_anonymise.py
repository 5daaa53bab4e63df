"""Anonymisation of tabular records before training (fedpriv.anonymisation): k and l of what is
released, counted independently with pandas; suppression within its bound; risk figures against a
hand-made table; one-line refusals; and a heart-disease run end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data_dir

from fedpriv.anonymisation.hierarchy import check_config
from fedpriv.anonymisation.kanon import anonymise, homogeneous_fraction, risk
from fedpriv.compose import compose_config
from fedpriv.config import ConfigError
from fedpriv.config_schema import AnonymisationConfig, QuasiIdentifierConfig

AGE = QuasiIdentifierConfig(column="age", bands=[5, 10, 20], domain=[0, 100])
SEX = QuasiIdentifierConfig(column="sex", values=[0, 1])
BP = QuasiIdentifierConfig(column="bp", bands=[10, 20, 40], domain=[80, 240])


def config(**kw) -> AnonymisationConfig:
    base = {"enabled": True, "k": 5, "max_suppression": 0.05, "quasi_identifiers": [AGE, SEX, BP]}
    return AnonymisationConfig(**{**base, **kw})


def table(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": np.arange(n, dtype=float) + 1000,
        "age": rng.integers(28, 78, n).astype(float),
        "sex": rng.integers(0, 2, n).astype(float),
        "bp": rng.integers(90, 200, n).astype(float),
        "chol": rng.normal(240, 50, n),
        "label": rng.integers(0, 2, n),
    })


def contains(label: str, value: float) -> bool:
    """Does a released label cover the raw value? (parsed from the label's text, not from the library)"""
    if label == "*":
        return True
    m = re.fullmatch(r"\[(.+), (.+)\)", label)
    return float(m[1]) <= value < float(m[2]) if m else float(label) == value


# --- risk figures against a hand-made table ---------------------------------------------------

def test_risk_figures_of_a_hand_made_table():
    # classes on (age, sex): (23,0) x2, (35,1) x2, (35,0) x1, (47,1) x1
    t = pd.DataFrame({"age": [23, 23, 35, 35, 35, 47], "sex": [0, 0, 1, 1, 0, 1], "label": [1, 1, 0, 1, 0, 1]})
    r = risk(t, ["age", "sex"])
    assert r == {"rows": 6, "classes": 4, "k": 1, "unique_fraction": 2 / 6, "prosecutor_max": 1.0,
                 "prosecutor_mean": 4 / 6}
    # homogeneous classes: (23,0) all 1, (35,0) and (47,1) single rows; only (35,1) mixes -> 4 of 6 rows
    assert homogeneous_fraction(t, ["age", "sex"], "label") == pytest.approx(4 / 6)
    r = risk(t, ["sex"])  # classes of 3 and 3
    assert r["k"] == 3 and r["unique_fraction"] == 0 and r["prosecutor_max"] == pytest.approx(1 / 3)


# --- k, l and suppression, checked independently -----------------------------------------------

@pytest.mark.parametrize("k, l_div", [(2, None), (5, None), (10, None), (5, 2)])
def test_released_table_is_k_anonymous_and_l_diverse_by_an_independent_count(k, l_div):
    raw = table()
    cfg = config(k=k, l_diversity=l_div, identifiers=["id"])
    out = anonymise(raw, cfg, "label")
    released = out.table
    qis = ["age", "sex", "bp"]
    sizes = released.groupby(qis).size()
    assert sizes.min() >= k and out.report["k_achieved"] == sizes.min()
    if l_div:
        assert released.groupby(qis)["label"].nunique().min() >= l_div
    assert "id" not in released.columns  # the direct identifier is removed
    assert len(released) == len(out.kept) == 200 - out.report["rows_suppressed"]
    assert out.report["rows_suppressed"] <= cfg.max_suppression * 200
    # Each released row is its input row, generalised: its labels cover the raw values, the rest unchanged.
    src = raw.iloc[out.kept].reset_index(drop=True)
    for q in qis:
        assert all(contains(lab, v) for lab, v in zip(released[q], src[q]))
    np.testing.assert_array_equal(released["chol"].to_numpy(), src["chol"].to_numpy())
    np.testing.assert_array_equal(released["label"].to_numpy(), src["label"].to_numpy())
    assert out.report["risk_after"]["unique_fraction"] == 0
    assert out.report["risk_after"]["prosecutor_max"] <= 1 / k
    assert raw.equals(table())  # the input is left as it was


def test_suppression_withholds_the_outlier_within_its_bound():
    # nine rows share (30, 0); one (80, 1) is alone: withholding it (10% of the rows) makes k = 9
    t = pd.DataFrame({"age": [30.0] * 9 + [80.0], "sex": [0.0] * 9 + [1.0], "label": [0, 1] * 5})
    cfg = config(k=3, max_suppression=0.1, quasi_identifiers=[AGE, SEX])
    out = anonymise(t, cfg, "label")
    assert out.kept.tolist() == list(range(9)) and out.levels == {"age": 0, "sex": 0}
    assert out.report["rows_suppressed"] == 1 and out.report["k_achieved"] == 9
    # with a bound below one row, nothing may be withheld: the QIs are generalised instead
    out = anonymise(t, config(k=3, max_suppression=0.05, quasi_identifiers=[AGE, SEX]), "label")
    assert len(out.kept) == 10 and out.report["rows_suppressed"] == 0
    assert out.table.groupby(["age", "sex"]).size().min() >= 3


def test_a_table_smaller_than_k_is_refused():
    from fedpriv.errors import DataError

    with pytest.raises(DataError, match="cannot be 5-anonymous"):
        anonymise(table(4), config(), "label")


# --- one-line refusals ------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    ({"k": 1}, "anonymisation.k"),
    ({"l_diversity": 1}, "anonymisation.l_diversity"),
    ({"max_suppression": 1.0}, "anonymisation.max_suppression"),
    ({"quasi_identifiers": []}, "anonymisation.quasi_identifiers"),
    ({"quasi_identifiers": [AGE, QuasiIdentifierConfig(column="weight", values=[0])]},
     "anonymisation.quasi_identifiers.1.column"),
    ({"quasi_identifiers": [AGE, SEX, AGE]}, "anonymisation.quasi_identifiers.2.column"),
    ({"identifiers": ["name"]}, "anonymisation.identifiers"),
    ({"identifiers": ["age"]}, "anonymisation.identifiers"),
    ({"quasi_identifiers": [QuasiIdentifierConfig(column="age", bands=[5, 7], domain=[0, 100])]},
     "anonymisation.quasi_identifiers.0.bands"),
    ({"quasi_identifiers": [SEX, QuasiIdentifierConfig(column="age", bands=[5], domain=[100, 0])]},
     "anonymisation.quasi_identifiers.1.domain"),
    ({"quasi_identifiers": [QuasiIdentifierConfig(column="age")]}, "anonymisation.quasi_identifiers.0"),
])
def test_a_bad_configuration_is_refused_in_one_line_naming_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        check_config(config(**change), ["id", "age", "sex", "bp", "chol"], "label")
    assert f"config key '{key}'" in str(err.value) and "\n" not in str(err.value)


def test_a_hierarchy_that_does_not_cover_the_values_is_refused():
    t = table()
    t.loc[3, "age"] = 104.0  # outside [0, 100)
    with pytest.raises(ConfigError, match=r"anonymisation.quasi_identifiers.0.domain': 1 row\(s\) of age"):
        anonymise(t, config(), "label")
    t = table()
    t.loc[5, "sex"] = 2.0  # not a listed value
    with pytest.raises(ConfigError, match=r"anonymisation.quasi_identifiers.1.values': 1 row\(s\) of sex"):
        anonymise(t, config(), "label")


def test_anonymisation_of_a_non_tabular_data_set_is_refused_before_any_work(tmp_path):
    from fedpriv.preflight import preflight

    rc = compose_config(["dataset=digits", "anonymisation=heart_k5", "num_clients=4", "clients_per_round=2",
                         f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"config key 'anonymisation.enabled': .*digits is image data"):
        preflight(rc)


def test_an_owners_own_file_is_refused_under_anonymisation(tmp_path):
    from fedpriv.task import load_client_data

    rc = compose_config(["dataset=heart_disease", "anonymisation=heart_k5", "client_mode=nodes"])
    np.savez(tmp_path / "d.npz", x_train=np.zeros((3, 10), np.float32), y_train=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="data-path file is the owner's own"):
        load_client_data(rc, 0, {"data-path": str(tmp_path / "d.npz")})


# --- heart disease, four hospitals --------------------------------------------------------------

def heart_overrides(option: str) -> list[str]:
    d = shared_data_dir()
    if d is None or not (d / "heart-disease").is_dir():
        pytest.skip("heart-disease data not found: set FEDPRIV_DATA to a folder with heart-disease/ "
                    "(CI uses ../shared/data)")
    return ["dataset=heart_disease", f"anonymisation={option}", f"data.root={d}", "tracking.progress=false"]


def test_each_hospital_trains_on_k_anonymous_rows_counted_from_its_features():
    """Independent of the library: the QIs are read back from the very features a client trains on."""
    from fedpriv.data.tabular import heart_disease_raw
    from fedpriv.task import load_client_data

    rc = compose_config(heart_overrides("heart_k5_l2"))
    raw = heart_disease_raw(rc.data.root)
    cols = list(raw.columns)
    qis = [q.column for q in rc.anonymisation.quasi_identifiers]
    for c in range(4):
        d = load_client_data(rc, c)
        x = np.concatenate([d.x_train, d.x_val]) * raw.std + raw.mean  # back to years, mm Hg, mg/dl
        y = np.concatenate([d.y_train, d.y_val])
        frame = pd.DataFrame(np.round(x, 3), columns=cols).assign(label=y)
        assert frame.groupby(qis).size().min() >= 5
        assert frame.groupby(qis)["label"].nunique().min() >= 2
        plain = compose_config(heart_overrides("none"))
        rows = load_client_data(plain, c)
        assert len(frame) >= (1 - rc.anonymisation.max_suppression) * (len(rows.y_train) + len(rows.y_val)) - 1e-9


def test_a_heart_disease_run_end_to_end_reports_for_the_operator_and_publishes_only_the_configuration(
        tmp_path, flower_run_identity):
    from conftest import InProcessGrid

    from fedpriv.federation import run_federation
    from fedpriv.preflight import preflight

    rc = compose_config(heart_overrides("heart_k5") + ["num_rounds=2", f"run_dir={tmp_path}"])
    preflight(rc)
    summary = run_federation(InProcessGrid(2), rc)
    assert summary["final_accuracy"] > 0.6  # the logreg model trains on the generalised rows
    operator = json.loads((tmp_path / "operator_only" / "anonymisation.json").read_text())
    assert [c["name"] for c in operator["clients"]] == ["cleveland", "hungarian", "switzerland", "va"]
    for c in operator["clients"]:
        assert c["k_achieved"] >= 5 and c["rows_suppressed"] <= 0.05 * c["rows"]
        assert c["risk_after"]["unique_fraction"] == 0 < c["risk_before"]["unique_fraction"]
    section = json.loads((tmp_path / "privacy.json").read_text())["anonymisation"]
    assert section["k"] == 5 and set(section["quasi_identifiers"]) == {"age", "sex", "trestbps", "chol"}
    assert "linkage" in section["protects_against"]
    assert any("not differential privacy" in s for s in section["does_not_protect_against"])
    assert "operator_only/anonymisation.json" in section["operator_only"]
    published = "".join((tmp_path / f).read_text() for f in ("privacy.json", "summary.json", "metrics.jsonl"))
    for raw_figure in ("k_achieved", "rows_suppressed", "unique_fraction", "prosecutor"):
        assert raw_figure not in published


def test_a_supernode_of_a_deployment_gets_the_same_anonymised_rows_as_the_simulated_client():
    from fedpriv.task import load_client_data

    sim = compose_config(heart_overrides("heart_k5"))
    nodes = compose_config(heart_overrides("heart_k5") + ["client_mode=nodes"])
    for c in range(4):
        a = load_client_data(sim, c)
        b = load_client_data(nodes, 0, {"partition-id": c, "num-partitions": 4})
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_val, b.y_val)
    # and they are not the rows as loaded: fewer distinct ages (bands or "*") than the exact ones
    plain, anonymised = load_client_data(compose_config(heart_overrides("none")), 0), load_client_data(sim, 0)
    assert len(np.unique(anonymised.x_train[:, 0])) < len(np.unique(plain.x_train[:, 0]))
