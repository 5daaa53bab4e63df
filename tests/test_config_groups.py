"""Every option of every config group composes and validates, the schema is the one source of
truth, and every kind of bad configuration stops before any work with one line naming the key."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedpriv.compose import compose_config, compose_jobs, group_options
from fedpriv.config import ConfigError, from_dict, to_dict
from fedpriv.config_schema import RunConfig, field_default, group_schemas, selector_key

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
NEEDS = {"audit": ["privacy=central"],  # an audit needs central DP: audit=central alone is refused
         "selection": ["analytics=central"],  # selection chooses by the analytics' validation accuracy
         "analytics=local": ["privacy=local"]}  # clients charge their own DP-SGD ledgers (one option's need)


def selected(rc: RunConfig, key: str):
    value = rc
    for part in key.split("."):
        value = getattr(value, part)
    return value


def sweep_size(option: str) -> int:
    params = OmegaConf.load(CONF / "experiment" / f"{option}.yaml").get("hydra", {}).get("sweeper", {}).get("params", {})
    return math.prod(len(str(v).split(",")) for v in params.values())


def test_every_group_folder_is_found():
    assert {g for g, _ in OPTIONS} == {*group_schemas(), "experiment"}
    assert len(OPTIONS) >= 40


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes_and_validates(group, option):
    needs = NEEDS.get(f"{group}={option}", NEEDS.get(group, []))
    jobs = compose_jobs([f"{group}={option}", *needs], multirun=group == "experiment", from_shell=False)
    assert len(jobs) == (sweep_size(option) if group == "experiment" else 1)
    key = selector_key(group)
    for job in jobs:
        rc = job.config
        if key is not None:
            assert selected(rc, key) == option  # the file names its option, as the selector says
        # What a client decodes from the JSON the server sends: the same, valid configuration.
        assert from_dict(json.loads(json.dumps(to_dict(rc)))) == rc


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("group, option", [o for o in OPTIONS if o[0] in group_schemas()], ids=lambda x: str(x))
def test_group_files_extend_the_schema_and_list_only_what_differs(group, option):
    path = CONF / group / f"{option}.yaml"
    text = path.read_text()
    data = OmegaConf.to_container(OmegaConf.load(path))
    defaults = data.pop("defaults", [])
    if text.startswith("# @package _global_"):
        return  # a data set's recipe or DP-SGD's: global keys, typed by base_config
    assert len(defaults) == 2 and defaults[1] == "_self_", f"{path}: defaults must be [base, _self_]"
    assert defaults[0] == "base" or (CONF / group / f"{defaults[0]}.yaml").exists(), defaults  # or an option extending it
    schema = group_schemas()[group]()
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in _leaves(data):
        name = key.split(".")[0]
        assert name in fields, f"{path}: {key} is not in the schema"
        if fields[name].metadata.get("selects"):
            continue  # the option's own name
        default = field_default(fields[name])
        for part in key.split(".")[1:]:
            default = getattr(default, part)
        assert value != default, f"{path}: {key}: {value!r} repeats the schema's default"


def test_allowed_names_come_from_the_registries():
    """A group's YAML files and the registry that builds its options name the same things."""
    from clients.dp_sgd import GRAD_SAMPLE_MODES as CLIENT_MODES
    from fedpriv.config import SCHEDULES
    from fedpriv.config_schema import GRAD_SAMPLE_MODES, PRIVACY_MODES
    from fedpriv.data import DATASETS, SCHEMES
    from fedpriv.models import MODEL_NAMES
    from strategies.factory import STRATEGIES

    assert set(group_options("dataset")) == set(DATASETS)
    assert set(group_options("partition")) == set(SCHEMES)
    assert set(group_options("model")) == set(MODEL_NAMES)
    assert set(group_options("strategy")) == set(STRATEGIES)
    assert set(group_options("privacy")) == set(PRIVACY_MODES)
    assert set(group_options("schedule")) == set(SCHEDULES)
    assert set(CLIENT_MODES) == set(GRAD_SAMPLE_MODES)  # clients/dp_sgd.py keeps its own copy


