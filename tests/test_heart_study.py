"""The tabular study of issue #14 end to end (experiment=heart_study): four hospitals anonymise their rows,
train with example-level DP-SGD, release their label counts and validation accuracy with their own
Laplace noise, and the server ships the round's model with the best released validation accuracy.
Each hospital's epsilon in privacy.json is recomputed here from the figures privacy.json lists, with
dp-accounting's mechanism PLDs built directly (not the project's ledger), and the study's one epsilon
(the largest, since every example belongs to one hospital) must match."""

from __future__ import annotations

import json

import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from conftest import InProcessGrid, shared_data_dir
from fedpriv import run_folder
from fedpriv.compose import compose_config
from fedpriv.federation import run_federation
from fedpriv.preflight import preflight
from fedpriv.selection import candidate_path

VDI = 1e-4


@pytest.fixture
def heart_data():
    d = shared_data_dir()
    if d is None or not (d / "heart-disease").is_dir():
        pytest.skip("heart-disease data not found: set FEDPRIV_DATA to a folder with heart-disease/ "
                    "(CI uses ../shared/data)")
    return d


def client_epsilon(client: dict, releases: dict[str, dict], validations: int, delta: float) -> float:
    """DP-SGD (Poisson-sampled Gaussian, ``steps`` times) composed with the client's own Laplace releases."""
    (z,) = client["noise_multipliers"]  # one calibration: every step has the same noise
    pld = pld_lib.from_gaussian_mechanism(z, sampling_prob=client["sample_rate"], value_discretization_interval=VDI,
                                          pessimistic_estimate=True).self_compose(client["steps"])
    for label, count in (("label histogram", 1), ("validation accuracy", validations)):
        r = releases[label]
        laplace = pld_lib.from_laplace_mechanism(r["scale"], sensitivity=r["sensitivity"],
                                                 value_discretization_interval=VDI, pessimistic_estimate=True)
        pld = pld.compose(laplace.self_compose(count))
    return float(pld.get_epsilon_for_delta(delta))


def test_heart_study_end_to_end(tmp_path, heart_data, flower_run_identity):
    rc = compose_config(["experiment=heart_study", "tracking.progress=false", f"data.root={heart_data}",
                         f"run_dir={tmp_path}"])
    preflight(rc)
    summary = run_federation(InProcessGrid(4), rc)
    report = json.loads((tmp_path / run_folder.PRIVACY).read_text())
    assert {"local", "anonymisation", "analytics", "selection"} <= set(report)

    # anonymisation: configured k and l, and each hospital's achieved figures (operator-only)
    assert report["anonymisation"]["k"] == 5 and report["anonymisation"]["l_diversity"] == 2
    operator = json.loads((tmp_path / "operator_only" / "anonymisation.json").read_text())
    assert len(operator["clients"]) == 4
    assert all(c["k_achieved"] >= 5 and c["l_achieved"] >= 2 for c in operator["clients"])

    # one epsilon: every hospital's, recomputed from what privacy.json lists
    local = report["local"]
    metrics = run_folder.read_metrics(tmp_path)
    validated = [m["round"] for m in metrics if m.get("analytics_val_accuracy") is not None]
    assert validated == [3, 6, 9, 12, 15] and local["clients_declined_any_round"] == 0
    releases = {r["label"]: r for r in report["analytics"]["per_client_releases"]}
    recomputed = {c["client_id"]: client_epsilon(c, releases, len(validated), local["delta"]) for c in local["clients"]}
    for c in local["clients"]:
        assert c["epsilon"] == pytest.approx(recomputed[c["client_id"]], rel=1e-4)
    assert local["epsilon_max"] == pytest.approx(max(recomputed.values()), rel=1e-4)
    assert local["epsilon_max"] <= rc.privacy.local.target_epsilon
    # each hospital calibrated DP-SGD for its 15 rounds composed with its own analytics releases (no
    # expected_rounds workaround): it spends its budget, to within 1%, without declining a round
    assert rc.privacy.local.expected_rounds is None
    assert all(0.99 * rc.privacy.local.target_epsilon <= eps for eps in recomputed.values())
    assert "calibrated its DP-SGD noise" in report["analytics"]["caveats"][0]
    assert summary["local_epsilon_max"] == local["epsilon_max"]

    # private model selection: the argmax of the published validation figures, shipped as model.pt
    released = {m["round"]: m["analytics_val_accuracy"] for m in metrics if m["round"] in validated}
    best = max(validated, key=released.get)
    assert report["selection"]["method"] == "released_argmax" and report["selection"]["epsilon"] == 0.0
    assert report["selection"]["selected_model_after_round"] == best - 1 == summary["shipped_model_after_round"]
    shipped = torch.load(tmp_path / run_folder.MODEL, weights_only=True)
    kept = torch.load(candidate_path(tmp_path, best - 1), weights_only=True)
    assert all(torch.equal(shipped[k], kept[k]) for k in kept)
    assert summary["final_accuracy"] > 0.7  # the shipped model, on the central test split