def test_unknown_strategy_name_is_a_config_error_from_the_registry():
    from strategies.factory import build_flower_strategy

    rc = from_dict({"strategy": {"name": "fedsgd"}})  # parse_config leaves strategy names to the factory
    with pytest.raises(ConfigError, match=r"config key 'strategy.name': got 'fedsgd'; allowed: fedavg, "):
        build_flower_strategy(rc)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ("dataset=heart_disease", ("heart_disease", "natural", 4)),
        ("dataset=heart_disease partition=natural num_clients=4", ("heart_disease", "natural", 4)),
        ("dataset=shakespeare", ("shakespeare", "natural", 1078)),
    ],
)
def test_data_sets_with_natural_clients_compose(overrides, expected):
    rc = compose_config(overrides)
    assert (rc.dataset.name, rc.partition.scheme, rc.num_clients) == expected


def test_heart_disease_passes_preflight(tmp_path):
    from conftest import shared_data_dir
    from fedpriv.preflight import preflight

    data = shared_data_dir()
    if data is None or not (data / "heart-disease").is_dir():
        pytest.skip("heart-disease data not found (FEDPRIV_DATA or ../shared/data)")
    rc = compose_config(["dataset=heart_disease", f"data.root={data}", f"run_dir={tmp_path}"])
    preflight(rc)


def test_experiment_is_chosen_without_plus():
    rc = compose_config("experiment=quickstart")
    assert (rc.strategy.name, rc.privacy.mode, rc.num_clients) == ("fedavgm", "central", 300)
    assert compose_config("privacy=central privacy.target_epsilon=inf").privacy.target_epsilon == math.inf


def test_hydra_settings_pass_through():
    jobs = compose_jobs(["seed=0,1", "hydra.sweep.dir=/tmp/x", "hydra.sweep.subdir=y"], multirun=True)
    assert [j.config.seed for j in jobs] == [0, 1]
    assert compose_jobs(["hydra.run.dir=/tmp/x", "+hydra.job.env_set.FOO=bar"])[0].config.seed == 0
    # an interpolation only Hydra's run resolves (Hydra's documented pattern for short job folders)
    jobs = compose_jobs(["seed=0,1", "hydra.sweep.subdir=job${hydra.job.num}", "run_dir=null"], multirun=True)
    assert [j.config.seed for j in jobs] == [0, 1]


BAD = [
    # an unknown key without '+' (Hydra: "Could not override ... Key 'x' is not in struct")
    ("foo=1", "foo", r"no such key; allowed here: seed, num_clients"),
    ("train.lrr=0.1", "train.lrr", r"no such key; allowed here: local_epochs, batch_size, lr,"),
    # a mistyped group option
    ("dataset=imagenet", "dataset", r"no option 'imagenet'; allowed: cifar10, digits, fashion_mnist, heart_disease"),
    ("experiment=quikstart", "experiment", r"no option 'quikstart'; allowed: .*quickstart"),
    ("privacy=base", "privacy", r"base is the schema .*allowed: central, central_local, distributed, local, none"),
    # a key the chosen option does not read
    ("strategy.eta=0.1", "strategy.eta", r"not read with strategy=fedavg .*allowed only with strategy=fedadam"),
    ("partition.alpha=0.3", "partition.alpha", r"not read with partition=iid .*allowed only with partition=dirichlet"),
    ("privacy=local privacy.clip_norm=2", "privacy.clip_norm", r"not read with privacy=local .*privacy=central"),
    ("privacy=central privacy.clip_lr=0.5", "privacy.clip_lr", r"allowed only with privacy.clipping=adaptive"),
    ("privacy=central privacy.local.delta=0.001", "privacy.local.delta", r"allowed only with privacy=local or"),
    ("schedule.gamma=0.5", "schedule.gamma", r"allowed only with schedule=step"),
    ("audit.canaries=10", "audit.canaries", r"allowed only with audit.enabled=true"),
    # '+key' on a key that exists (it passed before and nothing read it), and on Hydra's settings
    ("+strategy.eta=0.1", "strategy.eta", r"'\+' cannot add it; allowed: override it without '\+'"),
    ("+partition.alpha=0.3", "partition.alpha", r"'\+' cannot add it"),
    ("+hydra.foo=1", "hydra.foo", r"Hydra has no such setting; allowed here: .*run, sweep"),
    ("+experiment=quickstart", "experiment", r"allowed: one choice, without '\+' \(experiment=\.\.\.\)"),
    ("+dataset.colour=red", "dataset.colour", r"no such key; allowed here: name"),
    # numbers that must be finite
    ("train.lr=inf", "train.lr", r"got inf; allowed: a finite number"),
    ("train.lr=nan", "train.lr", r"got nan; allowed: a finite number"),
    ("privacy=central privacy.clip_norm=inf", "privacy.clip_norm", r"got inf; allowed: a finite number"),
    ("privacy=central privacy.delta=inf", "privacy.delta", r"allowed: a finite number"),
    ("privacy=local privacy.local.target_epsilon=inf", "privacy.local.target_epsilon", r"allowed: a finite number$"),
    ("privacy=local privacy.local.max_grad_norm=inf", "privacy.local.max_grad_norm", r"allowed: a finite number"),
    ("privacy=central privacy.target_epsilon=-inf", "privacy.target_epsilon", r"a finite number or inf \(clip, do not"),
    ("privacy=central privacy.target_epsilon=nan", "privacy.target_epsilon", r"got nan"),
    ("schedule=phases schedule.phases=[[5,inf],[10,1.0]]", "schedule.phases", r"allowed: a finite number"),
    # a privacy group and a mode that contradict each other
    ("privacy=central privacy.mode=none", "privacy.mode", r"contradicts privacy=central; allowed: .*privacy=none"),
    ("dataset=digits dataset.name=cifar10", "dataset.name", r"contradicts dataset=digits"),
    # an explicit data folder that does not exist
    ("data.root=/does/not/exist", "data.root", r"folder /does/not/exist does not exist; allowed: an existing folder"),
    # wrong types and syntax
    ("train.batch_size=abc", "train.batch_size", r"could not be converted to Integer"),
    ("train=3", "train", r"is a section, not a value; allowed: its keys \(local_epochs"),
]


@pytest.mark.parametrize("overrides, key, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"config key '{key}': "), text
    assert re.search(message, text), text


def test_a_sweep_validates_every_job_before_any_starts():
    with pytest.raises(ConfigError) as info:
        compose_jobs(["seed=0,1", "train.lr=0.1,inf"], multirun=True)
    assert str(info.value).startswith("config key 'train.lr': got inf")
    assert "sweep job 1 of 4: seed=0 train.lr=inf" in str(info.value)
    assert len(compose_jobs(["seed=0,1", "train.lr=0.1,0.2"], multirun=True)) == 4


# ------------------------------------------------------------------ through scripts/simulate.py


def simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedpriv: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1, result.stderr[-2000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["foo=1"], "config key 'foo': no such key"),
        (["dataset=imagenet"], "config key 'dataset': no option 'imagenet'"),
        (["+experiment=quickstart"], "config key 'experiment'"),
        (["privacy=central", "privacy.mode=none"], "config key 'privacy.mode'"),
        (["data.root=/does/not/exist"], "config key 'data.root'"),
    ],
)
def test_simulate_refuses_bad_input_before_hydra_runs_anything(tmp_path, overrides, expected):
    result = simulate(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line(result, expected)
    assert not (tmp_path / "run").exists()  # Hydra never made the run's folder


@pytest.mark.parametrize(
    "sweep, expected",
    [
        (["train.lr=0.1,inf"], "config key 'train.lr': got inf"),  # the schema refuses job 1
        # job 0 is fine; job 1's budget is spent before round 1 (its preflight refuses it)
        (["privacy=central", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=100,0.1"], "is spent before round 1"),
    ],
)
def test_simulate_multirun_with_a_bad_second_job_runs_no_job(tmp_path, sweep, expected):
    result = simulate("-m", "num_rounds=1", "num_clients=4", "clients_per_round=2", "tracking.progress=false", *sweep,
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert_one_line(result, expected)
    assert "sweep job 1 of 2" in result.stderr
    assert not list(tmp_path.rglob("metrics.jsonl"))  # no job ran
    assert not (tmp_path / "sweep").exists()
